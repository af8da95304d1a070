"""Parity of pdj.load_hf + pdj.forward against HF transformers on tiny random models."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import pdserve_jax as pdj  # noqa: E402

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.25, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
               "rope_theta": 50000.0}

CASES = {
    "gqa": dict(model="llama"),
    "mha": dict(model="llama", num_key_value_heads=8),
    "llama3_rope": dict(model="llama", rope_parameters=LLAMA3_ROPE),
    "tied": dict(model="llama", tie_word_embeddings=True),
    "bf16_as_f32": dict(model="llama", torch_dtype=torch.bfloat16),
    "qwen2_bias": dict(model="qwen2"),
    "sharded": dict(model="llama", shard="20KB"),
    "old_style_config": dict(model="llama", rope_parameters=LLAMA3_ROPE, old_style=True),
}


def make_hf(tmp_path, name, model="llama", torch_dtype=torch.float32, shard=None,
            old_style=False, **overrides):
  torch.manual_seed(sum(map(ord, name)))
  kw = dict(BASE, **overrides)
  if model == "qwen2":
    kw.pop("rope_parameters", None)
    cfg = transformers.Qwen2Config(**kw)
    hf = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(**kw)
    hf = transformers.LlamaForCausalLM(cfg)
  hf = hf.to(torch_dtype).eval()
  path = str(tmp_path / name)
  hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
  if old_style:  # Rewrite config.json the way transformers 4.x wrote it.
    with open(os.path.join(path, "config.json")) as f:
      c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    c["torch_dtype"] = c.pop("dtype", "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(c, f)
  # Reload in float32 (as pdj does): casting a live model also rounds its RoPE buffer.
  cls = type(hf)
  return cls.from_pretrained(path, dtype=torch.float32).eval(), path


def prompts(seed, vocab, lengths=(5, 17, 1, 40, 23)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_hf(tmp_path, case):
  hf, path = make_hf(tmp_path, case, **CASES[case])
  if case == "sharded":
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  model = pdj.load_hf(path, dtype="float32")
  assert model.params["embed"].dtype == jnp.float32

  seqs = prompts(1, BASE["vocab_size"])
  T = max(map(len, seqs))
  batch = np.zeros((len(seqs), T), np.int32)
  for b, s in enumerate(seqs):
    batch[b, :len(s)] = s
  ours = np.asarray(pdj.forward(model, batch))
  spread = 0.0
  for b, s in enumerate(seqs):
    with torch.no_grad():
      ref = hf(torch.tensor([s])).logits[0].numpy()
    np.testing.assert_allclose(ours[b, :len(s)], ref, atol=1e-4, rtol=0,
                               err_msg=f"{case}: sequence {b}")
    spread = max(spread, float(ref.std()))
  assert spread > 1.0, f"logits too flat to be a meaningful check (std {spread})"

  gen = prompts(2, BASE["vocab_size"], lengths=(6, 13))
  ours_tokens = pdj.greedy_reference(model, gen, 32)
  hf.generation_config.eos_token_id = None  # no early stop: compare all 32 tokens
  for s, mine in zip(gen, ours_tokens):
    with torch.no_grad():
      out = hf.generate(torch.tensor([s]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    theirs = out[0, len(s):].tolist()
    assert len(theirs) == 32 and mine == theirs, f"{case}: greedy tokens differ"


def test_bf16_load_keeps_dtype(tmp_path):
  _, path = make_hf(tmp_path, "bf16", torch_dtype=torch.bfloat16)
  model = pdj.load_hf(path)
  assert model.params["layers"]["wq"].dtype == jnp.bfloat16
  logits = pdj.forward(model, np.array([[1, 2, 3]], np.int32))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
