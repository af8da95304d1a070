"""Read by the type checker, never run: every executor and placement satisfies the
seam's Protocols (`make lint` runs mypy over this file with the modules it names).

A method renamed, dropped or given another signature on any of them fails the lint.
"""

from pdserve_jax.cluster.router import WorkerPlacement
from pdserve_jax.core import seam
from pdserve_jax.serving.executor import JaxExecutor, Placement
from pdserve_jax.serving.local import LocalPlacement
from pdserve_jax.sim.simulator import LatencyExecutor
from test_coordinator import ManualExecutor


def conforms(engine: JaxExecutor, simulator: LatencyExecutor, by_hand: ManualExecutor,
             local: LocalPlacement, workers: WorkerPlacement) -> None:
  executors: list[seam.Executor] = [engine, simulator, by_hand]
  driven: seam.EngineExecutor = engine
  placements: list[Placement] = [local, workers]
  del executors, driven, placements
