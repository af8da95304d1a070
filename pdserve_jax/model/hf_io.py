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

from pdserve_jax.model.card import CheckpointError, read_config
from pdserve_jax.model.model import Model
from pdserve_jax.model.tokenizer import eos_ids_of, load_tokenizer

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64, "I64": np.int64, "I32": np.int32}


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
