"""Reading Hugging Face Llama-family checkpoints (config.json + safetensors).

Handles both config styles (`rope_theta`/`rope_scaling`/`torch_dtype` and the newer
`rope_parameters`/`dtype`), single files and sharded ones with their index, and bf16
tensors. Safetensors files are read with `safetensors` (numpy backend); numpy has no
bfloat16, so ml_dtypes supplies it.
Every error names the file or tensor at fault.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from pdserve_jax.model.config import ModelConfig, RopeScaling
from pdserve_jax.model.model import Model
from pdserve_jax.model.tokenizer import eos_ids_of, load_tokenizer

# HF architectures whose weights map onto our Llama layout.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64, "I64": np.int64, "I32": np.int32}


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


def read_safetensors(file: str) -> Dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays; bf16 ones as
  ml_dtypes.bfloat16 (importing ml_dtypes, as this module does, registers the dtype
  that safetensors' numpy backend asks numpy for)."""
  try:
    with safe_open(file, framework="np") as f:
      out = {}
      for name in f.keys():
        dtype = f.get_slice(name).get_dtype()
        if dtype not in _ST_DTYPES:
          raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        out[name] = f.get_tensor(name)
      return out
  except (SafetensorError, OSError) as e:  # a bad header, offsets past the end, I/O
    raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _tensor_files(path: str):
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
  missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise CheckpointError(f"{path}: shard files missing: {missing}")
  return files


def load_hf(path: str, dtype: Optional[str] = None) -> Model:
  """Loads an HF Llama-family folder into a `Model` in `dtype` (default: as stored)."""
  cfg, stored_dtype = read_config(path)
  dtype = jnp.dtype(dtype or stored_dtype)
  tensors, where = {}, {}
  for fname in _tensor_files(path):
    for name, arr in read_safetensors(os.path.join(path, fname)).items():
      tensors[name], where[name] = arr, fname

  def get(name, shape):
    if name not in tensors:
      raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
    arr = tensors[name]
    if tuple(arr.shape) != tuple(shape):
      raise CheckpointError(f"{path}/{where[name]}: tensor {name!r} has shape {tuple(arr.shape)}, "
                            f"expected {tuple(shape)} from config.json")
    return np.asarray(arr, np.float32)

  L, H, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  nq, nkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def stack(suffix, shape, fn):
    return np.stack([fn(get(f"model.layers.{i}.{suffix}", shape)) for i in range(L)])

  layers = {
      "attn_norm": stack("input_layernorm.weight", (H,), lambda w: w),
      "wq": stack("self_attn.q_proj.weight", (nq * D, H), lambda w: w.reshape(nq, D, H)),
      "wk": stack("self_attn.k_proj.weight", (nkv * D, H), lambda w: w.reshape(nkv, D, H)),
      "wv": stack("self_attn.v_proj.weight", (nkv * D, H), lambda w: w.reshape(nkv, D, H)),
      "wo": stack("self_attn.o_proj.weight", (H, nq * D), lambda w: w.reshape(H, nq, D)),
      "mlp_norm": stack("post_attention_layernorm.weight", (H,), lambda w: w),
      "w_gate": stack("mlp.gate_proj.weight", (F, H), lambda w: w),
      "w_up": stack("mlp.up_proj.weight", (F, H), lambda w: w),
      "w_down": stack("mlp.down_proj.weight", (H, F), lambda w: w),
  }
  if cfg.attention_bias:
    for ours, theirs, n in (("bq", "q", nq), ("bk", "k", nkv), ("bv", "v", nkv)):
      layers[ours] = stack(f"self_attn.{theirs}_proj.bias", (n * D,),
                           lambda b, n=n: b.reshape(n, D))
  params = {"embed": get("model.embed_tokens.weight", (V, H)), "layers": layers,
            "final_norm": get("model.norm.weight", (H,))}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = get("lm_head.weight", (V, H))
  tokenizer = load_tokenizer(path)
  eos = tokenizer.eos_token_ids if tokenizer else eos_ids_of(path)
  return Model(cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype), params), tokenizer, eos)
