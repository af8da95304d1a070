"""Prompt log-probabilities: each prompt token's log-probability given the tokens
before it, with the top alternatives, from one cache-less forward pass on a runner's
mesh and weights.

This is what `echo` with `logprobs` on `/v1/completions` returns and what lm-eval's
loglikelihood tasks read. The serving programs cannot give it: the packed program
samples only at each row's end. This program is `pdj.forward` (the same
`llama.forward_logits`) on the instance's own sharded weights: it writes no KV and
reads no pool, so it runs beside the serving steps without touching their state.

Prompts are padded to a power-of-two length (attention is causal: tokens after a
position change nothing at it), so few lengths compile; each compiles on first use,
not at warm-up. Limits: single-stage runners (pp = 1); at most `MAX_TOP`
alternatives per token (OpenAI's limit for completions is 5, vLLM's 20).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdserve_jax.model import llama, sharding
from pdserve_jax.runtime.rows import PromptLogprobs

MAX_TOP = 20


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "k"))
def _score(params, tokens, cfg, attn_impl, k):
  logits = llama.forward_logits(cfg, params, tokens, attn_impl)[0]  # [T, V]
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:-1]
  chosen = jnp.take_along_axis(lp, tokens[0, 1:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(lp, k)
  return chosen, top_ids, top_lp


def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def prompt_logprobs(runner, tokens: Sequence[int]) -> PromptLogprobs:
  """`tokens`' log-probabilities on `runner` (an `InstanceRunner`): see
  `rows.PromptLogprobs`.
  Blocks until they are on the host."""
  if len(runner.stages) != 1:
    raise ValueError("prompt logprobs need a single-stage instance (pp = 1)")
  n = len(tokens)
  if n < 1:
    raise ValueError("prompt logprobs need at least one token")
  cfg = runner.cfg
  padded = np.zeros((1, _bucket(n)), np.int32)
  padded[0, :n] = tokens
  # Replicated over the mesh: every process of a multi-process mesh passes its copy.
  x = jax.device_put(padded, sharding.replicated(runner.mesh))
  out = _score(runner.params, x, cfg, runner.attn_impl, min(MAX_TOP, cfg.vocab_size))
  chosen, top_ids, top_lp = (np.asarray(a.addressable_data(0))[:n - 1] for a in out)
  return PromptLogprobs(chosen, top_ids, top_lp)
