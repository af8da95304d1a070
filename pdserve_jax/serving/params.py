"""`SamplingParams`: how one request is decoded, checked before it reaches an engine."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 0.0  # 0 means greedy
  top_k: int = 0  # 0 means no top-k cut
  top_p: float = 1.0
  seed: int = 0
  stop_token_ids: Sequence[int] = ()

  def check(self) -> None:
    """Raises ValueError naming the first bad field."""
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      raise ValueError(f"seed must be an int in [0, 2**31), got {self.seed!r}")
