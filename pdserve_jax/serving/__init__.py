"""Requests and steps, per-instance batch policies, semi-PD controllers and mode
coordinators (all shared with the simulator, none touching arrays), validation,
metrics, and the JAX side: the executor and the engine."""
