"""Redraws the PNGs the docs embed (`docs/figures/`) by running the apps that draw them.

  python benchmarks/figures.py                  # every group (`make figures`)
  python benchmarks/figures.py --only=reproduce,plan

Each group runs one app with `--plots_dir` into a scratch folder, from the repository
root (the configs read `../shared/data/` relative to it), prints the app's own table,
and copies the PNGs the docs use into `docs/figures/<group>/`. A PNG the app did not
write is an error naming it: a renamed plot must not leave a stale picture behind.

  reproduce  DistServe Figure 1 and the OPT-13B chatbot panel (simulator; deterministic)
  plan       the planner's goodput per placement, OPT-13B on 8 A100s (simulator;
             deterministic)
  sweep      attainment against rate, engine beside simulator, the `small` model on
             this machine's CPU (real programs: the curves near saturation move with
             the machine's load)

About 2-12, 11-20 and 2-5 minutes on 2 shared cores, by the load; docs/figures.md
records the last run.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "figures")

# group -> (the app's arguments, the PNGs it writes that the docs embed)
GROUPS = {
    "reproduce": (["pdserve_jax.cli.reproduce",
                   "--config.experiments=distserve_fig1,distserve_chatbot_opt13b"],
                  ["distserve_fig1_attainment.png", "distserve_chatbot_opt13b_attainment.png",
                   "distserve_chatbot_opt13b_goodput.png"]),
    "plan": (["pdserve_jax.cli.plan", "--config=configs/plan_opt13b.py"],
             ["planner_goodput.png"]),
    "sweep": (["pdserve_jax.cli.sweep", "--config=configs/sweep_demo.py"],
              ["attainment_vs_rate.png", "latency_cdf_rate40.png",
               "share_over_time_engine.png"]),
}


def _env() -> dict:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")  # the sweep's engines: this machine's CPU
  if importlib.util.find_spec("pdserve_jax") is None:  # a bare checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def run_group(name: str, scratch: str) -> list:
  args, wanted = GROUPS[name]
  plots = os.path.join(scratch, name)
  cmd = [sys.executable, "-m", *args, f"--plots_dir={plots}"]
  print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=_env())
  if proc.returncode != 0:
    raise SystemExit(f"figures: {name}: the app exited with {proc.returncode}")
  missing = [f for f in wanted if not os.path.exists(os.path.join(plots, f))]
  if missing:
    raise SystemExit(f"figures: {name}: the app wrote no {', '.join(missing)} "
                     f"(it wrote {sorted(os.listdir(plots))})")
  dest = os.path.join(OUT, name)
  os.makedirs(dest, exist_ok=True)
  out = []
  for f in wanted:
    shutil.copyfile(os.path.join(plots, f), os.path.join(dest, f))
    out.append(os.path.relpath(os.path.join(dest, f), ROOT))
  print(f"   {name}: {time.perf_counter() - start:.0f} s; wrote {', '.join(out)}", flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(GROUPS),
                 help=f"comma-separated groups, of {', '.join(GROUPS)}")
  names = [n for n in p.parse_args().only.split(",") if n]
  unknown = sorted(set(names) - set(GROUPS))
  if unknown:
    p.error(f"--only: unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
  with tempfile.TemporaryDirectory(prefix="pdserve_figures_") as scratch:
    for name in names:
      run_group(name, scratch)


if __name__ == "__main__":
  main()
