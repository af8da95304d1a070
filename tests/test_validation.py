"""Prompt and sampling-parameter checks, the engine config's and whether an engine can
serve a deployment: each rule, its message, and normalisation."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pdserve_jax.core.deploy import Colocated, Disaggregated, InstanceSpec, PhaseOnly, SemiPD
from pdserve_jax.core.sampling import SamplingParams
from pdserve_jax.core.sampling import check_prompt, check_sampling
from pdserve_jax.model.config import get_preset
from pdserve_jax.serving.config import EngineConfig, check_servable

V = 100
MAX_LEN = 8


# -- prompts -----------------------------------------------------------------

@pytest.mark.parametrize("prompt, want", [
    ([1, 2, 3], [1, 2, 3]),
    ((0, V - 1), [0, V - 1]),
    (np.array([5, 6, 7], np.int32), [5, 6, 7]),
    (np.array([5], np.uint8), [5]),
    ([np.int64(4), 2, np.int16(9)], [4, 2, 9]),
    (range(3), [0, 1, 2]),
    (list(range(MAX_LEN)), list(range(MAX_LEN))),
])
def test_prompt_accepted(prompt, want):
  got = check_prompt(prompt, V, MAX_LEN)
  assert got == want
  assert all(type(t) is int for t in got)


@pytest.mark.parametrize("prompt", [
    "abc", b"abc", {1: 2}, 5, None, 3.0,
    [1, True], [1, 2.0], [3.0], [1, None], [[1, 2]], [1, "2"], {1, 2},
    np.array([1.0, 2.0]), np.array([[1, 2]], np.int32), np.array(3, np.int32),
    np.array([True, False]),
])
def test_prompt_bad_type(prompt):
  with pytest.raises(TypeError, match="^prompt"):
    check_prompt(prompt, V, MAX_LEN)


@pytest.mark.parametrize("prompt, match", [
    ([], "^prompt is empty$"),
    (np.array([], np.int32), "^prompt is empty$"),
    ([1, V, -1, 2], rf"^prompt token ids \[{V}, -1\] are outside the vocabulary \[0, {V}\)"),
    (np.array([V + 5], np.int64), r"outside the vocabulary \[0, 100\)"),
    (list(range(MAX_LEN + 1)),
     rf"^prompt of {MAX_LEN + 1} tokens exceeds the longest this engine takes \({MAX_LEN}\)$"),
])
def test_prompt_bad_value(prompt, match):
  with pytest.raises(ValueError, match=match):
    check_prompt(prompt, V, MAX_LEN)


# -- sampling params ---------------------------------------------------------

@pytest.mark.parametrize("field, value, want", [
    ("max_tokens", 1, 1),
    ("max_tokens", np.int32(7), 7),
    ("temperature", 0, 0.0),
    ("temperature", np.float32(0.5), 0.5),
    ("temperature", np.int64(2), 2.0),
    ("temperature", 1e6, 1e6),
    ("top_k", 0, 0),
    ("top_k", 10 * V, 10 * V),  # above the vocabulary: no cut
    ("top_k", 2**31 - 1, 2**31 - 1),
    ("top_k", np.uint16(3), 3),
    ("top_p", 1, 1.0),
    ("top_p", np.float64(0.25), 0.25),
    ("top_p", 1e-9, 1e-9),
    ("seed", None, None),
    ("seed", 0, 0),
    ("seed", 2**31 - 1, 2**31 - 1),
    ("seed", np.int64(5), 5),
    ("stop_token_ids", None, ()),
    ("stop_token_ids", [], ()),
    ("stop_token_ids", [0, V - 1], (0, V - 1)),
    ("stop_token_ids", (np.int32(3),), (3,)),
    ("stop_token_ids", np.array([4, 5], np.int64), (4, 5)),
    ("stop_token_ids", iter([6]), (6,)),
])
def test_sampling_accepted_and_normalised(field, value, want):
  got = check_sampling(dataclasses.replace(SamplingParams(), **{field: value}), V)
  assert getattr(got, field) == want
  assert type(getattr(got, field)) is type(want)
  assert type(got.stop_token_ids) is tuple
  assert all(type(t) is int for t in got.stop_token_ids)


@pytest.mark.parametrize("field, value, error", [
    ("max_tokens", 0, ValueError),
    ("max_tokens", -3, ValueError),
    ("max_tokens", True, TypeError),
    ("max_tokens", np.bool_(True), TypeError),
    ("max_tokens", 4.0, TypeError),
    ("max_tokens", None, TypeError),
    ("max_tokens", "4", TypeError),
    ("temperature", -0.1, ValueError),
    ("temperature", math.nan, ValueError),
    ("temperature", math.inf, ValueError),
    ("temperature", np.float32("nan"), ValueError),
    ("temperature", True, TypeError),
    ("temperature", None, TypeError),
    ("temperature", "0.5", TypeError),
    ("top_k", -1, ValueError),
    ("top_k", 2**31, ValueError),
    ("top_k", np.int64(2**40), ValueError),
    ("top_k", False, TypeError),
    ("top_k", 5.0, TypeError),
    ("top_p", 0, ValueError),
    ("top_p", 0.0, ValueError),
    ("top_p", 1.0001, ValueError),
    ("top_p", -0.5, ValueError),
    ("top_p", math.nan, ValueError),
    ("top_p", math.inf, ValueError),
    ("top_p", True, TypeError),
    ("top_p", None, TypeError),
    ("seed", -1, ValueError),
    ("seed", 2**31, ValueError),
    ("seed", True, TypeError),
    ("seed", 1.0, TypeError),
    ("stop_token_ids", 3, TypeError),
    ("stop_token_ids", np.int32(3), TypeError),
    ("stop_token_ids", "12", TypeError),
    ("stop_token_ids", b"12", TypeError),
    ("stop_token_ids", 2.5, TypeError),
    ("stop_token_ids", [1, 2.0], TypeError),
    ("stop_token_ids", [True], TypeError),
    ("stop_token_ids", [None], TypeError),
    ("stop_token_ids", np.array([1.0]), TypeError),
    ("stop_token_ids", [V], ValueError),
    ("stop_token_ids", [-1], ValueError),
])
def test_sampling_rejected(field, value, error):
  params = dataclasses.replace(SamplingParams(), **{field: value})
  with pytest.raises(error, match=f"^{field}"):
    check_sampling(params, V)


def test_top_k_message_names_the_bound():
  with pytest.raises(ValueError, match=str(2**31 - 1)):
    check_sampling(SamplingParams(top_k=2**31), V)


def test_sampling_rejects_non_params():
  for bad in (None, {"max_tokens": 3}, dataclasses.asdict(SamplingParams())):
    with pytest.raises(TypeError, match="SamplingParams"):
      check_sampling(bad, V)


def test_params_check_uses_the_same_rules():
  SamplingParams().check()
  SamplingParams(stop_token_ids=[10 * V]).check()  # no vocabulary known: no range check
  with pytest.raises(ValueError, match="^stop_token_ids"):
    SamplingParams(stop_token_ids=[-1]).check()
  with pytest.raises(TypeError, match="^temperature"):
    SamplingParams(temperature=True).check()
  with pytest.raises(ValueError, match="^top_k"):
    SamplingParams(top_k=2**31).check()
  with pytest.raises(ValueError, match="^top_p"):
    SamplingParams(top_p=math.nan).check()


valid_params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 10_000),
    temperature=st.floats(0, 100, allow_nan=False, allow_infinity=False),
    top_k=st.integers(0, 2**31 - 1),
    top_p=st.floats(0, 1, exclude_min=True),
    seed=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
    stop_token_ids=st.one_of(st.none(), st.lists(st.integers(0, V - 1), max_size=5),
                             st.tuples(st.integers(0, V - 1))),
)


@settings(max_examples=200, deadline=None)
@given(valid_params)
def test_valid_params_round_trip(params):
  got = check_sampling(params, V)
  want = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids or ()))
  assert got == want
  assert check_sampling(got, V) == got  # normalising twice changes nothing


# -- engine config and servability -------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("page_size", 0, "page_size must be an int >= 1, got 0"),
    ("page_size", True, "page_size must be an int >= 1, got True"),
    ("max_seq_len", 64.0, "max_seq_len must be an int >= 1, got 64.0"),
    ("min_token_bucket", -1, "min_token_bucket must be an int >= 1, got -1"),
    ("max_queued", 0, "max_queued must be an int >= 1, got 0"),
    ("num_pages", 1, r"num_pages must be >= 2 \(page 0 is scratch\), got 1"),
    ("num_pages", 8.0, "num_pages must be >= 2"),
    ("max_seq_len", 60, "max_seq_len=60 must be a multiple of page_size=16"),
    ("ttft_slo", 0.0, "SLOs must be positive, got ttft_slo=0.0"),
    ("tpot_slo", math.nan, "SLOs must be positive, got .*tpot_slo=nan"),
])
def test_engine_config_check_names_the_field(field, value, match):
  EngineConfig().check()  # the defaults pass
  with pytest.raises(ValueError, match=match):
    EngineConfig(**{field: value}).check()


TINY = get_preset("tiny")  # 2 layers, 2 KV heads


@pytest.mark.parametrize("deployment, devices, match", [
    (Colocated(InstanceSpec(tp=3)), None,
     "tp=3 neither divides nor is a multiple of the model's 2 KV heads"),
    (Disaggregated(InstanceSpec(tp=1), InstanceSpec(tp=3)), None, "tp=3 neither divides"),
    (Colocated(InstanceSpec(pp=3)), None, "pp=3 does not divide the model's 2 layers"),
    (SemiPD(concurrent=True), None, "SM caps"),
    (PhaseOnly("decode"), None, "serves Colocated, Disaggregated or SemiPD deployments"),
    (Colocated(InstanceSpec(max_batch=0)), None, "max_batch"),
    (Disaggregated(InstanceSpec(tp=2), InstanceSpec(tp=2), num_prefill=2), 4,
     "needs 6 devices; 4 available"),
])
def test_check_servable_names_why_not(deployment, devices, match):
  with pytest.raises(ValueError, match=match):
    check_servable(deployment, TINY, devices)


@pytest.mark.parametrize("tp", [1, 2, 4])  # divides the 2 KV heads, or a multiple of them
def test_check_servable_takes_tp_that_fits_the_kv_heads(tp):
  check_servable(Colocated(InstanceSpec(tp=tp)), TINY, 8)
  check_servable(Disaggregated(InstanceSpec(tp=tp), InstanceSpec(tp=1)), TINY, 8)
