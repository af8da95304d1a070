"""The absl apps as a user runs them: each with its default config and an override,
writing result JSON that validates against `result_schema.json`, and each bad
flag or config value ending in one line on stderr that names it."""

import json
import os
import subprocess
import sys
import tempfile

import ml_collections
import pytest

from pdserve_jax import results, workloads
from pdserve_jax.cli import common, deployments

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "configs")
DEMO = os.path.join(ROOT, "pdserve_jax", "assets", "demo_model", "pdserve_config.json")
# The engine apps on the tiny model with few shape buckets: seconds of compilation.
TINY_ENGINE = ["--config.model=tiny", "--config.engine.max_seq_len=64",
               "--config.engine.num_pages=32", "--config.engine.min_token_bucket=32",
               "--config.instance.max_batch=2", "--config.instance.max_step_tokens=32",
               "--config.instance.chunked_max_step_tokens=16", "--config.workload.prompt_mean=12",
               "--config.workload.output_mean=6", "--config.workload.num_requests=6"]


# The apps' persistent compilation cache goes to a folder of this test session, not
# the user's ~/.cache.
CACHE_HOME = tempfile.mkdtemp(prefix="pdserve-test-cache-")


def run(app, *args, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", f"pdserve_jax.cli.{app}", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, XDG_CACHE_HOME=CACHE_HOME))


def ok(proc, path) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(path.read_text())
  results.validate(doc)
  return doc


# --- every app runs and writes a valid result ---------------------------------------------


def test_simulate_default_config_and_override(tmp_path):
  proc = run("simulate", f"--output_json={tmp_path / 'a.json'}")
  doc = ok(proc, tmp_path / "a.json")
  # The default config runs 5 workload seeds and prints their attainment's interval.
  assert [r["seed"] for r in doc["runs"]] == [0, 1, 2, 3, 4]
  assert "over seeds [0, 1, 2, 3, 4]" in proc.stdout
  r = doc["runs"][0]
  assert (r["mode"], r["executor"], r["rate_rps"]) == ("disaggregated", "simulator", 9.9)
  assert len(r["requests"]) == r["summary"]["num_requests"] == 1000
  assert doc["device"]["count"] >= 1 and doc["versions"]["jax"]
  assert doc["config"]["workload"]["num_requests"] == 1000 and doc["plan"] is None
  proc = run("simulate", "--config.modes=semi_pd,colocated_chunked", "--config.num_seeds=1",
             "--config.semi_pd.dynamic=True", "--config.workload.rate=2",
             "--config.workload.lengths=lognormal", "--config.workload.prompt_spread=0.5",
             f"--output_json={tmp_path / 'b.json'}", f"--plots_dir={tmp_path / 'plots'}")
  doc = ok(proc, tmp_path / "b.json")
  assert [r["mode"] for r in doc["runs"]] == ["semi_pd", "colocated_chunked"]
  assert len({q["prompt_tokens"] for q in doc["runs"][0]["requests"]}) > 10
  assert doc["runs"][0]["share_history"][0] == [0.0, 0.5]
  assert {os.path.basename(p) for p in doc["plots"]} == {
      "latency_cdf.png", "share_over_time_simulator.png"}
  assert all(os.path.getsize(p) > 0 for p in doc["plots"])


def test_plan_default_config_and_override(tmp_path, shared_data):
  # plan_opt13b: the conversation trace, with a smaller sample and search.
  proc = run("plan", "--config=plan_opt13b", "--config.workload.num_requests=100",
             "--config.tp_options=1,2",
             "--config.pp_options=1", "--config.max_seeds=4",
             f"--output_json={tmp_path / 'a.json'}")
  doc = ok(proc, tmp_path / "a.json")
  assert set(doc["plan"]["best"]) == set(deployments.MODES)
  # Every kept placement was measured over 3 or 4 seeds, and up to 8 (twice
  # max_seeds) when it overlapped the best's; its goodput is their mean.
  kept = [c for c in doc["plan"]["candidates"] if c["goodput_rps"] is not None]
  for c in kept:
    est = c["estimate"]
    assert 3 <= est["num_seeds"] <= 8 and est["seeds"] == list(range(est["num_seeds"]))
    assert c["goodput_rps"] == pytest.approx(sum(est["values"]) / est["num_seeds"])
  ranked = [c["goodput_per_device"] for c in kept]
  assert ranked == sorted(ranked, reverse=True)
  assert {r["mode"] for r in doc["runs"]} == {m for m, c in doc["plan"]["best"].items() if c}
  # The default config (plan_demo: synthetic lengths), one mode.
  proc = run("plan", "--config.workload.num_requests=60", "--config.tp_options=1",
             "--config.pp_options=1",
             "--config.modes=colocated_prefill_first", "--config.max_spread=0",
             f"--output_json={tmp_path / 'b.json'}",
             f"--plots_dir={tmp_path / 'plots'}")
  doc = ok(proc, tmp_path / "b.json")
  assert list(doc["plan"]["best"]) == ["colocated_prefill_first"]
  assert doc["plan"]["best"]["colocated_prefill_first"]["goodput_rps"] > 0
  assert doc["plan"]["best"]["colocated_prefill_first"]["estimate"] is None  # one seed
  assert "planner_goodput.png" in {os.path.basename(p) for p in doc["plots"]}
  assert "The planner's pick: colocated_prefill_first, 1x tp1pp1" in proc.stdout


@pytest.mark.slow  # compiles an engine
def test_serve_default_config_and_override(tmp_path):
  proc = run("serve", *TINY_ENGINE, "--config.modes=semi_pd", "--config.workload.rate=30",
             "--config.prompts=hello", f"--compilation_cache={tmp_path / 'cache'}",
             f"--output_json={tmp_path / 's.json'}", f"--plots_dir={tmp_path / 'plots'}")
  doc = ok(proc, tmp_path / "s.json")
  # The engine's programs went into the persistent compilation cache.
  assert any(n.startswith("jit__decode_program") for n in os.listdir(tmp_path / "cache"))
  (r,) = doc["runs"]
  assert (r["mode"], r["executor"], r["rate_rps"]) == ("semi_pd", "engine", 30.0)
  assert [q["finish_reason"] for q in r["requests"]] == ["length"] * 6
  assert all(q["first_token_s"] >= q["arrival_s"] for q in r["requests"])
  # The workload's 6 and the default model's (the demo's) continuation of the prompt.
  assert r["engine_stats"]["finished"] == 7 and r["share_history"]
  assert "semi_pd" in proc.stdout and "TTFT p50" in proc.stdout
  assert "'hello' -> '" in proc.stdout
  assert doc["device"] == {"platform": "cpu", "device_kind": "cpu", "count": 8}


@pytest.mark.slow  # compiles an engine
@pytest.mark.skipif(not os.path.exists(DEMO), reason="the demo model is not committed")
def test_serve_prints_continuations_of_the_demo_model(tmp_path):
  proc = run("serve", *TINY_ENGINE, "--config.checkpoint=demo",
             "--config.modes=colocated_prefill_first", "--config.generation.max_tokens=8",
             "--config.prompts=('In the beginning', 'And God said')",
             f"--output_json={tmp_path / 's.json'}")
  ok(proc, tmp_path / "s.json")
  assert "[colocated_prefill_first] 'In the beginning' -> '" in proc.stdout
  assert "[colocated_prefill_first] 'And God said' -> '" in proc.stdout


@pytest.mark.slow  # compiles an engine
def test_sweep_engine_and_simulator(tmp_path):
  proc = run("sweep", *TINY_ENGINE, "--config.modes=colocated_prefill_first",
             "--config.rates=20,60", "--config.profile_reps=2",
             f"--output_json={tmp_path / 's.json'}", f"--plots_dir={tmp_path / 'plots'}")
  doc = ok(proc, tmp_path / "s.json")
  runs = {(r["executor"], r["rate_rps"]): r for r in doc["runs"]}
  assert set(runs) == {(e, x) for e in ("engine", "simulator") for x in (20.0, 60.0)}
  for rate in (20.0, 60.0):  # the same requests both ways
    shapes = [[(q["prompt_tokens"], q["max_tokens"]) for q in runs[e, rate]["requests"]]
              for e in ("engine", "simulator")]
    assert shapes[0] == shapes[1]
  assert runs["simulator", 20.0]["latency_model"] == "profiled"
  assert {os.path.basename(p) for p in doc["plots"]} >= {
      "attainment_vs_rate.png", "latency_cdf_rate20.png", "latency_cdf_rate60.png"}


@pytest.mark.slow  # compiles engines
def test_sweep_goodput_at_the_knee(tmp_path):
  """Each mode's goodput bisected on the engine and in the simulator profiled from
  it, over seeds; the table prints both with intervals."""
  proc = run("sweep", *TINY_ENGINE, "--config.modes=colocated_prefill_first",
             "--config.goodput=True", "--config.goodput_seeds=2", "--config.goodput_tol=0.5",
             "--config.profile_reps=2", f"--output_json={tmp_path / 's.json'}")
  doc = ok(proc, tmp_path / "s.json")
  k = doc["knee"]["colocated_prefill_first"]
  for key in ("engine", "sim", "sim_shared_host", "sim_at_engine_speed"):
    assert k[key]["seeds"] == [0, 1] and len(k[key]["values"]) == 2 and k[key]["mean"] > 0
  assert doc["runs"] == [] and "sim/engine" in proc.stdout
  assert run("sweep", *TINY_ENGINE, "--config.goodput=True",
             "--config.latency=roofline").returncode == 1


def test_sweep_simulator_only(tmp_path):
  proc = run("sweep", "--config=configs/sweep_opt13b.py", "--config.rates=2,12",
             "--config.workload.num_requests=100", "--config.modes=disaggregated,semi_pd",
             f"--output_json={tmp_path / 's.json'}", f"--plots_dir={tmp_path / 'plots'}")
  doc = ok(proc, tmp_path / "s.json")
  # 2 modes x 2 rates x the config's 3 seeds.
  assert {r["executor"] for r in doc["runs"]} == {"simulator"} and len(doc["runs"]) == 12
  att = {}
  for r in doc["runs"]:
    att.setdefault((r["mode"], r["rate_rps"]), []).append(r["summary"]["attainment"])
  assert all(len(v) == 3 for v in att.values())
  assert sum(att["disaggregated", 2.0]) >= sum(att["disaggregated", 12.0])
  assert "semi_pd (simulator) at 12 req/s: attainment" in proc.stdout
  assert "attainment_vs_rate.png" in {os.path.basename(p) for p in doc["plots"]}


def test_paths_are_relative_to_the_current_directory(tmp_path, shared_data):
  trace = os.path.join(shared_data, "traces", "splitwise_conv.csv")
  os.symlink(trace, tmp_path / "conv.csv")
  proc = run("simulate", f"--config={CONFIGS}/simulate_semipd_conv.py",
             "--config.workload.trace=conv.csv", "--config.workload.num_requests=100",
             "--output_json=out.json", cwd=tmp_path)
  ok(proc, tmp_path / "out.json")
  # The config's own ../shared/data path works from the repository root.
  proc = run("simulate", "--config=configs/simulate_semipd_conv.py",
             "--config.workload.num_requests=100", f"--output_json={tmp_path / 'b.json'}")
  ok(proc, tmp_path / "b.json")


# --- bad input: one line on stderr, naming it ---------------------------------------------

OPT = "--config=configs/sweep_opt13b.py"  # the sweep without the engine
BAD = [
    ("serve", ["--config.nosuchkey=1"], "unknown config key nosuchkey"),
    ("simulate", ["--config.nosuchkey=1"], "unknown config key nosuchkey"),
    ("plan", ["--config.nosuchkey=1"], "unknown config key nosuchkey"),
    ("sweep", ["--config.nosuchkey=1"], "unknown config key nosuchkey"),
    ("profile", ["--config.nosuchkey=1"], "unknown config key nosuchkey"),
    ("serve", ["--config.workload.rat=1"], "unknown config key workload.rat (did you mean rate?)"),
    ("sweep", ["--config.model.x=1"], "unknown config key model.x"),
    ("plan", ["--config.semi_pd.partitioner.windw=3"],
     "unknown config key semi_pd.partitioner.windw"),
    ("serve", ["--config.workload.rate=abc"], "workload.rate"),
    ("simulate", ["--config.workload.num_requests=1.5"], "workload.num_requests"),
    ("sweep", ["--config.rates=1,x"], "rates"),
    ("simulate", ["--config.memory_utilization=5"], "memory_utilization"),
    ("plan", ["--config.memory_utilization=5"], "memory_utilization"),
    ("sweep", [OPT, "--config.memory_utilization=0"], "memory_utilization"),
    ("serve", ["--config.workload.rate=-1"], "workload.rate"),
    ("simulate", ["--config.workload.rate=-1"], "workload.rate"),
    ("sweep", [OPT, "--config.rates=4,-1"], "rates"),
    ("serve", ["--config.ttft_slo=0"], "ttft_slo"),
    ("simulate", ["--config.ttft_slo=0"], "ttft_slo"),
    ("plan", ["--config.tpot_slo=-1"], "tpot_slo"),
    ("sweep", [OPT, "--config.ttft_slo=0"], "ttft_slo"),
    ("simulate", ["--config.workload.num_requests=0"], "workload.num_requests"),
    ("simulate", ["--config.workload.arrival=gamma", "--config.workload.cv=0"], "workload.cv"),
    ("simulate", ["--config.instance.tp=0"], "instance.tp"),
    ("serve", ["--config.engine.num_pages=1"], "engine.num_pages"),
    ("serve", ["--config.modes=colocated"], "unknown mode 'colocated'"),
    ("simulate", ["--config.modes=disaggregated,nosuch"], "unknown mode 'nosuch'"),
    ("plan", ["--config.modes=nosuch"], "unknown mode 'nosuch'"),
    ("sweep", [OPT, "--config.modes=nosuch"], "unknown mode 'nosuch'"),
    ("serve", ["--config.workload.source=trace", "--config.workload.trace=nope.csv"],
     "workload.trace"),
    ("simulate", ["--config.workload.source=trace", "--config.workload.trace=nope.csv"],
     "workload.trace"),
    ("simulate", ["--config.model=nosuch"], "model"),
    ("serve", ["--config.checkpoint=", "--config.model=nosuch"], "model"),
    ("simulate", ["--config.hardware=b200"], "hardware"),
    ("simulate", ["--config.latency=nope.json"], "latency"),
    ("sweep", [OPT, "--config.latency=profile"], "latency"),
    ("serve", ["--config=configs/nosuch.py"], "--config"),
    ("profile", ["--config.kind=x"], "kind"),
]


@pytest.mark.parametrize("app,args,expected", BAD, ids=[f"{a}:{' '.join(x)}" for a, x, _ in BAD])
def test_bad_input_is_one_line_naming_it(app, args, expected):
  proc = run(app, *args, timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert expected in lines[0] and lines[0].startswith(f"{app}: error: ")


# --- the pieces -----------------------------------------------------------------------------


def test_serve_answer_names_the_best_mode_and_ties():
  # Catches a winner picked by anything but attainment, a tie named as one winner, and
  # an overloaded run presented without its caveat.
  from pdserve_jax.cli.serve import answer

  run_ = lambda mode, att: dict(mode=mode, num_devices=2, rate_rps=40.0,
                                summary=dict(attainment=att))
  text = answer([run_("colocated_chunked", 0.6), run_("disaggregated", 0.95),
                 run_("semi_pd", 0.7)])
  assert text == ("At 40 req/s on 2 devices each, disaggregated met both SLOs for 95% of "
                  "requests (semi_pd 70%, colocated_chunked 60%): disaggregated wins at this "
                  "load.")
  assert "semi_pd and disaggregated tie" in answer([
      run_("semi_pd", 0.9), run_("disaggregated", 0.9), run_("colocated_chunked", 0.5)])
  assert "they do not differ" in answer([run_("semi_pd", 1.0), run_("disaggregated", 1.0)])
  assert "lower workload.rate" in answer([run_("semi_pd", 0.2), run_("disaggregated", 0.1)])


def _walk(node, where="$"):
  """Every (path, schema) that names a key: properties of objects."""
  for key, sub in (node.get("properties") or {}).items():
    yield f"{where}.{key}", sub
    yield from _walk(sub, f"{where}.{key}")
  for key in ("items", "additionalProperties"):
    if isinstance(node.get(key), dict):
      yield from _walk(node[key], f"{where}[]")
  for sub in node.get("anyOf", []) + node.get("prefixItems", []):
    yield from _walk(sub, where)


def test_schema_describes_every_key():
  import jsonschema

  schema = results.schema()
  jsonschema.Draft202012Validator.check_schema(schema)
  assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
  keys = list(_walk(schema))
  assert len(keys) > 60
  assert [p for p, s in keys if not s.get("description")] == []


def test_every_config_has_one_workload_block_and_known_modes():
  import importlib.util

  # reproduce.py holds the reproduce app's knobs; its experiments name systems, not
  # modes (tests/test_reproduce.py builds them), and share the workload block.
  experiments = [os.path.join("reproduce", n)
                 for n in sorted(os.listdir(os.path.join(CONFIGS, "reproduce")))]
  for name in sorted(os.listdir(CONFIGS)) + experiments:
    no_workload = ("profile_cpu.py", "train_demo.py", "reproduce.py", "api_demo.py",
                   "cluster_demo.py")
    if not name.endswith(".py") or name in no_workload:
      continue
    spec = importlib.util.spec_from_file_location(name[:-3].replace("/", "_"),
                                                  os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    # An ablation's steps are experiments of their own, a workload block each.
    blocks = ([ml_collections.ConfigDict(s["workload"]) for s in cfg.steps]
              if cfg.get("kind") == "ablation" else [cfg.workload])
    for block in blocks:
      assert set(block) == set(workloads.DEFAULTS), name
      workloads.check_config(block)
    if "modes" in cfg:  # reproduce's experiments name systems; bench an endpoint
      deployments.modes(cfg)


def test_workload_block():
  w = workloads.config(num_requests=50, rate=4, lengths="uniform", prompt_mean=100,
                       prompt_spread=0.2, output_mean=20, max_total_tokens=110)
  assert isinstance(w.rate, float)
  reqs = workloads.from_config(w, context=2048, max_prompt_len=105)(4.0)
  assert len(reqs) == 50 and all(r.prompt_len <= 105 for r in reqs)
  assert all(r.prompt_len + r.max_tokens <= 110 for r in reqs)
  again = workloads.from_config(w, context=2048, max_prompt_len=105)(8.0)
  assert [r.prompt_len for r in again] == [r.prompt_len for r in reqs]
  assert again[-1].arrival_time == pytest.approx(reqs[-1].arrival_time / 2)
  with pytest.raises(ValueError, match="workload.cv"):
    workloads.from_config(workloads.config(cv=0.0), 2048)
  with pytest.raises(ValueError, match="unknown config key workload.nosuch"):
    bad = ml_collections.ConfigDict(dict(workloads.DEFAULTS, nosuch=1))
    workloads.from_config(bad, 2048)


def test_trace_rate_zero_replays_and_relative_paths(tmp_path, monkeypatch):
  (tmp_path / "t.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                                  "0.0,10,5\n0.5,20,6\n2.0,3000,6\n")
  monkeypatch.chdir(tmp_path)
  w = workloads.config(source="trace", trace="t.csv", rate=0.0, num_requests=9)
  reqs = workloads.from_config(w, context=100)(0.0)  # the 3000-token row does not fit
  assert [(r.prompt_len, r.arrival_time) for r in reqs] == [(10, 0.0), (20, 0.5)]


def test_list_syntax():
  assert common.names("modes", "a, b") == ("a", "b")
  assert common.names("modes", ("a,b",)) == ("a", "b")
  assert common.names("modes", ("a", "b")) == ("a", "b")
  assert common.numbers("rates", (1, "2.5")) == (1.0, 2.5)
  assert common.numbers("tp", 2, int) == (2,)
  with pytest.raises(ValueError, match="rates: each value must be > 0"):
    common.numbers("rates", (1, 0))
  with pytest.raises(ValueError, match="tp: expected ints"):
    common.numbers("tp", (1.5,), int)


def test_git_commit_outside_a_checkout_is_none(tmp_path):
  assert results.git_commit(str(tmp_path)) == (None, None)
  commit, _ = results.git_commit()
  assert commit is None or len(commit) == 40
