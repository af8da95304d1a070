"""absl app: an OpenAI-compatible HTTP server over one engine (`api.app`),
in one process or as a router over prefill and decode worker processes.

  python -m pdserve_jax.cli.api --config=api_demo --port=8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "And the king said", "max_tokens": 24, "temperature": 0}'

With `--role` the instances run in processes of their own (`cli.serve --role=...`
is the same app): each worker holds one instance's devices, weights and pool, and
the router (the disaggregated coordinator over `cluster.router.WorkerPlacement`)
serves HTTP and schedules everything:

  python -m pdserve_jax.cli.api --config=cluster_demo --role=prefill --port=5601
  python -m pdserve_jax.cli.api --config=cluster_demo --role=decode --port=5602
  python -m pdserve_jax.cli.api --config=cluster_demo --role=router --port=8000 \
      --prefill=tcp://127.0.0.1:5601 --decode=tcp://127.0.0.1:5602

The served model name (what `/v1/models` lists and clients send as `model`) is
the model's folder as an absolute path: `hf_path`, a `checkpoint` folder, or the
demo model's folder for `checkpoint="demo"`. A client that looks the tokenizer up
by the model name (guidellm, lm-eval's `local-completions`, `transformers`'
`AutoTokenizer.from_pretrained`) then finds it on this machine with no extra flag.
Requests may also name the folder's base name (`"demo"` for the demo model);
`model_name` in the config overrides both. The `api` block sets the HTTP limits
(`api.app.ApiConfig`: body size and deadline, Retry-After seconds); the `cluster`
block the router's heartbeat, command and KV-copy timeouts (`cluster.router`).

The config names the model (as `serve`'s: `checkpoint`, `hf_path` or a random
`model` preset), one `mode` and its deployment blocks (`cli.deployments`), the engine
knobs and the SLOs. The engine warms up before the server serves; on Ctrl-C
(SIGINT) or SIGTERM uvicorn stops taking connections and lets those open finish for
up to `drain_seconds`, then exits by the signal it caught. Binds 127.0.0.1 unless
`--host` says otherwise: the server has no authentication, so binding a public
address lets anyone who reaches it use it.
"""

from pdserve_jax.cli import engine_runs  # first: sets XLA_FLAGS before jax loads

import dataclasses  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402

from absl import flags  # noqa: E402

from pdserve_jax.cli import common, deployments  # noqa: E402

flags.DEFINE_string("host", "127.0.0.1", "address to bind (loopback by default; the "
                    "server has no authentication)")
flags.DEFINE_integer("port", 8000, "port to bind (0: any free port, printed): HTTP, or "
                     "a worker's control channel")
flags.DEFINE_enum("role", "engine", ["engine", "router", "prefill", "decode", "replica"],
                  "engine: every instance in this process; router: HTTP and scheduling "
                  "over worker processes; prefill/decode/replica: one worker")
flags.DEFINE_list("prefill", [], "router, disaggregated: the prefill workers' control "
                  "addresses (tcp://host:port), one instance each")
flags.DEFINE_list("decode", [], "router, disaggregated: the decode workers' control addresses")
flags.DEFINE_list("replicas", [], "router, colocated or semi-PD mode: the replica workers' "
                  "control addresses, one replica each")
flags.DEFINE_string("transfer_host", "", "worker: the address its KV transfer server "
                    "binds (default: --host); it has no authentication either")
flags.DEFINE_integer("num_processes", 1, "worker: processes (hosts) of this one instance, "
                     "one mesh over all their devices (jax.distributed)")
flags.DEFINE_integer("process_id", 0, "worker: this process's index; 0 talks to the router")
flags.DEFINE_string("coordinator", "", "worker with num_processes > 1: jax.distributed's "
                    "coordinator address (host:port, served by process 0)")
flags.DEFINE_string("peers", "", "worker with num_processes > 1: the ZeroMQ address "
                    "process 0 binds for the others (tcp://host:port)")


def worker(cfg, role: str) -> None:
  """One prefill or decode instance; serves until the process is stopped."""
  import jax

  from pdserve_jax.cluster.worker import Worker

  F = flags.FLAGS
  if F.num_processes > 1:
    if not (F.coordinator and F.peers):
      raise common.ConfigError("num_processes: a worker spanning processes needs "
                               "--coordinator and --peers")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no-op off CPU
    jax.distributed.initialize(F.coordinator, F.num_processes, F.process_id)
  model = engine_runs.load_model(cfg)
  w = Worker(model, role, f"tcp://{F.host}:{F.port}", F.transfer_host or F.host,
             peers=F.peers)
  if w.address is None:
    print(f"{role} worker process {F.process_id} following", flush=True)
  else:
    print(f"{role} worker ready on {w.address} (KV transfer {w.transfer_address}; "
          f"{w.processes} process(es), {len(jax.devices())} devices)", flush=True)
  w.serve()


def served_name(cfg) -> tuple:
  """(the served model name, other names requests may use, the model's folder or
  None): see the module docstring."""
  import os

  from pdserve_jax.model.demo import DEMO_DIR

  folder = cfg.hf_path or (DEMO_DIR if cfg.checkpoint == "demo" else cfg.checkpoint)
  root = os.path.abspath(folder) if folder else None
  aliases = ["demo"] if cfg.checkpoint == "demo" and not cfg.hf_path else []
  if root:
    aliases.append(os.path.basename(root))
  name = cfg.get("model_name", "") or root or cfg.model
  return name, [a for a in aliases + ([root] if root else []) if a != name], root


def api_config(cfg):
  """`api.app.ApiConfig` from the config's optional `api` block."""
  from pdserve_jax.api.app import ApiConfig

  fields = dict(cfg.get("api", None) or {})
  known = {f.name for f in dataclasses.fields(ApiConfig)}
  for key in fields:
    if key not in known:
      raise common.ConfigError(f"unknown config key api.{key} (known: {', '.join(sorted(known))})")
  return ApiConfig(**fields)


def cluster_settings(cfg) -> dict:
  """The router's timeouts from the config's optional `cluster` block (seconds):
  heartbeat_s, timeout_s, command_timeout_s, copy_timeout_s, connect_timeout_s,
  copy_retries."""
  fields = dict(cfg.get("cluster", None) or {})
  known = ("heartbeat_s", "timeout_s", "command_timeout_s", "copy_timeout_s",
           "connect_timeout_s", "copy_retries")
  for key, v in fields.items():
    if key not in known:
      raise common.ConfigError(f"unknown config key cluster.{key} (known: {', '.join(known)})")
    if not v > 0 and key != "copy_retries":
      raise common.ConfigError(f"cluster.{key}: must be > 0, got {v}")
  return fields


def main(cfg, out: common.Outputs):
  import uvicorn

  import pdserve_jax as pdj
  from pdserve_jax.api import app as openai_api

  role = flags.FLAGS.role
  if role in ("prefill", "decode", "replica"):
    return worker(cfg, role)
  mode = cfg.mode
  if mode not in deployments.MODES:
    raise common.ConfigError(f"mode: unknown mode {mode!r}; known: {', '.join(deployments.MODES)}")
  dep = deployments.deployment(cfg, mode)
  ec = engine_runs.engine_config(cfg)
  placement = None
  if role == "router":  # the weights live in the workers: the router reads the card
    from pdserve_jax.cluster import router

    settings = router.ClusterSettings(**cluster_settings(cfg))
    if mode == "disaggregated":
      workers = {"prefill": flags.FLAGS.prefill, "decode": flags.FLAGS.decode}
    else:
      workers = {"replica": flags.FLAGS.replicas}
    for kind, addresses in workers.items():
      flag = "replicas" if kind == "replica" else kind
      if not addresses:
        raise common.ConfigError(f"{flag}: the router in mode {mode} needs at least one "
                                 f"{kind} worker address (--{flag}=tcp://host:port)")
    if mode == "disaggregated":
      dep = dataclasses.replace(dep, num_prefill=len(workers["prefill"]),
                                num_decode=len(workers["decode"]))
    else:
      dep = dataclasses.replace(dep, replicas=len(workers["replica"]))
    model = engine_runs.load_card(cfg)
    router.wait_for_workers([a for addresses in workers.values() for a in addresses],
                            settings.connect_timeout_s)
    placement = router.WorkerPlacement(model.config.name, ec.attn_impl, workers, settings)
  else:
    model = engine_runs.load_model(cfg)
    engine_runs.check_servable({mode: dep}, model)
  name, aliases, root = served_name(cfg)
  # Bound and listening before the engine warms up, so a taken port fails at once and
  # connections wait in the backlog until uvicorn serves (bound but not listening, a
  # client that read the address below was refused until uvicorn's startup ran).
  sock = socket.socket(socket.AF_INET6 if ":" in flags.FLAGS.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((flags.FLAGS.host, flags.FLAGS.port))
  except OSError as e:
    raise common.ConfigError(f"port: cannot bind {flags.FLAGS.host}:{flags.FLAGS.port}: "
                             f"{e.strerror}") from None
  sock.listen(2048)
  host, port = sock.getsockname()[:2]
  engine = pdj.Engine(model, dep, ec, placement=placement)
  drain = cfg.get("drain_seconds", 10.0)  # `serve --role=router` configs may lack it
  server = uvicorn.Server(uvicorn.Config(
      openai_api.create_app(engine, name, api_config(cfg), aliases, root),
      log_level="warning",
      timeout_graceful_shutdown=drain))
  print(f"serving {name!r} ({dep.describe()}) on http://{host}:{port}", flush=True)
  try:
    server.run(sockets=[sock])  # returns on SIGINT / SIGTERM
  finally:
    engine.close(timeout=drain)
    logging.info("engine closed: %s", engine.stats())


if __name__ == "__main__":
  common.run(main, "api_demo")
