"""The one result file every app writes: runs with per-request records, the config,
versions, git commit and device, in the shape of `result_schema.json`.

    doc = results.document("sweep", config_dict, runs, plots=[...])
    results.write(path, doc)

A run is one workload served once, by the engine or the simulator
(`run_record`). Times in a run are seconds from its first arrival. Non-finite
numbers become null (JSON has no inf). Nothing here fails for want of git or a
device: those fields become null. `validate` needs `jsonschema` (the test extra).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence

from pdserve_jax.core import metrics
from pdserve_jax.core.request import Request

SCHEMA_VERSION = 1
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "result_schema.json")
# Distribution names whose versions a result records, by the key it uses.
PACKAGES = {"pdserve_jax": "pdserve_jax", "jax": "jax", "jaxlib": "jaxlib", "numpy": "numpy",
            "ml_collections": "ml_collections", "absl": "absl-py"}


def request_record(r: Request, t0: float) -> dict:
  """One request: times from `t0` (s), lengths, how it ended."""
  rel = lambda t: None if t is None else t - t0
  return {"id": r.request_id, "arrival_s": rel(r.arrival_time),
          "first_token_s": rel(r.token_times[0] if r.token_times else None),
          "finish_s": rel(r.finish_time), "prompt_tokens": r.prompt_len,
          "output_tokens": r.num_output, "max_tokens": r.max_tokens,
          "finish_reason": r.finish_reason, "ttft_s": r.ttft, "tpot_s": r.tpot,
          "preemptions": r.num_preemptions}


def run_record(mode: str, executor: str, deployment, rate: Optional[float],
               requests: Sequence[Request], ttft_slo: float, tpot_slo: float,
               share_history: Sequence = (), **extra) -> dict:
  """One run: `requests` served (finished copies with token times) by `executor`
  ("engine" or "simulator") as `deployment` of `mode`, at `rate` requests/s (None:
  a trace's recorded arrivals). `share_history` is [(time, prefill share)] on the
  requests' clock; entries before the first arrival collapse into the share in
  force then. `extra`: the schema's optional run keys."""
  t0 = min(r.arrival_time for r in requests)
  shares = [(max(t - t0, 0.0), x) for t, x in share_history]
  start = [p for p in shares if p[0] == 0.0][-1:]
  shares = start + [p for p in shares if p[0] > 0.0]
  return dict(mode=mode, executor=executor, deployment=deployment.describe(),
              num_devices=deployment.num_devices, rate_rps=rate,
              summary=metrics.summarize(requests, ttft_slo, tpot_slo),
              preemptions=sum(r.num_preemptions for r in requests),
              share_history=[list(p) for p in shares],
              requests=[request_record(r, t0) for r in requests], **extra)


def git_commit(path: str = os.path.dirname(os.path.abspath(__file__))):
  """(commit, dirty) of the checkout holding this package, or (None, None)."""
  def git(*args):
    return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    # Only this package's own checkout counts, not some repository around a
    # site-packages folder.
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(
        os.path.dirname(path)):
      return None, None
    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
  except Exception:  # noqa: BLE001 - no git, no checkout, a timeout: unknown, never fatal
    return None, None


def versions() -> dict:
  out = {"python": platform.python_version()}
  for key, dist in PACKAGES.items():
    try:
      out[key] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[key] = None
  return out


def device() -> Optional[dict]:
  """The JAX backend's platform, device kind and device count (imports jax)."""
  try:
    import jax
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "count": len(devices)}
  except Exception:  # noqa: BLE001 - a broken backend must not lose the results
    return None


def document(app: str, config: dict, runs: Sequence[dict], plots: Sequence[str] = (),
             plan: Optional[dict] = None, wall_seconds: Optional[float] = None,
             reproduce: Optional[dict] = None, knee: Optional[dict] = None) -> dict:
  """The result of one app invocation, JSON-ready (see `result_schema.json`)."""
  commit, dirty = git_commit()
  doc = {"schema_version": SCHEMA_VERSION, "app": app,
         "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "command": list(sys.argv), "config": config, "versions": versions(),
         "git_commit": commit, "git_dirty": dirty, "device": device(),
         "wall_seconds": wall_seconds, "runs": list(runs), "plan": plan,
         "reproduce": reproduce, "knee": knee,
         "plots": [os.path.abspath(p) for p in plots]}
  return _clean(doc)


def _clean(v):
  """Plain JSON values: tuples as lists, numpy scalars as numbers, inf/NaN as None."""
  if isinstance(v, dict):
    return {str(k): _clean(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  if isinstance(v, bool) or v is None or isinstance(v, str):
    return v
  if hasattr(v, "item"):  # numpy scalar
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def write(path: str, doc: dict) -> str:
  """Writes `doc` as JSON (creating the folder); returns the path."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with open(path, "w") as f:
    json.dump(doc, f, indent=1, allow_nan=False)
  return path


def schema() -> dict:
  with open(SCHEMA_PATH) as f:
    return json.load(f)


def validate(doc: dict) -> None:
  """Raises jsonschema.ValidationError when `doc` does not fit the schema."""
  import jsonschema

  jsonschema.Draft202012Validator(schema()).validate(doc)
