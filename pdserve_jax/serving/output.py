"""Per-request output: the tokens a request produced, turned into what callers read.

One `RequestOutput` per request (one per completion when n > 1) holds its tokens,
their log-probabilities, its stop conditions and its text. The engine thread feeds it
one token at a time (`emit`); callers read it from other threads: `Delta`s as they
come (`deltas()`: token, text, log-probabilities, for the engine's streams and the
HTTP layer alike), or the whole completion once it ended.

Text is decoded incrementally (`IncrementalDetokenizer`): each token decodes a window
of a few tokens, never the whole output, so a long output costs O(1) per token
(`benchmarks/detokenize.py` measures it). Streamed text is never taken back: text
that could still turn out to start a stop string, or that ends inside a multi-byte
character, waits until the next token settles it. The streamed deltas concatenate to
exactly the final text (`text()`), which is cut before the first stop string.

Limits: stop strings are searched in the text produced since the last token (plus
the longest stop string's length), so a stop string is found once, where it first
ends; token ids from `stop_token_ids` and EOS end the output with the id kept.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from pdserve_jax.core.sampling import SamplingParams

# Tokens an incremental decode may hold back waiting for a character to complete;
# beyond it the replacement character is emitted, as a whole decode would show it.
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
  """Text of a growing token list, decoded a few tokens at a time.

  Each call decodes the tokens from `_prefix` (where the previous delta's decode
  started) twice: up to `_read` (the text already emitted) and to the end; the new
  text is the difference. Decoding from a few tokens back, not from the last one,
  keeps tokenizers that drop a word's leading space at the start of a decode (as
  SentencePiece does) exact. A decode ending in U+FFFD is an incomplete character:
  nothing is emitted until a later token completes it.
  """

  def __init__(self, decode: Callable[[List[int]], str]):
    self._decode = decode
    self.tokens: List[int] = []
    self._prefix = 0
    self._read = 0
    self.text = ""

  def push(self, token: int) -> str:
    """Adds `token`; returns the text it completes (often "", or several tokens' worth
    when it completes a character)."""
    self.tokens.append(token)
    return self._advance(final=False)

  def flush(self) -> str:
    """The text still held back (an incomplete character at the end), as a whole
    decode would show it."""
    return self._advance(final=True)

  def _advance(self, final: bool) -> str:
    toks = self.tokens
    if self._read == len(toks):
      return ""
    before = self._decode(toks[self._prefix:self._read])
    now = self._decode(toks[self._prefix:])
    pending = len(toks) - self._read
    if not final and now.endswith("\ufffd") and pending < MAX_PENDING_TOKENS:
      return ""
    if not now.startswith(before):
      # A tokenizer whose text of a window is not a prefix of the longer window's
      # (rare normalisers): take the longer decode from the start of the window.
      before = before[:_common_prefix(before, now)]
    delta = now[len(before):]
    self._prefix, self._read = self._read, len(toks)
    self.text += delta
    return delta


def _common_prefix(a: str, b: str) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def _partial(text: str, stop: str) -> int:
  """Length of the longest tail of `text` that is a proper prefix of `stop`."""
  for k in range(min(len(stop) - 1, len(text)), 0, -1):
    if stop.startswith(text[-k:]):
      return k
  return 0


@dataclasses.dataclass(frozen=True)
class Delta:
  """One token as callers see it: its id, the text it releases (may be empty), and,
  when the request asked for logprobs, its log-probability and the top tokens'. The
  last delta of an output may carry text alone (`token` None): what was held back
  until the end."""
  token: Optional[int]
  text: str
  logprob: Optional[float] = None
  top_logprobs: Optional[Dict[int, float]] = None


class RequestOutput:
  """The output of one request (one completion); see the module docstring.

  Written by the engine thread only (`emit`, `end`); read from any thread.
  """

  def __init__(self, prompt: List[int], params: SamplingParams, stop_ids: frozenset = frozenset(),
               detokenize: Optional[Callable[[List[int]], str]] = None):
    self.prompt, self.params = prompt, params
    self.tokens: List[int] = []
    self.logprobs: List[float] = []
    self.top_logprobs: List[Dict[int, float]] = []
    self.stop_ids = stop_ids
    self.stop_strings: Tuple[str, ...] = tuple(params.stop)
    self._longest_stop = max((len(s) for s in self.stop_strings), default=0)
    self._detok = IncrementalDetokenizer(detokenize) if detokenize is not None else None
    self.stop_reason: Union[int, str, None] = None  # the id or string that ended it
    self._text_end: Optional[int] = None  # where a stop string cut the text
    self._sent = 0  # characters of text released to `deltas()`
    self._stream: "queue.SimpleQueue[Optional[Delta]]" = queue.SimpleQueue()
    self.finished = threading.Event()
    self.error: Optional[BaseException] = None

  # -- the engine thread --------------------------------------------------------------

  def emit(self, token: int, logprob: float = 0.0,
           top: Optional[Tuple[Sequence[int], Sequence[float]]] = None) -> bool:
    """Records `token`; returns whether it ends the output (a stop id or string)."""
    self.tokens.append(token)
    k = self.params.logprobs
    lp, top_d = None, None
    if k is not None:
      lp = float(logprob)
      self.logprobs.append(lp)
      if k and top is not None:
        ids, lps = top
        top_d = {int(i): float(v) for i, v in zip(ids[:k], lps[:k])}
        self.top_logprobs.append(top_d)
    stop = token in self.stop_ids
    if stop:
      self.stop_reason = token
    if self._detok is not None:
      old = len(self._detok.text)
      self._detok.push(token)
      if not stop and self.stop_strings:
        stop = self._find_stop(self._detok.text, old)
    self._stream.put(Delta(token, self._release(final=stop), lp, top_d))
    return stop

  def _find_stop(self, text: str, old_len: int) -> bool:
    """Whether a stop string ends in `text` after its first `old_len` characters."""
    start = max(0, old_len - self._longest_stop + 1)
    hits = [(i, s) for s in self.stop_strings if (i := text.find(s, start)) >= 0]
    if hits:
      self._text_end, self.stop_reason = min(hits)
      return True
    return False

  def _release(self, final: bool) -> str:
    """Text newly safe to show: all of it once final, else what no stop string and no
    incomplete character can still claim."""
    if self._detok is None:
      return ""
    if final:
      self._detok.flush()
    text = self._detok.text
    end = len(text) if self._text_end is None else self._text_end
    if not final:
      for s in self.stop_strings:
        end = min(end, len(text) - _partial(text, s))
    if end <= self._sent:
      return ""
    out, self._sent = text[self._sent:end], end
    return out

  def end(self, error: Optional[BaseException] = None) -> None:
    """The request ended (finished, aborted or failed); the first end wins."""
    if self.finished.is_set():
      return
    if error is not None and self.error is None:
      self.error = error
    if error is None:
      rest = self._release(final=True)
      if rest:
        self._stream.put(Delta(None, rest))
    self.finished.set()
    self._stream.put(None)

  # -- readers ------------------------------------------------------------------------

  def deltas(self) -> Iterator[Delta]:
    """Each token's `Delta` as it comes, then any text held back to the end; raises
    the request's error if it failed. One reader per output."""
    while True:
      d = self._stream.get()
      if d is None:
        break
      yield d
    if self.error is not None:
      raise self.error

  def text(self) -> Optional[str]:
    """The output as text, cut before a stop string; None without a tokenizer."""
    if self._detok is None:
      return None
    if self.finished.is_set():
      self._detok.flush()
    text = self._detok.text
    return text if self._text_end is None else text[:self._text_end]
