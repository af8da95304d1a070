"""The Llama-family transformer as functions over a params pytree.

Parameters are defined once with Flax NNX (`LlamaWeights`), which carries each
array's logical axes; programs see them as a plain nested dict (`init_params`,
`logical_axes`). Matrices are stored [out, in], as HF stores them, and applied by
`linear`; see there for why. Layers are stacked on a leading axis so `lax.scan` runs them and a
model compiles once per shape, not once per layer. The per-layer pieces
(`qkv`, `attention_out`, `mlp_block`) are shared by the cache-less reference
`forward` and by the paged programs in `runtime/`; attention itself is passed in,
so this module knows nothing of KV caches.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from pdserve_jax.model.config import ModelConfig

Params = Dict[str, Any]


def _param(rngs, shape, axes, dtype, std):
  if std == 0.0:
    value = jnp.ones(shape, dtype)  # norm weights
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LayerWeights(nnx.Module):
  """All decoder layers, stacked on a leading "layers" axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, std: float):
    L, H, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    nq, nkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = lambda shape, axes, s=std: _param(rngs, shape, axes, dtype, s)
    self.attn_norm = p((L, H), ("layers", "embed"), 0.0)
    self.wq = p((L, nq, D, H), ("layers", "q_heads", "head_dim", "embed"))
    self.wk = p((L, nkv, D, H), ("layers", "kv_heads", "head_dim", "embed"))
    self.wv = p((L, nkv, D, H), ("layers", "kv_heads", "head_dim", "embed"))
    if cfg.attention_bias:
      self.bq = p((L, nq, D), ("layers", "q_heads", "head_dim"))
      self.bk = p((L, nkv, D), ("layers", "kv_heads", "head_dim"))
      self.bv = p((L, nkv, D), ("layers", "kv_heads", "head_dim"))
    self.wo = p((L, H, nq, D), ("layers", "embed", "q_heads", "head_dim"))
    self.mlp_norm = p((L, H), ("layers", "embed"), 0.0)
    self.w_gate = p((L, F, H), ("layers", "mlp", "embed"))
    self.w_up = p((L, F, H), ("layers", "mlp", "embed"))
    self.w_down = p((L, H, F), ("layers", "embed", "mlp"))


class LlamaWeights(nnx.Module):
  """Every parameter of a Llama-family model with its logical axes."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32, std: float = 0.02):
    if not cfg.executable:
      raise ValueError(f"{cfg.name}: architecture {cfg.arch!r} has shapes only; "
                       "the engine runs 'llama' configs")
    V, H = cfg.vocab_size, cfg.hidden_size
    self.embed = _param(rngs, (V, H), ("vocab_in", "embed"), dtype, std)
    self.layers = LayerWeights(cfg, rngs, dtype, std)
    self.final_norm = _param(rngs, (H,), ("embed",), dtype, 0.0)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (V, H), ("vocab", "embed"), dtype, std)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random weights (normal with `std`, norms at 1) as a plain nested dict."""
  state = nnx.state(LlamaWeights(cfg, nnx.Rngs(seed), dtype, std))
  return nnx.to_pure_dict(state)


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
  """ShapeDtypeStructs of every parameter; allocates nothing."""
  state = nnx.state(nnx.eval_shape(lambda: LlamaWeights(cfg, nnx.Rngs(0), dtype)))
  return nnx.to_pure_dict(state)


def logical_axes(cfg: ModelConfig) -> Params:
  """PartitionSpecs of logical axis names, same tree as the params."""
  state = nnx.state(nnx.eval_shape(lambda: LlamaWeights(cfg, nnx.Rngs(0))))
  return nnx.to_pure_dict(nnx.get_partition_spec(state))


# ---------------------------------------------------------------------------
# Pieces of the forward pass.


def linear(x, w, num_in: int, out_dtype=None):
  """x [..., *in] times w [*out, *in] -> [..., *out], `num_in` trailing dims contracted.

  Written as a 2-D `x @ w.T`: XLA:CPU runs that as a contiguous matrix-vector
  product at twice the bandwidth of an einsum over the same layout (measured in a
  scanned decode step); other backends pick their own layouts either way.
  """
  k = math.prod(w.shape[w.ndim - num_in:])
  lead, out = x.shape[:x.ndim - num_in], w.shape[:w.ndim - num_in]
  y = jnp.matmul(x.reshape(-1, k), w.reshape(-1, k).T, preferred_element_type=out_dtype)
  return y.reshape(lead + out)


def rms_norm(x, weight, eps):
  # HF normalises in float32 and casts back before the weight multiply.
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim // 2], with Llama 3 scaling when configured."""
  D = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
  s = cfg.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  # Llama 3 (HF `_compute_llama3_parameters`): long wavelengths divided by `factor`,
  # short ones kept, a smooth blend in between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """x [B, T, N, D], positions int [B, T]; rotate-half convention (HF Llama)."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def qkv(cfg: ModelConfig, lp: Params, x, positions):
  """Pre-attention norm, projections and RoPE: x [B, T, H] -> q [B,T,Nq,D], k, v [B,T,Nkv,D]."""
  h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
  q, k, v = (linear(h, lp[w], 1) for w in ("wq", "wk", "wv"))
  if cfg.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def attention_out(lp: Params, x, o):
  return x + linear(o, lp["wo"], 2)


def mlp_block(cfg: ModelConfig, lp: Params, x):
  h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
  gate, up = linear(h, lp["w_gate"], 1), linear(h, lp["w_up"], 1)
  # silu(gate) * up, ending in a division: XLA counts a division as costly and so
  # computes this once into a buffer, where silu(gate) * up (multiplies last) was
  # fused into the down projection's one-row matmul on CPU and recomputed for every
  # output column (llama-100m decode step at batch 1: 23.6 -> 20.7 ms, 2-core host,
  # timed alternately in one process).
  return x + linear(gate * up / (1 + jnp.exp(-gate)), lp["w_down"], 1)


def embed(params: Params, tokens):
  return jnp.take(params["embed"], tokens, axis=0)


def lm_logits(cfg: ModelConfig, params: Params, x):
  """Final norm and LM head: x [..., H] -> float32 logits [..., V]."""
  h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  return linear(h, w, 1, jnp.float32)


def _as_matrices(layers: Params) -> Params:
  """Each stacked 4-D projection as the [layers, out, in] matrices `linear` applies
  (a free reshape of row-major arrays). XLA:CPU runs a one-row matmul as a loop over
  the layer's slice of the stack, and a slice of a 4-D stack costs index arithmetic
  per element: a scan of one-row matmuls over 64 stacked 768 x 768 matrices read them
  at 9 GB/s as [L, 768, 12, 64] and at 27 as [L, 768, 768]; the llama-100m decode
  step at batch 1 went from 20.8 to 18.9 ms (2-core host, timed alternately in one
  process). Not done for TPU, whose tiled layouts would make the reshape a copy."""
  out = dict(layers)
  for name in ("wq", "wk", "wv"):
    out[name] = layers[name].reshape(layers[name].shape[0], -1, layers[name].shape[-1])
  out["wo"] = layers["wo"].reshape(layers["wo"].shape[:2] + (-1,))
  return out


_UNROLLED = contextvars.ContextVar("unrolled_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
  """`decoder_layers` traced in this context runs its layers as straight-line code
  (the scan fully unrolled): XLA's cost analysis counts a loop body once whatever
  its trip count (`runtime.cost`)."""
  token = _UNROLLED.set(True)
  try:
    yield
  finally:
    _UNROLLED.reset(token)


def decoder_layers(cfg: ModelConfig, params: Params, x, positions,
                   attend: Callable, carry: Any = None):
  """Runs every layer under `lax.scan`.

  `attend(carry, layer_index, q, k, v) -> (carry, o)` computes attention (and may
  write K/V into a cache held in `carry`). Returns (x, carry).
  """

  layers = params["layers"]
  shapes = {name: a.shape[1:] for name, a in layers.items()}
  if pallas_kernels.traced_platform() == "cpu":
    layers = _as_matrices(layers)

  def body(state, layer):
    x, carry = state
    lp, i = layer
    lp = {name: a.reshape(shapes[name]) for name, a in lp.items()}
    q, k, v = qkv(cfg, lp, x, positions)
    carry, o = attend(carry, i, q, k, v)
    x = mlp_block(cfg, lp, attention_out(lp, x, o))
    return (x, carry), None

  (x, carry), _ = jax.lax.scan(
      body, (x, carry), (layers, jnp.arange(cfg.num_layers, dtype=jnp.int32)),
      unroll=_UNROLLED.get())
  return x, carry


def forward_logits(cfg: ModelConfig, params: Params, tokens, attn_impl: str = "auto"):
  """Full-sequence logits with no cache: int32 [B, T] -> float32 [B, T, V]."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  zeros = jnp.zeros((B,), jnp.int32)
  full = jnp.full((B,), T, jnp.int32)

  def attend(carry, i, q, k, v):
    return carry, pallas_kernels.prefill_attention(q, k, v, zeros, full, impl=attn_impl)

  x, _ = decoder_layers(cfg, params, embed(params, tokens), positions, attend)
  return lm_logits(cfg, params, x)
