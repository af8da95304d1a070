"""The in-process JAX side: the engine loop (`engine`), the JAX executor that runs a
coordinator's steps with real programs (`executor`), the engine's runtime knobs
(`config`), and per-request output processing (`output`)."""
