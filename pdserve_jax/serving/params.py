"""`SamplingParams`: how one request is decoded, checked before it reaches an engine.

The field rules live in `pdserve_jax.serving.validate`, shared with the engine's own
checks. No jax here, so building params does not load it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from pdserve_jax.serving import validate


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Decoding of one prompt.

  Attributes:
    max_tokens: output tokens at most.
    temperature: 0 means greedy.
    top_k: 0 means no top-k cut.
    top_p: 1 means no nucleus cut.
    seed: None draws a fresh seed per request (sampled prompts differ run to run);
      an int makes sampling reproducible. Sample i of n uses seed + i.
    stop_token_ids: ids that end the output (the id is kept in `token_ids`).
    stop: strings that end the output; the text is cut before the first one
      (needs a tokenizer).
    ignore_eos: keep going past the model's end-of-sequence ids (honoured by default).
    n: continuations per prompt, each its own request (no shared prefill).
    logprobs: None for none; k >= 0 for the sampled token's log-probability and
      the k most likely tokens' (k <= `validate.MAX_LOGPROBS`).
  """
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: Optional[int] = None
  stop_token_ids: Sequence[int] = ()
  stop: Union[str, Sequence[str]] = ()
  ignore_eos: bool = False
  n: int = 1
  logprobs: Optional[int] = None

  def check(self) -> None:
    """Raises TypeError or ValueError whose message starts with the first bad field's name.

    Stop ids are not checked against a vocabulary here (the model is not known);
    `validate.check_sampling` does that and returns the normalised copy.
    """
    validate.normalise_sampling(self, None)
