"""What serving needs of a model besides its weights: config, tokenizer, EOS ids.

A `ModelCard` is read from a checkpoint folder without touching the weights and
without jax: the router of a multi-process deployment schedules for a model whose
weights live in its workers, and needs only this. `Model` (`model.model`) has the
same three attributes, so the engine takes either.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Tuple

from pdserve_jax.model.config import ModelConfig, RopeScaling, config_from_dict
from pdserve_jax.model.tokenizer import Tokenizer, eos_ids_of, load_tokenizer

CONFIG_FILE = "pdserve_config.json"  # `Model.save`'s config, beside its params

# HF architectures whose weights map onto our Llama layout.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}


@dataclasses.dataclass
class ModelCard:
  """A model's shape and text interface, without weights."""
  config: ModelConfig
  tokenizer: Optional[Tokenizer] = None
  eos_token_ids: Tuple[int, ...] = ()

  def __post_init__(self):
    if self.tokenizer is not None and not self.eos_token_ids:
      self.eos_token_ids = self.tokenizer.eos_token_ids
    self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)


def load_card(path: str) -> ModelCard:
  """The card of a `Model.save` folder or a Hugging Face model folder."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    with open(os.path.join(path, CONFIG_FILE)) as f:
      cfg = config_from_dict(json.load(f))
  else:
    cfg, _ = read_config(path)
  return ModelCard(cfg, load_tokenizer(path), eos_ids_of(path))


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be read as a supported model."""


def read_config(path: str) -> tuple[ModelConfig, str]:
  """Parses `path/config.json`; returns the ModelConfig and the stored dtype name."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{cfg_file} not found: {path!r} is not a Hugging Face model folder")
  with open(cfg_file) as f:
    c = json.load(f)
  archs = c.get("architectures") or []
  known = [a for a in archs if a in ARCHITECTURES]
  if not known:
    raise CheckpointError(f"{cfg_file}: unsupported architecture {archs or c.get('model_type')!r}; "
                          f"supported: {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[known[0]]
  if c.get("mlp_bias"):
    raise CheckpointError(f"{cfg_file}: mlp_bias=true is not supported")
  if c.get("use_sliding_window") or (family == "mistral" and c.get("sliding_window")):
    raise CheckpointError(f"{cfg_file}: sliding-window attention is not supported")

  rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    scaling = RopeScaling(factor=float(rope["factor"]),
                          low_freq_factor=float(rope["low_freq_factor"]),
                          high_freq_factor=float(rope["high_freq_factor"]),
                          original_max_position_embeddings=int(
                              rope["original_max_position_embeddings"]))
  elif rope_type == "default":
    scaling = None
  else:
    raise CheckpointError(f"{cfg_file}: rope type {rope_type!r} is not supported "
                          "(supported: default, llama3)")

  heads = c["num_attention_heads"]
  cfg = ModelConfig(
      name=os.path.basename(os.path.normpath(path)),
      arch="llama",
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      intermediate_size=c["intermediate_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // heads,
      max_position_embeddings=c.get("max_position_embeddings", 4096),
      rope_theta=float(theta),
      rope_scaling=scaling,
      rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
      attention_bias=True if family == "qwen2" else bool(c.get("attention_bias", False)),
  )
  return cfg, str(c.get("dtype") or c.get("torch_dtype") or "float32")
