"""Text in and out: string prompts, EOS, stop strings, n > 1, fresh seeds, logprobs.

A random byte-level model (vocabulary 264, the byte tokenizer's 258 ids plus
padding) stands in for a trained one: what is checked is the engine's handling
of text, which a random model exercises as well as a trained one.
"""

import jax
import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.model.tokenizer import byte_tokenizer

CFG = pdj.get_preset("tiny").replace(vocab_size=264, num_heads=8, num_kv_heads=4, head_dim=8)
BASE = dict(page_size=8, num_pages=96, max_seq_len=96, warmup=False,
            min_token_bucket=64)
PROMPT = "Once upon a time"


# One mode: text is decoded from the tokens after they are sampled, the same way in
# every mode, and test_engine checks every mode's tokens against the reference.
DEPLOYMENT = pdj.Colocated(pdj.InstanceSpec(tp=2, max_batch=8, max_step_tokens=80))


@pytest.fixture(scope="module")
def model():
  m = pdj.random_model(CFG, seed=3, std=0.3)
  return pdj.Model(m.config, m.params, tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def engine(model):
  with pdj.Engine(model, DEPLOYMENT, pdj.EngineConfig(**BASE)) as e:
    yield e


def _greedy(model, text, n):
  ids = model.tokenizer.encode(text)
  return pdj.greedy_reference(model, [ids], n)[0]


def test_generate_text_is_the_greedy_text(engine, model):
  want_ids = _greedy(model, PROMPT, 32)
  (res,) = engine.generate([PROMPT], pdj.SamplingParams(max_tokens=32))
  assert res.token_ids == want_ids
  assert res.prompt_text == PROMPT and res.prompt == model.tokenizer.encode(PROMPT)
  assert isinstance(res.text, str) and res.text == model.tokenizer.decode(want_ids)


def test_eos_ends_the_output_unless_ignored(model):
  greedy = _greedy(model, PROMPT, 24)
  k = 6  # make the 7th greedy token the model's EOS
  eos_model = pdj.Model(model.config, model.params, model.tokenizer, (greedy[k],))
  with pdj.Engine(eos_model, DEPLOYMENT, pdj.EngineConfig(**BASE)) as e:
    stopped, ignored = e.generate([PROMPT, PROMPT], [
        pdj.SamplingParams(max_tokens=24), pdj.SamplingParams(max_tokens=24, ignore_eos=True)])
  first = greedy.index(greedy[k])  # the EOS id may also come earlier
  assert stopped.token_ids == greedy[:first + 1]
  assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == greedy[k]
  assert ignored.token_ids == greedy and ignored.finish_reason == "length"


def test_stop_string_cuts_the_text_where_it_first_appears(engine, model):
  tok = model.tokenizer
  greedy = _greedy(model, PROMPT, 40)
  full = tok.decode(greedy)
  # Two printable ASCII characters that first appear some way into the output.
  at = next(i for i in range(4, len(full) - 1)
            if full[i:i + 2].isascii() and full[i:i + 2].isprintable()
            and full.find(full[i:i + 2]) == i)
  stop = full[at:at + 2]
  (res,) = engine.generate([PROMPT], pdj.SamplingParams(max_tokens=40, stop=[stop, "\x00!"]))
  # The output ends at the first token whose text completes the stop string.
  n = next(t for t in range(1, len(greedy) + 1) if stop in tok.decode(greedy[:t]))
  assert res.token_ids == greedy[:n]
  assert res.text == full[:at] and stop not in res.text
  assert res.finish_reason == "stop" and res.outputs[0].stop_reason == stop


def test_sampling_without_a_seed_differs_and_with_a_seed_repeats(engine):
  free = pdj.SamplingParams(max_tokens=24, temperature=1.0)
  a, b = engine.generate([PROMPT, PROMPT], free)
  assert a.token_ids != b.token_ids
  seeded = pdj.SamplingParams(max_tokens=24, temperature=1.0, seed=1234)
  c, d = engine.generate([PROMPT, PROMPT], seeded)
  (e,) = engine.generate([PROMPT], seeded)
  assert c.token_ids == d.token_ids == e.token_ids
  assert c.text == e.text


def test_n_completions_are_the_single_requests_of_seeds_seed_plus_i(engine):
  params = pdj.SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=77, n=3)
  (res,) = engine.generate([PROMPT], params)
  assert [c.index for c in res.outputs] == [0, 1, 2]
  singles = engine.generate([PROMPT] * 3, [pdj.SamplingParams(
      max_tokens=16, temperature=1.0, top_k=50, seed=77 + i) for i in range(3)])
  assert [c.token_ids for c in res.outputs] == [s.token_ids for s in singles]
  assert len({tuple(c.token_ids) for c in res.outputs}) > 1
  with pytest.raises(ValueError, match="outputs"):
    _ = res.token_ids
  with pytest.raises(TypeError, match="n=3"):
    list(engine.submit(PROMPT, params))


def test_logprobs_are_the_model_distribution(engine, model):
  ids = model.tokenizer.encode(PROMPT)
  (res,) = engine.generate([ids], pdj.SamplingParams(max_tokens=8, logprobs=3))
  assert res.text is not None and len(res.logprobs) == len(res.token_ids) == 8
  seq = ids + res.token_ids
  logits = np.asarray(pdj.forward(model, np.array([seq[:-1]], np.int32)))[0]
  want = np.asarray(jax.nn.log_softmax(logits[len(ids) - 1:], axis=-1))
  for t, (tok, lp, top) in enumerate(zip(res.token_ids, res.logprobs, res.top_logprobs)):
    np.testing.assert_allclose(lp, want[t, tok], rtol=1e-4, atol=1e-4)
    assert len(top) == 3 and tok in top  # greedy: the sampled token is the likeliest
    best = np.argsort(-want[t])[:3]
    np.testing.assert_allclose([top[int(i)] for i in best], want[t, best], rtol=1e-4,
                               atol=1e-4)
  (plain,) = engine.generate([ids], pdj.SamplingParams(max_tokens=8))
  assert plain.logprobs is None and plain.top_logprobs is None
  (only,) = engine.generate([ids], pdj.SamplingParams(max_tokens=8, logprobs=0))
  assert len(only.logprobs) == 8 and only.top_logprobs is None


@pytest.mark.parametrize("params, error, match", [
    (dict(n=0), ValueError, "^n "),
    (dict(n=1.5), TypeError, "^n "),
    (dict(logprobs=6), ValueError, "^logprobs"),
    (dict(stop=[""]), ValueError, r"^stop\[0\]"),
    (dict(stop=[3]), TypeError, r"^stop\[0\]"),
    (dict(stop=b"x"), TypeError, "^stop"),
    (dict(ignore_eos=1), TypeError, "^ignore_eos"),
])
def test_bad_text_params_name_the_field(engine, params, error, match):
  with pytest.raises(error, match=match):
    engine.submit(PROMPT, pdj.SamplingParams(max_tokens=4, **params))
  assert engine.stats()["unfinished"] == 0


def test_text_needs_a_tokenizer_and_prompts_a_list(model):
  bare = pdj.Model(model.config, model.params)
  with pdj.Engine(bare, DEPLOYMENT, pdj.EngineConfig(**BASE)) as e:
    with pytest.raises(TypeError, match="no tokenizer"):
      e.submit(PROMPT)
    with pytest.raises(ValueError, match="^stop: .*tokenizer"):
      e.submit([1, 2, 3], pdj.SamplingParams(stop="x"))
    with pytest.raises(TypeError, match="list of prompts"):
      e.generate([1, 2, 3])
    (res,) = e.generate([[1, 2, 3]], pdj.SamplingParams(max_tokens=4))
    assert res.text is None and len(res.token_ids) == 4
    # One bad prompt in a batch: nothing of the batch is served.
    with pytest.raises(ValueError, match="vocabulary"):
      e.generate([[1, 2], [999]])
    assert e.stats()["unfinished"] == 0
