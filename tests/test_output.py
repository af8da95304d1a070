"""The output processor (`serving.output`): streamed text equals the final text, is
never taken back, and stops where a stop string begins, for byte-level and
SentencePiece-style tokenizers, multi-byte characters and stop strings that span
tokens."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from pdserve_jax.core.sampling import SamplingParams
from pdserve_jax.model.tokenizer import byte_tokenizer
from pdserve_jax.serving.output import IncrementalDetokenizer, RequestOutput

BYTES = byte_tokenizer()


def _bytes_decode(ids):
  return bytes(ids).decode("utf-8", errors="replace")


def _run(text_ids, decode, stop=(), stop_ids=()):
  """Feeds ids until the output stops; returns (the output, its deltas' text)."""
  out = RequestOutput([1], SamplingParams(max_tokens=len(text_ids), stop=stop),
                      frozenset(stop_ids), decode)
  for t in text_ids:
    if out.emit(t):
      break
  out.end()
  return out, "".join(d.text for d in out.deltas())


def test_stop_string_across_tokens_is_cut_and_never_streamed():
  # Catches: streaming "L", "LO", "LOR" before knowing they start the stop string,
  # or a stop string found only when it lies inside one token.
  text = "Amen. And the LORD said: é"
  out = RequestOutput([1], SamplingParams(max_tokens=64, stop=("LORD",)), frozenset(),
                      _bytes_decode)
  sent = ""
  for t in text.encode():
    stopped = out.emit(t)
    d = out._stream.get()
    sent += d.text
    if stopped:
      break
    assert "L" not in sent
  out.end()
  assert out.stop_reason == "LORD" and out.text() == sent == "Amen. And the "


def test_held_back_prefix_that_is_no_stop_string_is_released():
  # Catches: a held-back "LO" that never comes out when it turns out to be "LOVE".
  out, streamed = _run(list(b"LOVE"), _bytes_decode, stop=("LORD",))
  assert streamed == out.text() == "LOVE" and out.stop_reason is None


def test_multibyte_characters_come_out_whole():
  # Catches: emitting U+FFFD for a character whose bytes have not all arrived.
  text = "né 日本 🎉 done"
  out = RequestOutput([1], SamplingParams(max_tokens=64), frozenset(), _bytes_decode)
  for t in text.encode():
    out.emit(t)
  out.end()
  deltas = [d.text for d in out.deltas()]
  assert "\ufffd" not in "".join(deltas)
  assert "".join(deltas) == out.text() == text


def test_stop_token_keeps_its_id_and_ends_text_before_it():
  # The byte tokenizer's EOS (257) ends the output; its text is empty.
  ids = BYTES.encode("the king")[1:] + [257]
  out, streamed = _run(ids + [ord("x")], BYTES.decode, stop_ids=(257,))
  assert out.tokens[-1] == 257 and out.stop_reason == 257
  assert streamed == out.text() == "the king"


def _sentencepiece_like():
  """A tokenizer that, like SentencePiece, drops the leading space of the first word
  when a decode starts at a word piece ("▁the" alone decodes to "the")."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  words = ["▁the", "▁king", "▁said", "▁unto", "▁them", "s", "!", "▁é", "t"]
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t"))
  tk.pre_tokenizer = pre_tokenizers.Metaspace()
  tk.decoder = decoders.Metaspace()
  return tk, len(words)


def test_leading_space_tokenizer_streams_exactly_the_whole_decode():
  # Catches: decoding each new token alone, which drops every word's space.
  tk, n = _sentencepiece_like()
  decode = lambda ids: tk.decode(ids)
  rng = random.Random(0)
  for _ in range(20):
    ids = [rng.randrange(n) for _ in range(rng.randrange(1, 30))]
    out, streamed = _run(ids, decode)
    assert streamed == out.text() == decode(ids)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab é日🎉LORD"), max_size=40),
       st.lists(st.text(alphabet="abLORD é", min_size=1, max_size=4), max_size=3))
def test_streamed_text_equals_final_text(text, stop):
  """Any text and stop strings: the deltas add up to the final text, which is the
  whole decode cut before the first stop string to appear."""
  ids = list(text.encode())
  out, streamed = _run(ids, _bytes_decode, stop=tuple(stop))
  assert streamed == out.text()
  whole = _bytes_decode(out.tokens)
  if out.stop_reason is None:
    assert out.text() == whole == text
  else:
    assert out.text() == whole[:whole.find(out.stop_reason)]
    assert all(s not in out.text() for s in stop)


def test_detokenizer_decodes_a_window_not_the_whole_output():
  # Catches: re-decoding the whole output on every token (quadratic in its length).
  seen = []

  def decode(ids):
    seen.append(len(ids))
    return _bytes_decode(ids)

  d = IncrementalDetokenizer(decode)
  for t in ("x" * 2000).encode():
    d.push(t)
  assert d.text == "x" * 2000 and max(seen) <= 2


def test_no_tokenizer_means_no_text():
  out, streamed = _run([5, 6], None)
  assert out.text() is None and streamed == ""


@pytest.mark.parametrize("logprobs", [None, 0, 2])
def test_logprobs_ride_with_each_delta(logprobs):
  out = RequestOutput([1], SamplingParams(max_tokens=4, logprobs=logprobs), frozenset(),
                      _bytes_decode)
  out.emit(ord("a"), -0.5, ([97, 98, 99], [-0.5, -1.0, -2.0]))
  out.end()
  (d,) = [d for d in out.deltas() if d.token is not None]
  if logprobs is None:
    assert d.logprob is None and out.logprobs == []
  else:
    assert d.logprob == -0.5 and out.logprobs == [-0.5]
    assert (d.top_logprobs or {}) == ({97: -0.5, 98: -1.0} if logprobs == 2 else {})
