"""orbax round trip with tp sharding, and clear errors for bad checkpoints."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import pdserve_jax as pdj
from pdserve_jax.model import sharding

CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)


def test_orbax_round_trip_on_tp_mesh(tmp_path):
  model = pdj.random_model(CFG, seed=3, std=0.2)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 11)).astype(np.int32)
  want = np.asarray(pdj.forward(model, tokens))
  model.save(str(tmp_path / "ckpt"))

  mesh = sharding.make_mesh(jax.devices()[:4])
  loaded = pdj.load(str(tmp_path / "ckpt"), mesh=mesh)
  assert loaded.config == CFG
  wq = loaded.params["layers"]["wq"]
  assert wq.sharding.mesh.shape["tp"] == 4
  assert wq.sharding.spec[1] == "tp", wq.sharding  # q heads split over tp
  assert len(wq.addressable_shards) == 4
  assert wq.addressable_shards[0].data.shape[1] == CFG.num_heads // 4
  # Restored weights are bit-identical, so the same mesh gives bit-identical logits.
  jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
  got = np.asarray(pdj.forward(loaded, tokens))
  np.testing.assert_array_equal(got, np.asarray(pdj.forward(model.shard(mesh), tokens)))
  # Across meshes only the all-reduce order differs.
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_load_rejects_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a pdserve_jax checkpoint"):
    pdj.load(str(tmp_path))


def _write_hf(path, config, tensors):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(path, "model.safetensors"))


HF_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
          "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 10000.0}


def _tensors():
  f = lambda *s: np.zeros(s, np.float32)
  p = "model.layers.0."
  return {"model.embed_tokens.weight": f(16, 8), "model.norm.weight": f(8),
          "lm_head.weight": f(16, 8), p + "input_layernorm.weight": f(8),
          p + "post_attention_layernorm.weight": f(8), p + "self_attn.q_proj.weight": f(8, 8),
          p + "self_attn.k_proj.weight": f(4, 8), p + "self_attn.v_proj.weight": f(4, 8),
          p + "self_attn.o_proj.weight": f(8, 8), p + "mlp.gate_proj.weight": f(12, 8),
          p + "mlp.up_proj.weight": f(12, 8), p + "mlp.down_proj.weight": f(8, 12)}


def test_minimal_hand_written_checkpoint_loads(tmp_path):
  _write_hf(str(tmp_path / "ok"), HF_CFG, _tensors())
  model = pdj.load_hf(str(tmp_path / "ok"))
  assert model.config.num_kv_heads == 1 and model.config.head_dim == 4


def test_folder_without_config(tmp_path):
  with pytest.raises(pdj.CheckpointError, match="config.json not found"):
    pdj.load_hf(str(tmp_path))


def test_unknown_architecture(tmp_path):
  _write_hf(str(tmp_path / "m"), dict(HF_CFG, architectures=["GPT2LMHeadModel"]), _tensors())
  with pytest.raises(pdj.CheckpointError, match="GPT2LMHeadModel"):
    pdj.load_hf(str(tmp_path / "m"))


def test_missing_tensor_is_named(tmp_path):
  t = _tensors()
  del t["model.layers.0.mlp.up_proj.weight"]
  _write_hf(str(tmp_path / "m"), HF_CFG, t)
  with pytest.raises(pdj.CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*missing"):
    pdj.load_hf(str(tmp_path / "m"))


def test_shape_mismatch_is_named(tmp_path):
  t = _tensors()
  t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 8), np.float32)
  _write_hf(str(tmp_path / "m"), HF_CFG, t)
  with pytest.raises(pdj.CheckpointError, match=r"k_proj\.weight.*\(8, 8\).*expected \(4, 8\)"):
    pdj.load_hf(str(tmp_path / "m"))


def test_missing_weights_file(tmp_path):
  os.makedirs(tmp_path / "m")
  with open(tmp_path / "m" / "config.json", "w") as f:
    json.dump(HF_CFG, f)
  with pytest.raises(pdj.CheckpointError, match="no model.safetensors"):
    pdj.load_hf(str(tmp_path / "m"))


def test_unsupported_rope_type(tmp_path):
  cfg = dict(HF_CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  _write_hf(str(tmp_path / "m"), cfg, _tensors())
  with pytest.raises(pdj.CheckpointError, match="yarn"):
    pdj.load_hf(str(tmp_path / "m"))


def test_shape_only_arch_cannot_run():
  with pytest.raises(ValueError, match="shapes only"):
    pdj.random_model(pdj.get_preset("opt-13b"))


def test_preset_param_counts():
  # Published sizes: Llama-2-7B 6.74B, Llama-3-8B 8.03B, OPT-13B 12.85B, OPT-175B 174.6B.
  for name, want in [("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9), ("opt-13b", 12.85e9),
                     ("opt-175b", 174.6e9), ("llama2-70b", 68.98e9)]:
    got = pdj.get_preset(name).num_params()
    assert abs(got - want) / want < 0.01, (name, got)
