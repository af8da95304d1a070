"""No thread that serving started outlives its close (issue 24, item 11).

CPython (3.11 to 3.13) ends a daemon thread that wants the GIL back while the
interpreter finalizes with `pthread_exit`; when that thread is inside jaxlib's C++
(`jax.block_until_ready` waiting with the GIL released), the forced unwind meets a
C++ frame that does not let it pass and the process aborts at exit ("terminate
called after throwing an instance of ''", "FATAL: exception not rethrown", exit code
134) after its work is done. `benchmarks/native_abort.py` shows it with jax alone.
So every thread that calls into jax ends before `close()` returns: the engine
thread, each device group's and each copy destination's `Watcher` (checked by
tests/test_engine.py's test_close_with_timeout_aborts_what_is_left, on an engine
it builds anyway), and a worker's command thread (here). The test fails if one is
left running.
"""

import threading
import time

import pdserve_jax as pdj
from pdserve_jax.cluster.worker import Worker


def _ours():
  return [t for t in threading.enumerate() if t.name.startswith("pdserve")]


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
