"""Warm-up: few programs per instance, nothing compiled after it, and engines built one
after another in one process without running out of memory mappings."""

import os
import subprocess
import sys

import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.runtime.programs import CompileCounter
from pdserve_jax.serving.config import runner_shape

CFG = pdj.get_preset("tiny")


def map_count() -> int:
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)


@pytest.fixture(scope="module")
def model():
  return pdj.random_model(CFG, seed=2, std=0.25)


def test_default_instances_compile_at_most_16_programs():
  cfg = pdj.EngineConfig()
  for spec in (pdj.InstanceSpec(), pdj.InstanceSpec(max_batch=64, max_step_tokens=8192),
               pdj.InstanceSpec(max_batch=512, max_step_tokens=2048)):
    shape = runner_shape(cfg, spec, cfg.num_pages)
    programs = len(shape.compiled_packed_shapes()) + len(shape.compiled_decode_shapes())
    assert programs <= 16, (spec, shape.token_buckets, shape.decode_batches)
    # A packed call holds a whole step: the token budget, or a longest prompt alone.
    assert shape.max_step_tokens == min(max(spec.max_step_tokens, cfg.max_seq_len),
                                        (cfg.num_pages - 1) * cfg.page_size)


@pytest.mark.parametrize("deployment", [
    pdj.Colocated(pdj.InstanceSpec(tp=2, max_batch=8, max_step_tokens=40), policy="chunked"),
    pdj.Disaggregated(pdj.InstanceSpec(tp=1, max_batch=8, max_step_tokens=96),
                      pdj.InstanceSpec(tp=2, max_batch=8, max_step_tokens=96)),
], ids=["colocated_chunked", "disaggregated"])
def test_nothing_compiles_after_warmup_over_200_mixed_requests(model, deployment):
  """Mixed steps (chunks at any offset beside decode rows), varied lengths, batch
  sizes and sampling: every call lands in a program warm-up compiled."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, CFG.vocab_size, int(rng.integers(1, 60))).tolist()
             for _ in range(200)]
  params = [pdj.SamplingParams(max_tokens=int(rng.integers(1, 12)), seed=i,
                               temperature=float(rng.choice([0.0, 0.7])),
                               top_k=int(rng.choice([0, 5])), ignore_eos=True)
            for i in range(200)]
  cfg = pdj.EngineConfig(page_size=8, num_pages=96, max_seq_len=72, min_token_bucket=16)
  with pdj.Engine(model, deployment, cfg) as engine:
    with CompileCounter() as counter:
      results = engine.generate(prompts, params)
    assert engine.pages_in_use() == 0
  assert [len(r.token_ids) for r in results] == [p.max_tokens for p in params]
  assert counter.count == 0, f"{counter.count} compilations after warm-up"


# Run in a process of its own: a test process has mapped every executable of the tests
# before it, and the point is what one notebook-like process reaches.
_ENGINES_ONE_AFTER_ANOTHER = """
import pdserve_jax as pdj

def maps():
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)

model = pdj.random_model(pdj.get_preset("tiny"), seed=2, std=0.25)
prompts = [[1, 2, 3], list(range(40)), [7] * 20]
want = pdj.greedy_reference(model, prompts, 5)
print("start", maps(), flush=True)
for deployment in (pdj.Colocated(), pdj.Colocated(policy="chunked"),
                   pdj.Disaggregated(num_prefill=2, num_decode=1), pdj.SemiPD()):
  with pdj.Engine(model, deployment) as engine:
    got = engine.generate(prompts, pdj.SamplingParams(max_tokens=5, ignore_eos=True))
  assert [r.token_ids for r in got] == want, deployment.describe()
  print(deployment.describe(), maps(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/sys/vm/max_map_count"),
                    reason="needs Linux's /proc")
def test_engines_of_every_mode_one_after_another_stay_within_the_map_limit():
  """Default configs, warm-up on: one engine per mode (2 prefill + 1 decode included)
  built, used and closed in turn in one process, as a notebook comparing modes does;
  the process's memory mappings stay under a quarter of `vm.max_map_count`."""
  with open("/proc/sys/vm/max_map_count") as f:
    limit = int(f.read())
  proc = subprocess.run([sys.executable, "-c", _ENGINES_ONE_AFTER_ANOTHER],
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = [line.rsplit(" ", 1) for line in proc.stdout.splitlines()]
  assert len(counts) == 5, proc.stdout
  for what, n in counts:
    assert int(n) < limit // 4, (what, n, limit)
