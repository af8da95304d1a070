"""absl apps: serve, simulate, plan, sweep (one workload block, one result schema),
profile, train_demo; `common`, `modes`, `serving`, `simulation` and `figures` are
what they share."""
