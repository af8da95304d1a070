"""The engine side of the apps (`serve`, `sweep`): model, engine config, serving a
workload with a progress bar, text continuations.

Importing this sets XLA_FLAGS to 8 virtual CPU devices when unset, so import it
before anything imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import threading

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pdserve_jax.cli import common  # noqa: E402

# config.engine holds EngineConfig's fields but the SLOs, which are top-level keys.
_TOP_LEVEL = ("ttft_slo", "tpot_slo")


def load_model(cfg):
  """`hf_path` (an HF folder), else `checkpoint` ("demo": the committed demo
  model; else a `Model.save` folder), else a random `model` preset."""
  import pdserve_jax as pdj

  if cfg.hf_path:
    return pdj.load_hf(cfg.hf_path, dtype=cfg.dtype)
  if cfg.checkpoint == "demo":
    return pdj.load_demo(dtype=cfg.dtype or None)
  if cfg.checkpoint:
    return pdj.load(cfg.checkpoint, dtype=cfg.dtype)
  return pdj.random_model(preset(cfg.model), seed=cfg.seed, std=cfg.init_std)


def load_card(cfg):
  """What a router needs of the model `load_model` would load: its config, tokenizer
  and EOS ids, read without the weights (and without jax)."""
  from pdserve_jax.model.card import ModelCard, load_card
  from pdserve_jax.model.demo import DEMO_DIR

  if cfg.hf_path or cfg.checkpoint:
    return load_card(cfg.hf_path or (DEMO_DIR if cfg.checkpoint == "demo" else cfg.checkpoint))
  return ModelCard(preset(cfg.model))


def preset(name: str):
  from pdserve_jax.model.config import get_preset

  try:
    return get_preset(name)
  except ValueError as e:
    raise common.ConfigError(f"model: {e}") from None


def engine_config(cfg, **overrides):
  """`pdj.EngineConfig` from `config.engine` and the top-level SLOs, checked."""
  import pdserve_jax as pdj

  known = {f.name for f in dataclasses.fields(pdj.EngineConfig)} - set(_TOP_LEVEL)
  fields = cfg.engine.to_dict()
  for key in fields:
    if key in _TOP_LEVEL:
      raise common.ConfigError(f"engine.{key}: set {key} at the top level of the config")
    if key not in known:
      raise common.ConfigError(f"unknown config key engine.{key} (EngineConfig fields: "
                               f"{', '.join(sorted(known))})")
  ec = pdj.EngineConfig(**{**fields, **overrides}, ttft_slo=cfg.ttft_slo, tpot_slo=cfg.tpot_slo)
  try:
    ec.check()
  except ValueError as e:
    raise common.ConfigError(f"engine.{e}") from None
  return ec


def max_prompt_len(deployments, ec) -> int:
  """The longest prompt every one of `deployments` accepts."""
  from pdserve_jax.serving.config import max_prompt_len

  return min(max_prompt_len(d, ec) for d in deployments)


def check_servable(deployments: dict, model) -> None:
  """Every deployment fits this model and the devices present, before any serves."""
  import jax

  from pdserve_jax.serving.config import check_servable as check

  for mode, dep in deployments.items():
    try:
      check(dep, model.config, jax.device_count())
    except ValueError as e:
      raise common.ConfigError(f"modes: {mode}: {e}") from None


def serve_workload(engine, requests, desc: str):
  """`engine.run_workload` on fresh copies of `requests`, with a bar of finished
  requests."""
  reqs = [r.fresh() for r in requests]
  out = {}
  worker = threading.Thread(target=lambda: out.update(report=_capture(engine, reqs)))
  ended = lambda: sum(engine.counts.values())  # finished, aborted, failed, rejected
  done0 = ended()
  with common.progress(len(reqs), desc, "req") as bar:
    worker.start()
    while worker.is_alive():
      worker.join(0.25)
      bar.update(ended() - done0 - bar.n)
  if isinstance(out.get("report"), BaseException):
    raise out["report"]
  return out["report"]


def _capture(engine, reqs):
  try:
    return engine.run_workload(reqs)
  except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
    return e


def continuations(engine, cfg) -> list[str]:
  """The engine's continuation of each of `cfg.prompts` under `cfg.generation`
  (models with a tokenizer)."""
  import pdserve_jax as pdj

  g = cfg.generation
  params = pdj.SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature,
                              seed=None if g.seed < 0 else g.seed)
  return [result.text for result in engine.generate(list(cfg.prompts), params)]
