"""Hardware specs, latency models, the profiler, the discrete-event simulator and
the goodput planner. The simulator drives `serving.coordinator` and its policies."""
