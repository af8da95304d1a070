"""`Model` (config + params) and its public verbs: forward, save, load, shard.

`forward` is the cache-less reference path every serving program is checked against.
Checkpoints are orbax directories: the params under `params/`, the config as JSON
beside them, and the tokenizer (if any) as a HF `tokenizer.json` with its EOS ids in
`generation_config.json`; `load` restores straight into the requested sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from pdserve_jax.model import llama, sharding
from pdserve_jax.model.card import CONFIG_FILE
from pdserve_jax.model.config import ModelConfig, config_from_dict, config_to_dict
from pdserve_jax.model.tokenizer import Tokenizer, eos_ids_of, load_tokenizer


@dataclasses.dataclass
class Model:
  """Weights and shape, plus what serving text needs: the tokenizer (None: token ids
  only) and the ids that end a sequence (the engine stops on them by default)."""
  config: ModelConfig
  params: llama.Params
  tokenizer: Optional[Tokenizer] = None
  eos_token_ids: Tuple[int, ...] = ()

  def __post_init__(self):
    if self.tokenizer is not None and not self.eos_token_ids:
      self.eos_token_ids = self.tokenizer.eos_token_ids
    self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)

  @property
  def dtype(self):
    return self.params["embed"].dtype

  def shard(self, mesh: Mesh) -> "Model":
    """A copy whose params are laid out on `mesh` by the logical-axis rules."""
    shardings = sharding.tree_shardings(mesh, llama.logical_axes(self.config), self.params)
    return dataclasses.replace(self, params=jax.device_put(self.params, shardings))

  def save(self, path: str) -> None:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(path, "params"), self.params, force=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(config_to_dict(self.config), f, indent=1)
    if self.tokenizer is not None:
      self.tokenizer.save(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": list(self.eos_token_ids)}, f, indent=1)


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> Model:
  return Model(cfg, llama.init_params(cfg, seed, dtype, std))


def load(path: str, mesh: Optional[Mesh] = None, dtype=None) -> Model:
  """Restores a checkpoint written by `Model.save`, sharded over `mesh` if given
  (default: one device; with several processes, every device of every process, so
  each restores only its own shards)."""
  path = os.path.abspath(path)
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: {path} is not a pdserve_jax checkpoint")
  with open(cfg_file) as f:
    cfg = config_from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(os.path.join(path, "params"))
    tree = getattr(meta, "item_metadata", meta)
    shapes = llama.param_shapes(cfg)
    stored = jax.tree.map(lambda m: m.dtype, dict(tree))
    if mesh is None:
      mesh = sharding.make_mesh(jax.devices()[:1] if jax.process_count() == 1 else
                                jax.devices())
    shardings = sharding.tree_shardings(mesh, llama.logical_axes(cfg), shapes)
    target = jax.tree.map(
        lambda s, dt, sh: jax.ShapeDtypeStruct(s.shape, dt, sharding=sh), shapes, stored,
        shardings)
    params = ckpt.restore(os.path.join(path, "params"), target)
  if dtype is not None:
    params = jax.tree.map(lambda a: a.astype(dtype), params)
  return Model(cfg, params, load_tokenizer(path), eos_ids_of(path))


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def _forward(params, tokens, cfg, attn_impl):
  return llama.forward_logits(cfg, params, tokens, attn_impl)


def forward(model: Model, tokens, attn_impl: str = "auto"):
  """int32 [B, T] -> float32 [B, T, vocab] logits of every position; no cache."""
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  return _forward(model.params, tokens, model.config, attn_impl)


def greedy_reference(model: Model, prompts, num_tokens: int):
  """Greedy continuations of `prompts` by re-running `forward` on whole sequences.

  Sequences sit in one buffer padded to their final length; causality makes the
  padding invisible, so one compilation serves every step.
  """
  total = max(len(p) for p in prompts) + num_tokens
  buf = np.zeros((len(prompts), total), np.int32)
  lens = np.array([len(p) for p in prompts])
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  rows = np.arange(len(prompts))
  for _ in range(num_tokens):
    logits = np.asarray(forward(model, buf))
    buf[rows, lens] = logits[rows, lens - 1].argmax(-1)
    lens += 1
  return [buf[b, len(p):len(p) + num_tokens].tolist() for b, p in enumerate(prompts)]
