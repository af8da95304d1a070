"""`EngineConfig` (the runtime knobs a deployment does not say) and the checks of
whether an engine can serve a deployment here.

Limits: SM-partitioned semi-PD (`concurrent=True`) is refused with the reason, as
JAX has no MPS-style SM caps; pipeline stages and layer groups must divide the
model's layers, and tp must divide or be a multiple of its KV heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pdserve_jax.core import deploy
from pdserve_jax.runtime.buckets import RunnerShape


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Runtime knobs: what the deployment does not say (pool, buckets, kernels)."""
  page_size: int = 16
  num_pages: int = 256  # per device group; page 0 is scratch
  max_seq_len: int = 512  # prompt + output
  attn_impl: str = "auto"
  warmup: bool = True
  log_steps: bool = False  # keep a `StepRecord` of every step and an event log
  # Smallest packed-call bucket (tokens): raising it trades padding for fewer programs.
  min_token_bucket: int = 64
  # SLOs (seconds): semi-PD's partitioner steers by them; reports count attainment.
  ttft_slo: float = 1.0
  tpot_slo: float = 0.1
  # Requests submitted and not yet finished; `submit` beyond it raises EngineOverloaded.
  max_queued: int = 1024
  # Prefix caching: full prompt pages are kept and shared by prompts that start with
  # the same tokens (`core.pages`, docs/prefix_cache.md).
  prefix_cache: bool = True

  def check(self) -> None:
    for f in ("page_size", "max_seq_len", "min_token_bucket", "max_queued"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{f} must be an int >= 1, got {v!r}")
    if not isinstance(self.num_pages, int) or self.num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {self.num_pages!r}")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len={self.max_seq_len} must be a multiple of "
                       f"page_size={self.page_size}")
    if not isinstance(self.prefix_cache, bool):
      raise ValueError(f"prefix_cache must be a bool, got {self.prefix_cache!r}")
    if not self.ttft_slo > 0 or not self.tpot_slo > 0:
      raise ValueError(f"SLOs must be positive, got ttft_slo={self.ttft_slo}, "
                       f"tpot_slo={self.tpot_slo}")


def check_servable(deployment, model_config, num_devices: Optional[int] = None) -> None:
  """Raises ValueError naming why the engine cannot run `deployment` for a model of
  `model_config`; with `num_devices`, also when it needs more devices than that."""
  if not isinstance(deployment, (deploy.Colocated, deploy.Disaggregated, deploy.SemiPD)):
    raise ValueError(f"the engine serves Colocated, Disaggregated or SemiPD deployments, "
                     f"got {type(deployment).__name__}")
  deployment.check()
  specs = (list(deployment.instance_specs())
           if isinstance(deployment, deploy.Disaggregated) else [deployment.instance])
  for s in specs:
    s.check_layers(model_config.num_layers)
    heads = model_config.num_kv_heads
    if heads % s.tp and s.tp % heads:
      raise ValueError(f"tp={s.tp} neither divides nor is a multiple of the model's "
                       f"{heads} KV heads")
  if isinstance(deployment, deploy.SemiPD) and deployment.concurrent:
    raise ValueError("SM-partitioned semi-PD (concurrent=True) needs MPS-style SM caps, "
                     "which JAX lacks; the engine time-shares (concurrent=False)")
  if num_devices is not None and deployment.num_devices > num_devices:
    raise ValueError(f"{deployment.describe()} needs {deployment.num_devices} devices; "
                     f"{num_devices} available")


def max_prompt_len(deployment, cfg: EngineConfig) -> int:
  """The longest prompt an engine of `deployment` and `cfg` takes."""
  if isinstance(deployment, deploy.Colocated) and deployment.policy == "chunked":
    return cfg.max_seq_len - 1
  spec = deployment.prefill if isinstance(deployment, deploy.Disaggregated) else \
      deployment.instance
  return min(spec.max_step_tokens, cfg.max_seq_len - 1)


def runner_shape(cfg: EngineConfig, spec: deploy.InstanceSpec, num_pages: int) -> RunnerShape:
  """The buckets of an instance: a packed call holds a step's whole token budget, or
  a prompt (a recomputation) of up to `max_seq_len` running alone; never more
  tokens than the pool holds, as each writes its K/V to a page."""
  pool_tokens = (num_pages - 1) * cfg.page_size
  return RunnerShape(page_size=cfg.page_size, num_pages=num_pages,
                     max_rows=spec.max_batch,
                     max_step_tokens=min(max(spec.max_step_tokens, cfg.max_seq_len),
                                         pool_tokens),
                     max_seq_len=cfg.max_seq_len, min_step_tokens=cfg.min_token_bucket,
                     layer_groups=spec.layer_groups)
