"""What crosses between an executor and a runner: per-row sampling parameters in,
sampled tokens out. Host-side types only (no jax), so the engine loop, the router
and the wire format use them without loading it."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np


class Sampled(NamedTuple):
  """A program call's sampled tokens (device or host arrays, padded rows included)."""
  tokens: Any  # i32 [B]; -1 where the row's logits were not finite
  logprobs: Any  # f32 [B]: log-probability of each token
  top_ids: Any  # i32 [B, K]: the K most likely tokens (K = runtime.sampling.MAX_LOGPROBS)
  top_logprobs: Any  # f32 [B, K]


class PromptLogprobs(NamedTuple):
  """Per prompt token after the first (host arrays): its log-probability given the
  tokens before it, and the ids and log-probabilities of the most likely tokens at
  its position (`runtime.scoring`)."""
  logprobs: np.ndarray  # f32 [T - 1]
  top_ids: np.ndarray  # i32 [T - 1, K]
  top_logprobs: np.ndarray  # f32 [T - 1, K]


@dataclasses.dataclass
class SamplingRows:
  """Per-row sampling parameters, host side."""
  temperature: np.ndarray  # f32 [B]
  top_k: np.ndarray  # i32 [B]
  top_p: np.ndarray  # f32 [B]
  seed: np.ndarray  # i32 [B]
  token_index: np.ndarray  # i32 [B]: which output token of the request is drawn

  @staticmethod
  def greedy(n: int) -> "SamplingRows":
    return SamplingRows(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                        np.zeros(n, np.int32), np.zeros(n, np.int32))

  def padded(self, n: int) -> "SamplingRows":
    pad = lambda a, v: np.concatenate([a, np.full(n - len(a), v, a.dtype)])
    return SamplingRows(pad(self.temperature, 0), pad(self.top_k, 0), pad(self.top_p, 1),
                        pad(self.seed, 0), pad(self.token_index, 0))

  def arrays(self):
    return (self.temperature, self.top_k, self.top_p, self.seed, self.token_index)
