"""absl apps, each run as `python -m pdserve_jax.cli.<app> --config=<file>`.

Apps: `serve` (the engine on a workload, each mode; `--role` for worker processes),
`simulate` (the simulator, each mode), `plan` (placements ranked by goodput per
device), `sweep` (attainment vs rate, engine beside simulator), `reproduce` (the
papers' figures), `profile` (a latency model from this library's programs),
`tpu_cost` (XLA's cost tables for a TPU topology), `api` (the OpenAI-compatible
server, or its router and workers), `bench` (a workload against any such endpoint),
`train_demo` (the demo model). They share one workload block, one set of mode names
and one result file.

Helpers: `common` (flags, config checks, one-line errors), `deployments` (mode names
and config blocks -> deployments), `engine_runs` (the engine side: model, engine,
serving a workload), `sim_runs` (the simulator side: a setup, a simulated run) and
`figures` (which PNGs a run draws). docs/guide.md describes them all.
"""
