"""absl app: an OpenAI-compatible HTTP server over one engine (`serving.openai_api`).

  python -m pdserve_jax.cli.api --config=configs/api_demo.py --port=8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "And the king said", "max_tokens": 24, "temperature": 0}'

The config names the model (as `serve`'s: `checkpoint`, `hf_path` or a random
`model` preset), one `mode` and its deployment blocks (`cli.modes`), the engine
knobs and the SLOs. The engine warms up before the server serves; on Ctrl-C
(SIGINT) or SIGTERM uvicorn stops taking connections and lets those open finish for
up to `drain_seconds`, then exits by the signal it caught. Binds 127.0.0.1 unless
`--host` says otherwise: the server has no authentication, so binding a public
address lets anyone who reaches it use it.
"""

from pdserve_jax.cli import serving  # first: sets XLA_FLAGS before jax loads

import logging  # noqa: E402
import socket  # noqa: E402

from absl import flags  # noqa: E402

from pdserve_jax.cli import common, modes  # noqa: E402

flags.DEFINE_string("host", "127.0.0.1", "address to bind (loopback by default; the "
                    "server has no authentication)")
flags.DEFINE_integer("port", 8000, "port to bind (0: any free port, printed)")


def main(cfg, out: common.Outputs):
  import uvicorn

  import pdserve_jax as pdj
  from pdserve_jax.serving import openai_api

  mode = cfg.mode
  if mode not in modes.MODES:
    raise common.ConfigError(f"mode: unknown mode {mode!r}; known: {', '.join(modes.MODES)}")
  dep = modes.deployment(cfg, mode)
  ec = serving.engine_config(cfg)
  model = serving.load_model(cfg)
  serving.check_servable({mode: dep}, model)
  name = cfg.model_name or (cfg.checkpoint if cfg.checkpoint == "demo" else
                            cfg.hf_path or cfg.checkpoint or cfg.model)
  # Bound before the engine warms up, so a taken port fails at once; connections
  # wait in the backlog until uvicorn serves.
  sock = socket.socket(socket.AF_INET6 if ":" in flags.FLAGS.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((flags.FLAGS.host, flags.FLAGS.port))
  except OSError as e:
    raise common.ConfigError(f"port: cannot bind {flags.FLAGS.host}:{flags.FLAGS.port}: "
                             f"{e.strerror}") from None
  host, port = sock.getsockname()[:2]
  engine = pdj.Engine(model, dep, ec)
  server = uvicorn.Server(uvicorn.Config(
      openai_api.create_app(engine, name), log_level="warning",
      timeout_graceful_shutdown=cfg.drain_seconds))
  print(f"serving {name!r} ({dep.describe()}) on http://{host}:{port}", flush=True)
  try:
    server.run(sockets=[sock])  # returns on SIGINT / SIGTERM
  finally:
    engine.close(timeout=cfg.drain_seconds)
    logging.info("engine closed: %s", engine.stats())


if __name__ == "__main__":
  common.run(main, "configs/api_demo.py")
