"""No thread that serving started outlives its close (issue 24, item 11).

CPython (3.11 to 3.13) ends a daemon thread that wants the GIL back while the
interpreter finalizes with `pthread_exit`; when that thread is inside jaxlib's C++
(`jax.block_until_ready` waiting with the GIL released), the forced unwind meets a
C++ frame that does not let it pass and the process aborts at exit ("terminate
called after throwing an instance of ''", "FATAL: exception not rethrown", exit code
134) after its work is done. `benchmarks/native_abort.py` shows it with jax alone.
So every thread that calls into jax ends before `close()` returns: the engine
thread, each device group's and each copy destination's `Watcher`, and a worker's
command thread. These tests fail if any of them is left running.
"""

import threading
import time

import pytest

import pdserve_jax as pdj
from pdserve_jax.cluster.worker import Worker


def _ours():
  return [t for t in threading.enumerate() if t.name.startswith("pdserve")]


@pytest.mark.slow
def test_no_engine_thread_outlives_close_with_steps_in_flight():
  """Disaggregated, so a copy watcher runs too; closed with a zero deadline while
  steps and copies are in flight (the requests are aborted)."""
  assert not _ours()
  model = pdj.random_model(pdj.get_preset("tiny"), seed=0)
  spec = pdj.InstanceSpec(tp=1, max_batch=4, max_step_tokens=64)
  engine = pdj.Engine(model, pdj.Disaggregated(spec, spec),
                      pdj.EngineConfig(max_seq_len=64, num_pages=16, page_size=16,
                                       warmup=False))
  handles = [engine.submit([1, 2, 3, 4], pdj.SamplingParams(max_tokens=40, ignore_eos=True))
             for _ in range(4)]
  deadline = time.monotonic() + 300
  while not any(len(h.token_times()[0]) > 1 for h in handles):  # decoding, copies done
    assert time.monotonic() < deadline, "no request decoded"
    time.sleep(0.01)
  assert {"pdserve-engine", "pdserve-watch-prefill0", "pdserve-watch-decode0",
          "pdserve-copies-decode0"} <= {t.name for t in _ours()}
  engine.close(timeout=0)
  assert not _ours(), [t.name for t in _ours()]


def test_a_stopped_worker_leaves_no_thread():
  worker = Worker(pdj.random_model(pdj.get_preset("tiny"), seed=0), "decode")
  serving = threading.Thread(target=worker.serve, name="pdserve-test-worker")
  serving.start()
  deadline = time.monotonic() + 60
  while "pdserve-worker-commands" not in {t.name for t in _ours()}:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  worker.stop()
  serving.join(60)
  assert not _ours(), [t.name for t in _ours()]
