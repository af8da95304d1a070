"""The jitted prefill and decode programs of one instance, bound to one mesh.

`InstanceRunner` owns an instance's sharded weights and its `PagePool`, and exposes
host-level calls that take numpy rows, pad them to shape buckets and run:

- `prefill`: prompt chunks (a whole prompt, or a piece of one for chunked prefill)
  write their K/V into their pages, attend over everything cached so far, and
  sample a token from each chunk's last position;
- `decode`: one token per running request appends K/V and samples the next token.

Both are `jax.jit` programs with explicit in/out shardings and the pool donated.
`warmup()` compiles every bucket; `CompileCounter` proves nothing compiles after it.
The runner knows nothing of requests or scheduling: callers pass page tables.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import pallas_kernels
from pdserve_jax.kv.pool import PagePool, SCRATCH_PAGE
from pdserve_jax.model import llama, sharding
from pdserve_jax.model.model import Model
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.runtime.sampling import sample

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations in this process while in use as a context."""
  _lock = threading.Lock()
  _active: List["CompileCounter"] = []
  _registered = False

  def __init__(self):
    self.count = 0

  @classmethod
  def _listen(cls, event, duration, **kwargs):
    if event == _COMPILE_EVENT:
      with cls._lock:
        for c in cls._active:
          c.count += 1

  def __enter__(self):
    with self._lock:
      if not CompileCounter._registered:
        jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
        CompileCounter._registered = True
      self._active.append(self)
    return self

  def __exit__(self, *exc):
    with self._lock:
      self._active.remove(self)


class Sampled(NamedTuple):
  """A program call's sampled tokens (device arrays, padded rows included)."""
  tokens: jax.Array  # i32 [B]; -1 where the row's logits were not finite
  logprobs: jax.Array  # f32 [B]: log-probability of each token
  top_ids: jax.Array  # i32 [B, K]: the K most likely tokens (K = sampling.MAX_LOGPROBS)
  top_logprobs: jax.Array  # f32 [B, K]


@dataclasses.dataclass
class SamplingRows:
  """Per-row sampling parameters, host side."""
  temperature: np.ndarray  # f32 [B]
  top_k: np.ndarray  # i32 [B]
  top_p: np.ndarray  # f32 [B]
  seed: np.ndarray  # i32 [B]
  token_index: np.ndarray  # i32 [B]: which output token of the request is drawn

  @staticmethod
  def greedy(n: int) -> "SamplingRows":
    return SamplingRows(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                        np.zeros(n, np.int32), np.zeros(n, np.int32))

  def padded(self, n: int) -> "SamplingRows":
    pad = lambda a, v: np.concatenate([a, np.full(n - len(a), v, a.dtype)])
    return SamplingRows(pad(self.temperature, 0), pad(self.top_k, 0), pad(self.top_p, 1),
                        pad(self.seed, 0), pad(self.token_index, 0))

  def arrays(self):
    return (self.temperature, self.top_k, self.top_p, self.seed, self.token_index)


def _write_positions(page_tables, positions, valid, page_size):
  """Page and slot of each position; invalid positions go to the scratch page."""
  idx = jnp.clip(positions // page_size, 0, page_tables.shape[1] - 1)
  pages = jnp.take_along_axis(page_tables, idx, axis=1)
  pages = jnp.where(valid, pages, SCRATCH_PAGE)
  slots = jnp.where(valid, positions % page_size, 0)
  return pages, slots


def _write_kv(pool, i, pages, slots, k, v):
  # Indices (layer, pages, slots) broadcast to the batch shape of k/v.
  return {"k": pool["k"].at[i, :, pages, slots].set(k),
          "v": pool["v"].at[i, :, pages, slots].set(v)}


def _prefill_program(cfg, page_size, attn_impl, params, pool, tokens, starts, lengths,
                     page_tables, temperature, top_k, top_p, seeds, token_index):
  B, T = tokens.shape
  positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  valid = jnp.arange(T)[None, :] < lengths[:, None]
  pages, slots = _write_positions(page_tables, positions, valid, page_size)
  kv_lengths = jnp.where(lengths > 0, starts + lengths, 0)

  def attend(pool, i, q, k, v):
    pool = _write_kv(pool, i, pages, slots, k, v)
    # Everything cached for these rows, this chunk included: [B, W*S, Hkv, D].
    ctx = {n: jnp.take(a[i], page_tables, axis=1) for n, a in pool.items()}
    ctx = {n: c.reshape(c.shape[0], B, -1, c.shape[-1]).transpose(1, 2, 0, 3)
           for n, c in ctx.items()}
    o = pallas_kernels.prefill_attention(q, ctx["k"], ctx["v"], starts, kv_lengths,
                                         impl=attn_impl)
    return pool, o

  x, pool = llama.decoder_layers(cfg, params, llama.embed(params, tokens), positions, attend,
                                 pool)
  last = x[jnp.arange(B), jnp.maximum(lengths - 1, 0)]
  logits = llama.lm_logits(cfg, params, last)
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


def _decode_program(cfg, page_size, attn_impl, params, pool, tokens, positions, active,
                    page_tables, temperature, top_k, top_p, seeds, token_index):
  pages, slots = _write_positions(page_tables, positions[:, None], active[:, None], page_size)
  lengths = jnp.where(active, positions + 1, 0)

  def attend(pool, i, q, k, v):
    pool = _write_kv(pool, i, pages[:, 0], slots[:, 0], k[:, 0], v[:, 0])
    o = pallas_kernels.paged_decode_attention(q[:, 0], pool["k"][i], pool["v"][i], lengths,
                                              page_tables, impl=attn_impl)
    return pool, o[:, None]

  x, pool = llama.decoder_layers(cfg, params, llama.embed(params, tokens[:, None]),
                                 positions[:, None], attend, pool)
  logits = llama.lm_logits(cfg, params, x[:, 0])
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


class InstanceRunner:
  """One instance's weights, page pool and compiled programs on `mesh`."""

  def __init__(self, model: Model, mesh: Mesh, shape: RunnerShape = RunnerShape(),
               attn_impl: str = "auto", params=None):
    """`params`: weights already laid out on `mesh` (semi-PD shares one copy)."""
    cfg = model.config
    self.cfg, self.mesh, self.shape, self.attn_impl = cfg, mesh, shape, attn_impl
    self.params = params if params is not None else model.shard(mesh).params
    self.pool = PagePool(cfg, mesh, shape.num_pages, shape.page_size, model.dtype)
    rep = sharding.replicated(mesh)
    param_sh = jax.tree.map(lambda a: a.sharding, self.params)
    pool_sh = self.pool.pool_shardings
    host_args = (rep,) * 9
    self._prefill = jax.jit(
        functools.partial(_prefill_program, cfg, shape.page_size, attn_impl),
        in_shardings=(param_sh, pool_sh) + host_args, out_shardings=(pool_sh, rep),
        donate_argnums=(1,))
    self._decode = jax.jit(
        functools.partial(_decode_program, cfg, shape.page_size, attn_impl),
        in_shardings=(param_sh, pool_sh) + host_args, out_shardings=(pool_sh, rep),
        donate_argnums=(1,))

  # -- host-level calls ------------------------------------------------------

  def _table(self, tables: Sequence[Sequence[int]], rows: int, width: int) -> np.ndarray:
    out = np.full((rows, width), SCRATCH_PAGE, np.int32)
    for r, t in enumerate(tables):
      out[r, :len(t)] = t
    return out

  def prefill(self, chunks: Sequence[Sequence[int]], starts: Sequence[int],
              page_tables: Sequence[Sequence[int]], sampling: SamplingRows):
    """Runs prompt chunks; returns device arrays (`Sampled`) whose first `len(chunks)`
    rows are the tokens sampled at each chunk's end (slice them on the host, after
    `np.asarray`: slicing on device would compile). Row r holds tokens at positions
    starts[r] .. starts[r] + len(chunks[r]) - 1 and its pages cover them."""
    B, T, W = self.shape.prefill_shape([len(c) for c in chunks], [len(t) for t in page_tables])
    tokens = np.zeros((B, T), np.int32)
    lengths = np.zeros(B, np.int32)
    st = np.zeros(B, np.int32)
    for r, c in enumerate(chunks):
      tokens[r, :len(c)] = c
      lengths[r], st[r] = len(c), starts[r]
    tables = self._table(page_tables, B, W)
    self.pool.arrays, out = self._prefill(self.params, self.pool.arrays, tokens, st, lengths,
                                          tables, *sampling.padded(B).arrays())
    return Sampled(*out)

  def decode(self, tokens: Sequence[int], positions: Sequence[int],
             page_tables: Sequence[Sequence[int]], sampling: SamplingRows):
    """One decode step; row r feeds `tokens[r]` at `positions[r]`. Returns device
    arrays (`Sampled`) whose first `len(tokens)` rows are the next tokens."""
    n = len(tokens)
    B, W = self.shape.decode_shape([len(t) for t in page_tables])
    tok = np.zeros(B, np.int32)
    pos = np.zeros(B, np.int32)
    active = np.zeros(B, bool)
    tok[:n], pos[:n], active[:n] = tokens, positions, True
    tables = self._table(page_tables, B, W)
    self.pool.arrays, out = self._decode(self.params, self.pool.arrays, tok, pos, active,
                                         tables, *sampling.padded(B).arrays())
    return Sampled(*out)

  def warmup(self, prefill: bool = True, decode: bool = True, progress=None) -> int:
    """Compiles every bucket by running it on scratch data; returns how many shapes.
    `progress()`, if given, is called after each."""
    progress = progress or (lambda: None)
    count = 0
    if prefill:
      for B, T, W in self.shape.compiled_prefill_shapes():
        z = np.zeros((B, T), np.int32)
        zb = np.zeros(B, np.int32)
        self.pool.arrays, out = self._prefill(
            self.params, self.pool.arrays, z, zb, zb, np.zeros((B, W), np.int32),
            *SamplingRows.greedy(B).arrays())
        count += 1
        progress()
    if decode:
      for B, W in self.shape.compiled_decode_shapes():
        zb = np.zeros(B, np.int32)
        self.pool.arrays, out = self._decode(
            self.params, self.pool.arrays, zb, zb, np.zeros(B, bool),
            np.zeros((B, W), np.int32), *SamplingRows.greedy(B).arrays())
        count += 1
        progress()
    jax.block_until_ready(self.pool.arrays)
    return count
