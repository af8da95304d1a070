"""`SamplingParams` (how one request is decoded) and the checks of a request's prompt
and sampling parameters before an engine accepts it.

Each check either returns a normalised value (plain Python ints and floats, so numpy
scalars never reach the scheduler or a jitted program's host-side arrays) or raises
TypeError / ValueError whose message starts with the offending field's name.

Limits: the checks only look at values, not at what a given engine can serve: that a
prompt plus `max_tokens` fits the sequence length or the KV pool is for the engine to
decide. Pure Python + numpy, so building params does not load jax.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

# Sampling ids and top-k travel to the device as int32.
INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**31
# Top logprobs a request may ask per token: OpenAI's completions API allows at most 5,
# and the compiled programs return that many (`runtime.sampling.MAX_LOGPROBS`, kept equal
# by tests/test_imports.py).
MAX_LOGPROBS = 5
# Continuations per prompt; each is a request of its own.
MAX_N = 64


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
      the k most likely tokens' (k <= `MAX_LOGPROBS`).
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
    `check_sampling` does that and returns the normalised copy.
    """
    normalise_sampling(self, None)


def is_int(x: Any) -> bool:
  """A Python or numpy int, not a bool."""
  # bool is an int subclass, but True as a token id or a count is always a caller bug.
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))



def is_real(x: Any) -> bool:
  """A Python or numpy real number, not a bool."""
  return (isinstance(x, (numbers.Real, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


def _describe(x: Any) -> str:
  return f"{x!r} ({type(x).__name__})"


def _int_field(name: str, x: Any, lo: int, hi: float, what: str) -> int:
  """`x` as a Python int in [lo, hi]; `what` describes the range in messages."""
  if not is_int(x):
    raise TypeError(f"{name} must be an int {what}, got {_describe(x)}")
  v = int(x)
  if not lo <= v <= hi:
    raise ValueError(f"{name} must be an int {what}, got {v}")
  return v


def _real_field(name: str, x: Any) -> float:
  if not is_real(x):
    raise TypeError(f"{name} must be a real number, got {_describe(x)}")
  v = float(x)
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}")
  return v


def _token_ids(name: str, ids: Iterable[Any], vocab_size: Optional[int]) -> List[int]:
  """Plain ints from an ordered iterable of int ids; range-checked when vocab_size is set."""
  if isinstance(ids, (str, bytes, bytearray)) or is_int(ids):
    raise TypeError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
  if isinstance(ids, collections.abc.Mapping):
    raise TypeError(f"{name} must be a sequence of int token ids, got a mapping "
                    f"({type(ids).__name__})")
  if isinstance(ids, np.ndarray):
    if ids.ndim != 1:
      raise TypeError(f"{name} must be a 1-D array of token ids, got shape {ids.shape}")
    # Bool arrays are kind 'b', so they fail here too.
    if ids.dtype.kind not in "iu":
      raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    out = ids.tolist()
  else:
    try:
      items = list(ids)
    except TypeError:
      raise TypeError(f"{name} must be a sequence of int token ids, got "
                      f"{type(ids).__name__}") from None
    for i, t in enumerate(items):
      if not is_int(t):
        raise TypeError(f"{name}[{i}] must be an int token id, got {_describe(t)}")
    out = [int(t) for t in items]
  if vocab_size is None:
    bad = [t for t in out if t < 0]
    if bad:
      raise ValueError(f"{name} has negative token ids {bad[:5]}")
  else:
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"{name} token ids {bad[:5]} are outside the vocabulary "
                       f"[0, {vocab_size})")
  return out


def check_prompt(prompt: Any, vocab_size: int, max_len: int) -> List[int]:
  """The prompt as a list of Python ints in [0, vocab_size), 1 to max_len of them.

  Accepts a list, tuple or other ordered iterable of Python / numpy ints, or a 1-D
  numpy integer array. Sets are refused: their order is not the caller's.
  """
  if isinstance(prompt, collections.abc.Set):
    raise TypeError(f"prompt must be an ordered sequence of int token ids, got "
                    f"{type(prompt).__name__}")
  ids = _token_ids("prompt", prompt, vocab_size)
  if not ids:
    raise ValueError("prompt is empty")
  if len(ids) > max_len:
    raise ValueError(f"prompt of {len(ids)} tokens exceeds the longest this engine takes "
                     f"({max_len})")
  return ids


def normalise_sampling(params: SamplingParams,
                       vocab_size: Optional[int]) -> SamplingParams:
  """The field rules behind both `check_sampling` and `SamplingParams.check`.

  vocab_size=None skips the vocabulary range check of `stop_token_ids` (only
  negative ids are refused then), for callers that do not know the model yet.
  """
  max_tokens = _int_field("max_tokens", params.max_tokens, 1, math.inf, ">= 1")
  temperature = _real_field("temperature", params.temperature)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
  top_k = _int_field("top_k", params.top_k, 0, INT32_MAX, f"in [0, {INT32_MAX}] (0 means off)")
  top_p = _real_field("top_p", params.top_p)
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
  seed = params.seed
  if seed is not None:
    seed = _int_field("seed", seed, 0, SEED_LIMIT - 1, "in [0, 2**31) or None")
  stop_ids: Tuple[int, ...] = ()
  if params.stop_token_ids is not None:
    stop_ids = tuple(_token_ids("stop_token_ids", params.stop_token_ids, vocab_size))
  stop = _stop_strings(params.stop)
  if not isinstance(params.ignore_eos, (bool, np.bool_)):
    raise TypeError(f"ignore_eos must be a bool, got {_describe(params.ignore_eos)}")
  n = _int_field("n", params.n, 1, MAX_N, f"in [1, {MAX_N}]")
  logprobs = params.logprobs
  if logprobs is not None:
    logprobs = _int_field("logprobs", logprobs, 0, MAX_LOGPROBS,
                          f"in [0, {MAX_LOGPROBS}] or None")
  return dataclasses.replace(params, max_tokens=max_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_ids,
                             stop=stop, ignore_eos=bool(params.ignore_eos), n=n,
                             logprobs=logprobs)


def _stop_strings(stop: Any) -> Tuple[str, ...]:
  """A str or a sequence of non-empty strs, as a tuple (OpenAI's `stop` accepts both)."""
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = (stop,)
  if isinstance(stop, (bytes, bytearray, collections.abc.Mapping)) or not isinstance(
      stop, collections.abc.Iterable):
    raise TypeError(f"stop must be a str or a sequence of str, got {type(stop).__name__}")
  out = tuple(stop)
  for i, s in enumerate(out):
    if not isinstance(s, str):
      raise TypeError(f"stop[{i}] must be a str, got {_describe(s)}")
    if not s:
      raise ValueError(f"stop[{i}] is an empty string")
  return out


def check_sampling(params: Any, vocab_size: int) -> SamplingParams:
  """A copy of `params` with plain Python values, stop ids as a tuple in [0, vocab_size).

  top_k above the vocabulary is kept: it means no cut. seed=None stays None (the
  engine draws one).
  """
  if not isinstance(params, SamplingParams):
    raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
  return normalise_sampling(params, vocab_size)
