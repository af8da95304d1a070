"""The jitted programs of one instance, bound to one mesh.

`InstanceRunner` owns an instance's sharded weights and its `PagePool`, and exposes
host-level calls that take numpy rows, pad them to shape buckets and run:

- `packed`: any mix of prompt chunks (whole prompts, pieces at any offset) and
  decode rows, concatenated on one token axis; each token's K/V is written to its
  page, ragged paged attention reads every row's context straight from the pool,
  and each row samples a token at its end. Bucketed by total tokens only.
- `decode`: one token per row, the paged decode kernel; bucketed by rows. Pure
  decode steps use it: one query per row needs no token bookkeeping.

Page tables have one width per instance. Both are `jax.jit` programs with explicit
in/out shardings and the pool donated. `warmup()` compiles every bucket;
`CompileCounter` proves nothing compiles after it. The runner knows nothing of
requests or scheduling: callers pass page tables.

Layers run as segments, each a program over its own layers and its own pool: one
per pipeline stage, or with `RunnerShape.layer_groups` > 1 that many equal groups
(each stage's on its mesh), so a caller's hook (`after_stage`) can move a group's
KV pages out while the next group computes (layer-wise KV streaming). Segments on
one mesh with the same ends share their compiled programs.
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
from pdserve_jax.runtime.rows import Sampled, SamplingRows
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


def _write_kv(pool, i, pages, slots, k, v):
  """k, v [N, Hkv, D] into (layer i, every head, pages[n], slots[n]). Every dim but
  head_dim is indexed (heads by an iota, which XLA's SPMD partitioner splits with the
  heads): a scatter whose window is only the minor dim keeps the pool's layout, where
  a window over heads and head_dim made XLA:TPU copy the whole pool to and from a
  layout of its own each call when a device held more than one KV head."""
  heads = jnp.arange(k.shape[-2], dtype=jnp.int32)[None, :]
  at = (i, heads, pages[:, None], slots[:, None])
  return {"k": pool["k"].at[at].set(k), "v": pool["v"].at[at].set(v)}


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


def _packed_program(cfg, attn_impl, mesh, ends, params, pool, inp, positions, pages, slots,
                    q_starts, q_lens, kv_lens, page_tables, temperature, top_k, top_p, seeds,
                    token_index):
  """Query tokens of many rows on one axis (prompt chunks at any offset, decode rows):
  each token's K/V goes to (pages, slots), attention reads every row's pages straight
  from the pool, and each row samples at its last token. `ends` = (first, last):
  whether this pipeline stage embeds `inp` (tokens; else it is the previous stage's
  hidden states) and whether it samples (else it returns hidden states)."""
  def attend(pool, i, q, k, v):
    pool = _write_kv(pool, i, pages, slots, k[0], v[0])
    kernel = functools.partial(pallas_kernels.ragged_paged_attention, impl=attn_impl)
    o = _on_heads(mesh, cfg, kernel, q[0], pool["k"][i], pool["v"][i],
                  (q_starts, q_lens, kv_lens, page_tables), 1, 0)
    return pool, o[None]

  x = llama.embed(params, inp[None]) if ends[0] else inp[None]
  x, pool = llama.decoder_layers(cfg, params, x, positions[None], attend, pool)
  if not ends[1]:
    return pool, x[0]
  last = x[0, jnp.maximum(q_starts + q_lens - 1, 0)]
  logits = llama.lm_logits(cfg, params, last)
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


def _decode_program(cfg, attn_impl, mesh, ends, params, pool, inp, positions, pages, slots,
                    page_tables, temperature, top_k, top_p, seeds, token_index):
  """One token per row (`pages` is the scratch page for padded rows); the paged
  decode kernel. `ends` as for `_packed_program`."""
  lengths = jnp.where(pages != SCRATCH_PAGE, positions + 1, 0)

  def attend(pool, i, q, k, v):
    pool = _write_kv(pool, i, pages, slots, k[:, 0], v[:, 0])
    kernel = functools.partial(pallas_kernels.paged_decode_attention, impl=attn_impl)
    o = _on_heads(mesh, cfg, kernel, q[:, 0], pool["k"][i], pool["v"][i],
                  (lengths, page_tables), 1, 0)
    return pool, o[:, None]

  x = llama.embed(params, inp[:, None]) if ends[0] else inp[:, None]
  x, pool = llama.decoder_layers(cfg, params, x, positions[:, None], attend, pool)
  if not ends[1]:
    return pool, x[:, 0]
  logits = llama.lm_logits(cfg, params, x[:, 0])
  return pool, sample(logits, temperature, top_k, top_p, seeds, token_index)


_PROGRAMS = {"packed": (_packed_program, 13), "decode": (_decode_program, 10)}


def _jit_programs(cfg, attn_impl, mesh, param_sh, pool_sh, ends=(True, True)) -> dict:
  """{"packed", "decode"}: jitted with explicit shardings (host arrays and hidden
  states replicated); the pool is donated."""
  rep = sharding.replicated(mesh)
  return {name: jax.jit(functools.partial(program, cfg, attn_impl, mesh, ends),
                        in_shardings=(param_sh, pool_sh) + (rep,) * n_host,
                        out_shardings=(pool_sh, rep), donate_argnums=(1,))
          for name, (program, n_host) in _PROGRAMS.items()}


def _packed_args(shape: RunnerShape, T: int, f=np.zeros):
  """Host arguments of a packed call of T tokens (`f(shape, dtype)` makes each)."""
  R, W = shape.packed_rows(T), shape.table_width
  i32 = np.int32
  return ((f((T,), i32),) * 4 + (f((R,), i32),) * 3 + (f((R, W), i32),)
          + _sampling_args(R, f))


def _decode_args(shape: RunnerShape, B: int, f=np.zeros):
  i32 = np.int32
  return (f((B,), i32),) * 4 + (f((B, shape.table_width), i32),) + _sampling_args(B, f)


def _sampling_args(n, f):
  return (f((n,), np.float32), f((n,), np.int32), f((n,), np.float32), f((n,), np.int32),
          f((n,), np.int32))


def lower_programs(cfg, mesh: Mesh, shape: RunnerShape, dtype=jnp.bfloat16,
                   attn_impl: str = "auto", tokens=None, batch=None) -> dict:
  """The packed program at `tokens` (default: the largest bucket) and the decode
  program at `batch` (default: the largest), lowered from shapes alone: no weights
  or pool are allocated, so they compile for devices that are not here (a TPU
  topology from `jax.experimental.topologies` on a CPU host). Lowering runs under
  `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, so `attn_impl="auto"` picks
  the kernels of the mesh's platform. Returns {"packed": Lowered, "decode":
  Lowered}; `.compile()` gives `memory_analysis()` and `cost_analysis()`."""
  sds = jax.ShapeDtypeStruct
  shapes = llama.param_shapes(cfg, dtype)
  param_sh = sharding.tree_shardings(mesh, llama.logical_axes(cfg), shapes)
  params = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sharding=sh), shapes, param_sh)
  pool_shape = (cfg.num_layers, cfg.num_kv_heads, shape.num_pages, shape.page_size,
                cfg.head_dim)
  pool_sh = sharding.logical_sharding(mesh, POOL_AXES, pool_shape)
  pool = {n: sds(pool_shape, dtype, sharding=pool_sh) for n in ("k", "v")}
  programs = _jit_programs(cfg, attn_impl, mesh, param_sh, {"k": pool_sh, "v": pool_sh})
  rep = sharding.replicated(mesh)
  host = lambda s, dt: sds(s, dt, sharding=rep)
  T = tokens or shape.token_buckets[-1]
  B = batch or shape.decode_batches[-1]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return {"packed": programs["packed"].lower(params, pool, *_packed_args(shape, T, host)),
            "decode": programs["decode"].lower(params, pool, *_decode_args(shape, B, host))}


def _stage_params(params, ends, layers: range = None):
  """A pipeline stage's share of the weights (or of their logical axes, with no
  `layers` to slice): its layers, the embedding on the first stage, the final norm
  and LM head on the last (the embedding too if tied)."""
  out = {"layers": params["layers"] if layers is None else
         jax.tree.map(lambda a: a[layers.start:layers.stop], params["layers"])}
  keep = ({"embed"} if ends[0] else set()) | ({"final_norm", "lm_head", "embed"}
                                              if ends[1] else set())
  out.update({k: v for k, v in params.items() if k in keep and k != "layers"})
  return out


class _Stage(NamedTuple):
  mesh: Mesh
  params: dict
  programs: dict


class InstanceRunner:
  """One instance's weights, page pool and compiled programs: on one mesh, or on one
  mesh per pipeline stage (pp > 1), each holding an equal share of the layers with
  their weights and KV pages. A call runs the segments (stages, or layer groups:
  see the module docstring) in order, the hidden states moving mesh to mesh with
  `jax.device_put`; calls are dispatched asynchronously, so a pipeline's virtual
  engines (`sibling`) keep several calls in flight, one per stage."""

  def __init__(self, model: Model, mesh, shape: RunnerShape = RunnerShape(),
               attn_impl: str = "auto", _stages=None):
    """`mesh`: a Mesh, or a list of them, one per pipeline stage."""
    cfg = model.config
    meshes = [mesh] if isinstance(mesh, Mesh) else list(mesh)
    pp, groups = len(meshes), shape.layer_groups
    if groups > 1 and groups % pp:
      raise ValueError(f"layer_groups={groups} is not a multiple of the {pp} pipeline stages")
    n = max(pp, groups)  # segments
    if cfg.num_layers % n:
      raise ValueError(f"{cfg.num_layers} layers do not split into {n} equal "
                       + ("pipeline stages" if groups <= 1 else "layer groups"))
    per = cfg.num_layers // n
    self.model, self.cfg, self.shape, self.attn_impl = model, cfg, shape, attn_impl
    self.mesh, self.meshes = meshes[0], meshes
    self.stage_cfg = cfg.replace(num_layers=per)
    self.pools = [PagePool(self.stage_cfg, meshes[s * pp // n], shape.num_pages,
                           shape.page_size, model.dtype, first_layer=s * per)
                  for s in range(n)]
    self.stages = _stages or self._build_stages(model)

  def _build_stages(self, model) -> List[_Stage]:
    n, stages, programs = len(self.pools), [], {}
    for s, pool in enumerate(self.pools):
      mesh, ends = pool.mesh, (s == 0, s == n - 1)
      if n == 1:
        params = model.shard(mesh).params
      else:
        params = _stage_params(model.params, ends, pool.layers)
        axes = _stage_params(llama.logical_axes(self.cfg), ends)
        params = jax.device_put(params, sharding.tree_shardings(mesh, axes, params))
      key = (mesh, ends)
      if key not in programs:
        param_sh = jax.tree.map(lambda a: a.sharding, params)
        programs[key] = _jit_programs(self.stage_cfg, self.attn_impl, mesh, param_sh,
                                      pool.pool_shardings, ends)
      stages.append(_Stage(mesh, params, programs[key]))
    return stages

  def sibling(self, num_pages: int) -> "InstanceRunner":
    """A runner on the same meshes sharing these weights and compiled programs, with
    a pool of its own of `num_pages` pages (a pipeline's next virtual engine)."""
    shape = dataclasses.replace(self.shape, num_pages=num_pages)
    return InstanceRunner(self.model, self.meshes, shape, self.attn_impl, _stages=self.stages)

  @property
  def pool(self) -> PagePool:
    """The KV pool of a single-stage runner."""
    if len(self.pools) != 1:
      raise ValueError(f"a pipelined runner holds one pool per stage ({len(self.pools)}): "
                       "use `pools`")
    return self.pools[0]

  @property
  def params(self):
    return self.stages[0].params if len(self.stages) == 1 else [st.params for st in
                                                                 self.stages]

  def pools_lost(self) -> bool:
    return any(p.lost() for p in self.pools)

  def reset_pools(self) -> None:
    for p in self.pools:
      p.reset()

  def _run(self, program: str, inp, args, after_stage=None):
    """Runs `program` through every segment; returns the last one's outputs. Calls
    `after_stage(pool)` once each segment is dispatched, with its pool."""
    x, mesh = inp, self.stages[0].mesh
    for st, pool in zip(self.stages, self.pools):
      if st.mesh is not mesh:
        x, mesh = jax.device_put(x, sharding.replicated(st.mesh)), st.mesh
      pool.arrays, x = st.programs[program](st.params, pool.arrays, x, *args)
      if after_stage is not None:
        after_stage(pool)
    return x

  # -- host-level calls ------------------------------------------------------

  def _write_slots(self, pages, positions):
    """(page, slot) of each position, given the pages of its row (a numpy array)."""
    size = self.shape.page_size
    return pages[positions // size], positions % size

  def packed(self, chunks: Sequence[Sequence[int]], starts: Sequence[int],
             page_tables: Sequence[Sequence[int]], sampling: SamplingRows, after_stage=None):
    """One packed call: row r feeds `chunks[r]` (a prompt chunk, or one decode
    token) at positions starts[r] .. starts[r] + len(chunks[r]) - 1, which its pages
    cover. Returns device arrays (`Sampled`) whose first `len(chunks)` rows are the
    tokens sampled at each row's end (slice them on the host, after `np.asarray`:
    slicing on device would compile). `after_stage(pool)`: see `_run`."""
    (T,) = self.shape.packed_shape(sum(len(c) for c in chunks))
    R, n = self.shape.packed_rows(T), len(chunks)
    if n > R:
      raise ValueError(f"{n} rows exceed the {R} rows of a packed call of {T} tokens")
    tokens, positions, pages, slots, q_starts, q_lens, kv_lens, tables = (
        a.copy() for a in _packed_args(self.shape, T)[:8])
    q_starts[:] = T  # empty rows own no token
    at = 0
    for r, (c, start, table) in enumerate(zip(chunks, starts, page_tables)):
      m, table = len(c), np.asarray(table, np.int32)
      pos = np.arange(start, start + m, dtype=np.int32)
      tokens[at:at + m], positions[at:at + m] = c, pos
      pages[at:at + m], slots[at:at + m] = self._write_slots(table, pos)
      q_starts[r], q_lens[r], kv_lens[r] = at, m, start + m
      tables[r, :len(table)] = table
      at += m
    return Sampled(*self._run("packed", tokens, (positions, pages, slots, q_starts, q_lens,
                                                 kv_lens, tables, *sampling.padded(R).arrays()),
                              after_stage))

  def decode(self, tokens: Sequence[int], positions: Sequence[int],
             page_tables: Sequence[Sequence[int]], sampling: SamplingRows):
    """One decode step; row r feeds `tokens[r]` at `positions[r]`. Returns device
    arrays (`Sampled`) whose first `len(tokens)` rows are the next tokens."""
    n = len(tokens)
    (B,) = self.shape.decode_shape(n)
    tok, pos, pages, slots, tables = (a.copy() for a in _decode_args(self.shape, B)[:5])
    tok[:n], pos[:n] = tokens, positions
    for r, table in enumerate(page_tables):
      table = np.asarray(table, np.int32)
      tables[r, :len(table)] = table
      pages[r], slots[r] = self._write_slots(table, pos[r])
    return Sampled(*self._run("decode", tok, (pos, pages, slots, tables,
                                              *sampling.padded(B).arrays())))

  def compiled_shapes(self, packed: bool = True, decode: bool = True) -> list:
    """(program, shape) of every bucket the phases use."""
    return ([("packed", k) for k in self.shape.compiled_packed_shapes()] * packed
            + [("decode", k) for k in self.shape.compiled_decode_shapes()] * decode)

  def warmup(self, packed: bool = True, decode: bool = True, progress=None) -> int:
    """Compiles every bucket by running it on scratch data (everything lands in the
    scratch page); returns how many programs. `progress()`, if given, is called
    after each."""
    shapes = self.compiled_shapes(packed, decode)
    for program, (n,) in shapes:
      args = (_packed_args if program == "packed" else _decode_args)(self.shape, n)
      self._run(program, args[0], args[1:])
      if progress:
        progress()
    jax.block_until_ready([p.arrays for p in self.pools])
    return len(shapes)
