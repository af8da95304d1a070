"""The native abort at exit of issue 24 (item 11), with jax alone.

A script whose daemon thread is inside `jax.block_until_ready` (the GIL released,
in jaxlib's C++) when the main thread returns: CPython 3.11 to 3.13 end such a
thread with `pthread_exit` once it wants the GIL back during finalization, and the
forced unwind through jaxlib's C++ frames aborts the process ("terminate called
after throwing an instance of ''", "FATAL: exception not rethrown", exit code 134)
after all its work was done. Joining the thread before exit avoids it; so the
serving code joins every thread that calls into jax when it closes
(`serving.local.Watcher.close`, `Engine.close`, `cluster.worker.Worker.serve`;
tests/test_clean_exit.py holds it to that).

  python benchmarks/native_abort.py [--runs=3]

prints the exit codes of `--runs` runs of each variant (CPU; about 10 s a run).
"""

import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_integer("runs", 3, "runs of each variant")

CHILD = r"""
import sys, threading
import jax, jax.numpy as jnp
x = jnp.ones((1500, 1500))
f = jax.jit(lambda x: [x := jnp.tanh(x @ x) for _ in range(20)][-1])
f(x).block_until_ready()  # compiled
y = f(x)  # dispatched: runs for a while
t = threading.Thread(target=lambda: jax.block_until_ready(y), daemon=True)
t.start()
if sys.argv[1] == "join":
  t.join()
"""


def main(_):
  print(f"python {sys.version.split()[0]}, jax {__import__('jax').__version__}")
  for variant in ("exit", "join"):
    codes = []
    for _ in range(flags.FLAGS.runs):
      proc = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      fatal = "exception not rethrown" in proc.stderr
      codes.append(f"{proc.returncode}{' (FATAL: exception not rethrown)' if fatal else ''}")
    what = ("daemon thread still in block_until_ready at exit" if variant == "exit" else
            "thread joined before exit")
    print(f"{what:<50} exit codes: {', '.join(codes)}")


if __name__ == "__main__":
  app.run(main)
