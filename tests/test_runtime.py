"""Packed and decode programs on a mesh against the cache-less reference forward."""

import jax
import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.model import sharding
from pdserve_jax.runtime import programs
from pdserve_jax.runtime.programs import CompileCounter, InstanceRunner, RunnerShape, SamplingRows

CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)
SHAPE = RunnerShape(page_size=8, num_pages=160, max_rows=8, max_step_tokens=256, max_seq_len=128)


@pytest.fixture(scope="module")
def model():
  return pdj.random_model(CFG, seed=7, std=0.25)


def generate(runner, prompts, num_tokens, page_size):
  """Greedy generation with the runner's programs; one packed call, then decode steps."""
  alloc = PageAllocator(runner.shape.num_pages, page_size, reserved=1)
  tables = [alloc.ensure(i, len(p) + num_tokens) for i, p in enumerate(prompts)]
  n = len(prompts)
  first = np.asarray(runner.packed(prompts, [0] * n, tables, SamplingRows.greedy(n)).tokens)[:n]
  out = [[int(t)] for t in first]
  for step in range(1, num_tokens):
    positions = [len(p) + step - 1 for p in prompts]
    nxt = np.asarray(runner.decode([o[-1] for o in out], positions, tables,
                                   SamplingRows.greedy(n)).tokens)[:n]
    for o, t in zip(out, nxt):
      o.append(int(t))
  for i in range(n):
    alloc.free(i)
  alloc.check()
  assert alloc.num_free == alloc.capacity
  return out


@pytest.mark.parametrize("tp", [1, 4])
def test_greedy_matches_reference_forward(model, tp):
  rng = np.random.default_rng(tp)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (1, 5, 8, 9, 16, 23, 31, 40)]
  mesh = sharding.make_mesh(jax.devices()[:tp])
  runner = InstanceRunner(model, mesh, SHAPE)
  if tp == 4:
    assert runner.pool.sharding.spec[1] == "tp"  # KV heads split over the mesh
  got = generate(runner, prompts, 48, SHAPE.page_size)
  want = pdj.greedy_reference(model, prompts, 48)
  assert got == want


@pytest.mark.parametrize("heads, kv_heads, tp, split", [
    (8, 2, 4, "kv_replicated"),  # each device reads the one KV head its q heads use
    (6, 2, 4, "none"),  # 6 q heads do not split 4 ways: all heads on every device
    (8, 4, 2, "heads"),
])
def test_attention_splits_over_heads(heads, kv_heads, tp, split):
  """The kernels run per tp shard of the heads (a shard_map: XLA cannot partition a
  Pallas call), in each way heads and devices can divide, with the reference's
  tokens."""
  cfg = pdj.get_preset("tiny").replace(num_heads=heads, num_kv_heads=kv_heads, head_dim=8)
  model = pdj.random_model(cfg, seed=3, std=0.25)
  mesh = sharding.make_mesh(jax.devices()[:tp])
  assert programs._head_split(mesh, cfg) == split
  shape = RunnerShape(page_size=8, num_pages=40, max_rows=4, max_step_tokens=64, max_seq_len=64,
                      min_step_tokens=64)
  rng = np.random.default_rng(tp)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 17, 30)]
  got = generate(InstanceRunner(model, mesh, shape), prompts, 12, shape.page_size)
  assert got == pdj.greedy_reference(model, prompts, 12)


@pytest.mark.slow
@pytest.mark.parametrize("impl, tp, kv_heads", [("pallas_gpu_interpret", 2, 4),
                                                ("pallas_tpu_interpret", 4, 2)])
def test_pallas_kernels_in_the_sharded_programs(impl, tp, kv_heads):
  """The kernels an accelerator runs (here interpreted) inside the programs, per tp
  shard of the heads, give the reference forward's tokens."""
  cfg = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=kv_heads, head_dim=16)
  model = pdj.random_model(cfg, seed=3, std=0.25)
  shape = RunnerShape(page_size=8, num_pages=40, max_rows=4, max_step_tokens=64, max_seq_len=64,
                      min_step_tokens=64)
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:tp]), shape,
                          attn_impl=impl)
  prompts = [[1, 2, 3], list(range(5, 22))]
  assert generate(runner, prompts, 6, shape.page_size) == pdj.greedy_reference(model, prompts, 6)


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_calls_mix_chunks_and_decode_rows(model, tp):
  """One packed call carries decode rows, a prompt chunk at a non-zero start and a
  whole prompt, in any order, and every row continues as the reference does."""
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:tp]), SHAPE)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (9, 20, 33, 7)]
  want = pdj.greedy_reference(model, prompts, 6)
  alloc = PageAllocator(SHAPE.num_pages, SHAPE.page_size, reserved=1)
  tables = [alloc.ensure(i, len(p) + 6) for i, p in enumerate(prompts)]
  g = lambda n: SamplingRows.greedy(n)
  take = lambda out, n: np.asarray(out.tokens)[:n].tolist()
  # Prompts 0 and 1 whole, and the first 12 tokens of prompt 2.
  first = take(runner.packed([prompts[0], prompts[1], prompts[2][:12]], [0, 0, 0],
                             tables[:3], g(3)), 3)
  out = {0: [first[0]], 1: [first[1]]}
  # Decode rows of 1 and 0, the rest of prompt 2 from token 12, all of prompt 3.
  mixed = take(runner.packed([[out[1][-1]], prompts[2][12:], [out[0][-1]], prompts[3]],
                             [len(prompts[1]), 12, len(prompts[0]), 0],
                             [tables[1], tables[2], tables[0], tables[3]], g(4)), 4)
  out[1].append(mixed[0])
  out[2] = [mixed[1]]
  out[0].append(mixed[2])
  out[3] = [mixed[3]]
  while any(len(o) < 6 for o in out.values()):
    ids = [i for i in range(4) if len(out[i]) < 6]
    nxt = take(runner.decode([out[i][-1] for i in ids],
                             [len(prompts[i]) + len(out[i]) - 1 for i in ids],
                             [tables[i] for i in ids], g(len(ids))), len(ids))
    for i, t in zip(ids, nxt):
      out[i].append(t)
  assert [out[i] for i in range(4)] == want


def test_chunked_prefill_matches_whole_prefill(model):
  mesh = sharding.make_mesh(jax.devices()[:2])
  runner = InstanceRunner(model, mesh, SHAPE)
  prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, 37).tolist()
  alloc = PageAllocator(SHAPE.num_pages, SHAPE.page_size, reserved=1)
  table = alloc.ensure("r", 40)
  g = SamplingRows.greedy(1)
  for start, end in ((0, 16), (16, 21), (21, 37)):
    tok = int(np.asarray(runner.packed([prompt[start:end]], [start], [table], g).tokens)[0])
  assert tok == pdj.greedy_reference(model, [prompt], 1)[0][0]


def test_sampling_is_reproducible_and_seed_dependent(model):
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:1]), SHAPE)
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]
  alloc = PageAllocator(SHAPE.num_pages, SHAPE.page_size, reserved=1)
  table = alloc.ensure("r", 16)

  def draw(seed, temperature=1.0, top_k=0, top_p=1.0, batch_mates=0):
    rows = SamplingRows(np.full(1 + batch_mates, temperature, np.float32),
                        np.full(1 + batch_mates, top_k, np.int32),
                        np.full(1 + batch_mates, top_p, np.float32),
                        np.arange(seed, seed + 1 + batch_mates, dtype=np.int32),
                        np.zeros(1 + batch_mates, np.int32))
    n = 1 + batch_mates
    return [int(np.asarray(runner.packed([prompt] * n, [0] * n, [table] * n, rows).tokens)[0])
            for _ in range(1)][0]

  draws = [draw(s) for s in range(40)]
  assert draws == [draw(s) for s in range(40)]  # same seed, same token
  assert draw(11, batch_mates=3) == draws[11]  # batch composition does not matter
  assert len(set(draws)) > 5  # temperature 1 over random logits spreads out
  greedy = int(np.asarray(runner.packed([prompt], [0], [table], SamplingRows.greedy(1)).tokens)[0])
  assert {draw(s, top_k=1) for s in range(10)} == {greedy}
  assert {draw(s, top_p=1e-6) for s in range(10)} == {greedy}
  assert set(draw(s, top_k=3) for s in range(40)) <= set(
      np.argsort(-np.asarray(pdj.forward(model, np.array([prompt])))[0, -1])[:3].tolist())


def test_no_compilation_after_warmup(model):
  shape = RunnerShape(page_size=8, num_pages=200, max_rows=8, max_step_tokens=128, max_seq_len=64)
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:2]), shape)
  runner.warmup()
  rng = np.random.default_rng(0)
  alloc = PageAllocator(shape.num_pages, shape.page_size, reserved=1)
  with CompileCounter() as counter:
    served = 0
    while served < 200:
      nb = int(rng.integers(1, 5))
      prompts = [rng.integers(0, CFG.vocab_size, int(rng.integers(1, 33))).tolist()
                 for _ in range(nb)]
      tables = [alloc.ensure((served, i), len(p) + 3) for i, p in enumerate(prompts)]
      first = np.asarray(runner.packed(prompts, [0] * nb, tables, SamplingRows.greedy(nb)).tokens)
      runner.decode(first[:nb].tolist(), [len(p) for p in prompts], tables,
                    SamplingRows.greedy(nb))
      for i in range(nb):
        alloc.free((served, i))
      served += nb
  assert counter.count == 0, f"{counter.count} compilations after warm-up"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_marks_non_finite_rows(temperature):
  from pdserve_jax.runtime.sampling import sample
  B, V = 6, 50
  logits = np.random.default_rng(0).normal(size=(B, V)).astype(np.float32) * 3
  logits[1, 7] = np.nan
  logits[3, 20] = np.inf
  logits[4, 0] = -np.inf
  temps = np.full(B, temperature, np.float32)
  top_k = np.array([0, 0, 5, 0, 0, 10], np.int32)
  top_p = np.array([1.0, 1.0, 0.9, 1.0, 1.0, 0.5], np.float32)
  seeds = np.arange(B, dtype=np.int32) + 100
  index = np.full(B, 3, np.int32)
  fn = jax.jit(sample)
  got = np.asarray(fn(logits, temps, top_k, top_p, seeds, index)[0])
  assert got.dtype == np.int32
  assert got[[1, 3, 4]].tolist() == [-1, -1, -1]
  good = [0, 2, 5]
  # A finite row's token does not depend on its batch mates, bad or not.
  alone = np.asarray(fn(logits[good], temps[good], top_k[good], top_p[good], seeds[good],
                        index[good])[0])
  assert got[good].tolist() == alone.tolist()
  if temperature == 0:
    assert got[good].tolist() == np.argmax(logits[good], axis=-1).tolist()
  else:
    assert all(0 <= t < V for t in got[good])
    assert got[2] in np.argsort(-logits[2])[:5]
