"""`SamplingParams`: how one request is decoded, checked before it reaches an engine.

The field rules live in `pdserve_jax.serving.validate`, shared with the engine's own
checks. No jax here, so building params does not load it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from pdserve_jax.serving import validate


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 0.0  # 0 means greedy
  top_k: int = 0  # 0 means no top-k cut
  top_p: float = 1.0
  seed: int = 0
  stop_token_ids: Sequence[int] = ()

  def check(self) -> None:
    """Raises TypeError or ValueError whose message starts with the first bad field's name.

    Stop ids are not checked against a vocabulary here (the model is not known);
    `validate.check_sampling` does that and returns the normalised copy.
    """
    validate.normalise_sampling(self, None)
