"""Profile this library's programs on the current backend and fit DistServe's form."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.kind = "polynomial"  # or "shapes": time every compiled shape instead of fitting
  c.model = "small"
  c.init_std = 0.1
  c.tp = 1
  c.page_size = 16
  c.num_pages = 128
  c.max_batch = 16
  c.max_seq_len = 256
  c.min_token_bucket = 32
  # Lengths between bucket edges too, so the fit averages the padding a workload pays.
  c.prefill_batches = (1, 2, 3, 4)
  c.prefill_lens = (16, 24, 40, 56, 72, 96, 112, 128)
  c.max_step_tokens = 512
  c.decode_batches = (1, 2, 3, 4, 6, 8, 12, 16)
  c.decode_contexts = (24, 40, 56, 72, 100, 128, 160, 200, 256)
  c.reps = 5
  return c
