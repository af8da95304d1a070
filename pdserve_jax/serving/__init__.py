"""Requests, scheduling policies (shared with the simulator), the JAX executor,
engines and metrics. Nothing here below `executor`/`engine` touches arrays."""
