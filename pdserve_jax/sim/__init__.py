"""Hardware specs, latency models, the discrete-event simulator and the goodput
planner. The simulator drives `core.coordinator` and its policies on a virtual clock.
No JAX here (tests/test_imports.py checks it); the profiler that times real
programs is `runtime.profiler`."""
