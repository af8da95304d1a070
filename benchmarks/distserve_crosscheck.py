"""Our simulator against DistServe's own (simdistserve), on the same request lists.

Seven placements of OPT-13B on A100-80GB with DistServe's fitted coefficients and
per-step overheads (issue 12's cross-check): Figure 1's workload (512-token
prompts, 64 output tokens, SLOs TTFT 0.4 s / TPOT 0.04 s) colocated on vLLM's and
on DistServe's coefficients, 1P + 1D and 2P + 1D; and the conversation trace
(filtered to OPT's 2,048-token context, SLOs 0.25 s / 0.1 s) as 1P tp2 + 1D tp1,
colocated tp2 (vLLM) and 1P tp2 + 1D tp2. Every instance is configured as
simdistserve configures it (`benchmarks/simulate_dist.py`): a prefill step takes
up to `max_num_tokens` prompt tokens (its memory estimate for the model and
parallelism, `../shared/data/distserve/max_num_tokens.csv`), batches are
unbounded, and its simulator tracks no KV memory (so ours gets a pool no request
list fills).

Goodput is bisected the same way on both sides (`metrics.goodput_search`,
tolerance 0.5%) on the same criterion (the share of requests meeting both SLOs, at
least 90%); only the attainment at a rate comes from each simulator, run on the
identical requests (lengths and arrival times). Ours runs twice: as it is, and
with `Setup.distserve_compat` (DistServe's 50,000-token decode cap and its
output-length convention).

DistServe's simulator is not part of this repository: fetch it and give its
folder and a Python that has simpy, pandas and numpy:

  git clone https://github.com/LLMServe/DistServe /tmp/distserve   # or any copy
  python3 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install simpy pandas numpy
  python benchmarks/distserve_crosscheck.py --simdistserve=/tmp/distserve \
      --simdistserve_python=/tmp/dsvenv/bin/python [--seeds=3] [--requests=1000]

Without --simdistserve only our two columns are printed. Needs ../shared/data.
"""

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("pdserve_jax") is None:
  sys.path.insert(0, ROOT)

from pdserve_jax import workloads  # noqa: E402
from pdserve_jax.core import deploy, metrics  # noqa: E402
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.sim import hardware, latency, simulator as sim  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")
OPT13 = get_preset("opt-13b")
A100 = hardware.get_hardware("a100-80gb")
UNBOUNDED = 10 ** 7  # simdistserve's "inf" batch sizes
# simdistserve tracks no KV memory; a pool of this many tokens holds any list here.
KV_TOKENS = 1 << 22

# name: (workload, SLOs, backend, prefill (tp, count), decode (tp, count) or None).
PLACEMENTS = {
    "fig1 colocated (vLLM)": ("fig1", (0.4, 0.04), "vllm", (1, 1), None),
    "fig1 colocated (DistServe)": ("fig1", (0.4, 0.04), "distserve", (1, 1), None),
    "fig1 1P + 1D": ("fig1", (0.4, 0.04), "distserve", (1, 1), (1, 1)),
    "fig1 2P + 1D": ("fig1", (0.4, 0.04), "distserve", (1, 2), (1, 1)),
    "conv 1P tp2 + 1D tp1": ("conv", (0.25, 0.1), "distserve", (2, 1), (1, 1)),
    "conv colocated tp2 (vLLM)": ("conv", (0.25, 0.1), "vllm", (2, 1), None),
    "conv 1P tp2 + 1D tp2": ("conv", (0.25, 0.1), "distserve", (2, 1), (2, 1)),
}

# Runs inside DistServe's environment: one simdistserve simulation of a request
# list, as its benchmarks/simulate_dist.py main() builds it (with the number of
# prefill instances, which main() fixes at one, as a parameter), and the share of
# requests meeting both SLOs from its own per-request latencies.
RUNNER = r"""
import json, sys
import simpy
from simdistserve.base.organize_data import (calculate_per_request_latency,
    organize_request_df, organize_request_event_df)
from simdistserve.base.scheduler import put_requests_with_interarrivals
from simdistserve.base.worker import WorkerConfig
from simdistserve.base.workload import (convert_absolutearrival_to_interarrival,
    convert_pd_pair_to_request)
from simdistserve.clusters.disagg import DisaggCluster
from simdistserve.clusters.vllm import VLLMCluster
from simdistserve.constants import ModelTypes
from simdistserve.estimators.memory_estimator import get_max_num_tokens

job = json.load(open(sys.argv[1]))
model = ModelTypes.model_str_to_object("facebook/opt-13b")
tp_p, tp_d = job["tp_prefill"], job["tp_decode"]
colocated = job["colocated"]  # simdistserve's VLLMCluster, on either engine's coefficients
tp_d = tp_p if colocated else tp_d
cfg = WorkerConfig(model_type=model, TP=tp_p, TP_Prefill=tp_p, TP_Decode=tp_d,
    prefill_max_batch_size=10**7, decode_max_batch_size=10**7,
    prefill_max_tokens=get_max_num_tokens(model, tp_p, 1),
    decode_max_tokens=get_max_num_tokens(model, tp_d, 1),
    enable_chunked_prefill=False, engine_type=job["backend"])
out = {}
for rate, reqs in job["lists"]:
    env = simpy.Environment()
    if colocated:
        cluster = VLLMCluster(env=env, PP=1, worker_configs=cfg)
    else:
        cluster = DisaggCluster(env=env, N_prefill_instance=job["num_prefill"],
            N_decode_instance=job["num_decode"], PP_prefill=1, PP_decode=1,
            worker_configs=cfg)
    cluster.run()
    requests = convert_pd_pair_to_request([(r[1], r[2]) for r in reqs])
    arrival = convert_absolutearrival_to_interarrival([r[0] for r in reqs])
    put_requests_with_interarrivals(env, cluster.scheduler, arrival, requests)
    env.run()
    lat = calculate_per_request_latency(organize_request_event_df(requests),
                                        organize_request_df(requests).output_lens)
    ok = ((lat["first_token_latency"] <= job["ttft_ms"])
          & (lat["tpot"] <= job["tpot_ms"])).sum()
    out[str(rate)] = float(ok) / len(reqs)
print(json.dumps(out))
"""


def max_num_tokens(tp: int) -> int:
  """simdistserve's prefill token budget for OPT-13B at `tp` (pp 1)."""
  with open(os.path.join(DATA, "distserve", "max_num_tokens.csv")) as f:
    for row in csv.DictReader(f):
      if row["model"] == "facebook/opt-13b" and int(row["tp"]) == tp and row["pp"] == "1":
        return int(row["max_num_tokens"])
  raise ValueError(f"no max_num_tokens for opt-13b tp{tp}")


def deployment(p):
  _, _, _, (ptp, n_p), dec = p
  spec = lambda tp: deploy.InstanceSpec(tp, 1, UNBOUNDED, max_num_tokens(tp))
  if dec is None:
    return deploy.Colocated(spec(ptp), n_p)
  return deploy.Disaggregated(spec(ptp), spec(dec[0]), n_p, dec[1])


def workload(kind: str, n: int):
  """(rate, seed) -> requests; conversation-trace rows beyond OPT's context dropped."""
  if kind == "fig1":
    return lambda rate, seed: workloads.synthetic(n, rate, workloads.Fixed(512),
                                                  workloads.Fixed(64), seed=seed)
  trace = workloads.load_csv_trace(os.path.join(DATA, "traces", "splitwise_conv.csv"))
  trace = trace.filter(OPT13.max_position_embeddings)
  return lambda rate, seed: trace.requests(n=n, rate=rate, sample=True, seed=seed)


class DistServeSim:
  """Attainment at a rate from simdistserve, run in its own Python, cached."""

  def __init__(self, folder, python):
    self.folder, self.python = folder, python

  def attainment(self, p, reqs, rate):
    _, (ttft, tpot), backend, (ptp, n_p), dec = p
    job = dict(backend=backend, colocated=dec is None, tp_prefill=ptp, num_prefill=n_p,
               tp_decode=dec[0] if dec else ptp, num_decode=dec[1] if dec else 1,
               ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3,
               lists=[[rate, [[r.arrival_time, r.prompt_len, r.max_tokens] for r in reqs]]])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
      json.dump(job, f)
    try:
      proc = subprocess.run([self.python, "-c", RUNNER, f.name], cwd=self.folder,
                            capture_output=True, text=True, check=False)
    finally:
      os.unlink(f.name)
    if proc.returncode:
      raise RuntimeError(f"simdistserve failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])[str(rate)]


def ours(p, compat: bool):
  kind = p[2]
  setup = sim.Setup(OPT13, A100, latency.latency_source(kind, OPT13, A100,
                                                        overheads="distserve"),
                    kv_tokens=KV_TOKENS, distserve_compat=compat)
  dep = deployment(p)
  ttft, tpot = p[1]
  return lambda reqs, rate: sim.simulate(reqs, setup, dep, ttft, tpot).attainment(ttft, tpot)


def goodput(att, make, seed, tol):
  """Goodput (req/s, whole placement) by `metrics.goodput_search` on `att`."""
  return metrics.goodput_search(lambda rate: att(make(rate, seed), rate), 0.9, lo=1.0, hi=8.0,
                                tol=tol)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--simdistserve", default="", help="folder holding simdistserve/")
  parser.add_argument("--simdistserve_python", default=sys.executable)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--requests", type=int, default=1000)
  parser.add_argument("--tol", type=float, default=0.005)
  parser.add_argument("--only", default="", help="comma-separated placement names")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  if not os.path.isdir(DATA):
    print(f"shared data not found at {DATA}; nothing to compare")
    return
  ds = DistServeSim(args.simdistserve, args.simdistserve_python) if args.simdistserve else None
  names = [n for n in PLACEMENTS if not args.only or n in args.only.split(",")]
  print(f"OPT-13B, A100-80GB, DistServe coefficients and overheads; {args.requests} requests "
        f"per seed, seeds 0-{args.seeds - 1}; goodput per GPU (req/s), mean over seeds")
  head = f"{'placement':<42}{'GPUs':>5}{'ours':>8}{'ours compat':>13}"
  print(head + (f"{'simdistserve':>14}{'ours/DS':>9}{'compat/DS (per seed)':>30}" if ds else ""))
  out = {}
  for name in names:
    p = PLACEMENTS[name]
    dep = deployment(p)
    make = workload(p[0], args.requests)
    start = time.perf_counter()
    row = {"ours": [], "compat": [], "simdistserve": []}
    for seed in range(args.seeds):
      row["ours"].append(goodput(ours(p, False), make, seed, args.tol) / dep.num_devices)
      row["compat"].append(goodput(ours(p, True), make, seed, args.tol) / dep.num_devices)
      if ds:
        att = lambda reqs, rate: ds.attainment(p, reqs, rate)
        row["simdistserve"].append(goodput(att, make, seed, args.tol) / dep.num_devices)
    mean = lambda v: sum(v) / len(v)
    line = (f"{name:<42}{dep.num_devices:>5}{mean(row['ours']):>8.3f}"
            f"{mean(row['compat']):>13.3f}")
    if ds:
      ratios = [c / d for c, d in zip(row["compat"], row["simdistserve"])]
      line += (f"{mean(row['simdistserve']):>14.3f}"
               f"{mean(row['ours']) / mean(row['simdistserve']):>9.3f}"
               f"{'  ' + ' '.join(f'{r:.3f}' for r in ratios):>30}")
    print(line + f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    out[name] = dict(row, num_devices=dep.num_devices)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
