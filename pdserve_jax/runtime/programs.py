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
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels
from pdserve_jax.kv.pool import POOL_AXES, PagePool, SCRATCH_PAGE
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


def _head_split(mesh: Mesh, cfg) -> str:
  """How attention splits over the mesh's tp axis. "heads": both head counts divide
  tp, each device attends with its own q and KV heads. "kv_replicated": q heads
  divide, tp is a multiple of the KV heads (which the pool replicates), each device
  picks the one KV head its q heads read. "none": every device computes all heads."""
  tp = mesh.shape[sharding.TP]
  if tp == 1 or cfg.num_heads % tp:
    return "none"
  if cfg.num_kv_heads % tp == 0:
    return "heads"
  return "kv_replicated" if tp % cfg.num_kv_heads == 0 else "none"


def _on_heads(mesh: Mesh, cfg, kernel, q, k, v, rest, q_axis: int, kv_axis: int):
  """`kernel(q, k, v, *rest)` per tp shard of the heads (a shard_map: Pallas kernels
  cannot be partitioned by XLA). `q_axis` / `kv_axis`: the head axis of q and of k, v;
  `rest` (lengths, offsets, page tables) is replicated."""
  split = _head_split(mesh, cfg)
  spec = lambda nd, axis: P(*[sharding.TP if d == axis else None for d in range(nd)])
  rep = lambda a: P(*([None] * a.ndim))
  q_spec = spec(q.ndim, q_axis) if split != "none" else rep(q)
  kv_spec = spec(k.ndim, kv_axis) if split == "heads" else rep(k)

  def local(q, k, v, *rest):
    if split == "kv_replicated":
      per = mesh.shape[sharding.TP] // cfg.num_kv_heads  # devices sharing a KV head
      i = jax.lax.axis_index(sharding.TP) // per
      k, v = (jax.lax.dynamic_slice_in_dim(a, i, 1, axis=kv_axis) for a in (k, v))
    return kernel(q, k, v, *rest)

  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec)
                       + tuple(rep(a) for a in rest), out_specs=q_spec,
                       check_vma=False)(q, k, v, *rest)


def _prefill_program(cfg, page_size, attn_impl, mesh, params, pool, tokens, starts, lengths,
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
    kernel = functools.partial(pallas_kernels.prefill_attention, impl=attn_impl)
    o = _on_heads(mesh, cfg, kernel, q, ctx["k"], ctx["v"], (starts, kv_lengths), 2, 2)
    return pool, o

  x, pool = llama.decoder_layers(cfg, params, llama.embed(params, tokens), positions, attend,
                                 pool)
  last = x[jnp.arange(B), jnp.maximum(lengths - 1, 0)]
  logits = llama.lm_logits(cfg, params, last)
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


def _decode_program(cfg, page_size, attn_impl, mesh, params, pool, tokens, positions, active,
                    page_tables, temperature, top_k, top_p, seeds, token_index):
  pages, slots = _write_positions(page_tables, positions[:, None], active[:, None], page_size)
  lengths = jnp.where(active, positions + 1, 0)

  def attend(pool, i, q, k, v):
    pool = _write_kv(pool, i, pages[:, 0], slots[:, 0], k[:, 0], v[:, 0])
    kernel = functools.partial(pallas_kernels.paged_decode_attention, impl=attn_impl)
    o = _on_heads(mesh, cfg, kernel, q[:, 0], pool["k"][i], pool["v"][i],
                  (lengths, page_tables), 1, 0)
    return pool, o[:, None]

  x, pool = llama.decoder_layers(cfg, params, llama.embed(params, tokens[:, None]),
                                 positions[:, None], attend, pool)
  logits = llama.lm_logits(cfg, params, x[:, 0])
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


def _jit_programs(cfg, page_size, attn_impl, mesh, param_sh, pool_sh):
  """The prefill and decode programs, jitted with explicit shardings; the pool is
  donated."""
  rep = sharding.replicated(mesh)
  host_args = (rep,) * 9
  return tuple(jax.jit(functools.partial(program, cfg, page_size, attn_impl, mesh),
                       in_shardings=(param_sh, pool_sh) + host_args,
                       out_shardings=(pool_sh, rep), donate_argnums=(1,))
               for program in (_prefill_program, _decode_program))


def lower_programs(cfg, mesh: Mesh, shape: RunnerShape, dtype=jnp.bfloat16,
                   attn_impl: str = "auto") -> dict:
  """The prefill and decode programs lowered at the largest buckets of `shape`, from
  shapes alone: no weights or pool are allocated, so they compile for devices that
  are not here (a TPU topology from `jax.experimental.topologies` on a CPU host).
  Lowering runs under `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, so
  `attn_impl="auto"` picks the kernels of the mesh's platform. Returns {"prefill":
  Lowered, "decode": Lowered}; `.compile()` gives `memory_analysis()` and
  `cost_analysis()`."""
  sds = jax.ShapeDtypeStruct
  shapes = llama.param_shapes(cfg, dtype)
  param_sh = sharding.tree_shardings(mesh, llama.logical_axes(cfg), shapes)
  params = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sharding=sh), shapes, param_sh)
  pool_shape = (cfg.num_layers, cfg.num_kv_heads, shape.num_pages, shape.page_size,
                cfg.head_dim)
  pool_sh = sharding.logical_sharding(mesh, POOL_AXES, pool_shape)
  pool = {n: sds(pool_shape, dtype, sharding=pool_sh) for n in ("k", "v")}
  prefill, decode = _jit_programs(cfg, shape.page_size, attn_impl, mesh, param_sh,
                                  {"k": pool_sh, "v": pool_sh})
  rep = sharding.replicated(mesh)
  host = lambda s, dt: sds(s, dt, sharding=rep)
  i32, f32 = jnp.int32, jnp.float32

  def sampling(b):
    return (host((b,), f32), host((b,), i32), host((b,), f32), host((b,), i32),
            host((b,), i32))

  b, t, w = max(shape.compiled_prefill_shapes())
  bd, wd = max(shape.compiled_decode_shapes())
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return {"prefill": prefill.lower(params, pool, host((b, t), i32), host((b,), i32),
                                     host((b,), i32), host((b, w), i32), *sampling(b)),
            "decode": decode.lower(params, pool, host((bd,), i32), host((bd,), i32),
                                   host((bd,), jnp.bool_), host((bd, wd), i32),
                                   *sampling(bd))}


class InstanceRunner:
  """One instance's weights, page pool and compiled programs on `mesh`."""

  def __init__(self, model: Model, mesh: Mesh, shape: RunnerShape = RunnerShape(),
               attn_impl: str = "auto", params=None):
    """`params`: weights already laid out on `mesh` (semi-PD shares one copy)."""
    cfg = model.config
    self.cfg, self.mesh, self.shape, self.attn_impl = cfg, mesh, shape, attn_impl
    self.params = params if params is not None else model.shard(mesh).params
    self.pool = PagePool(cfg, mesh, shape.num_pages, shape.page_size, model.dtype)
    param_sh = jax.tree.map(lambda a: a.sharding, self.params)
    self._prefill, self._decode = _jit_programs(cfg, shape.page_size, attn_impl, mesh,
                                                param_sh, self.pool.pool_shardings)

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
