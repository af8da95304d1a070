"""The decisions, written once for the engine and the simulator: requests and steps,
page bookkeeping, per-instance batch policies, mode coordinators, semi-PD share
control, deployments, sampling parameters and their checks, metrics, and the seam
(`core.seam`: the Executor Protocol and the event records).

Never imports jax (tests/test_imports.py imports every module here with jax blocked):
what runs on devices lives in `serving/`, `cluster/` and `runtime/`, and reaches these
objects only through the seam.
"""
