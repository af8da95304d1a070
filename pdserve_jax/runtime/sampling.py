"""Token sampling inside the jitted programs.

Per row: temperature (0 = greedy), top-k (0 = off), top-p (1 = off) and a seed. The
random key of a row depends only on its seed and the index of the token being
sampled, so a request draws the same tokens whatever batch it lands in.

A row whose logits hold a NaN or an infinity gets token -1 instead of a token id:
argmax over NaN would quietly pick one, and the caller should fail that request.

Every call also returns the log-probability of each sampled token and the
`MAX_LOGPROBS` most likely tokens with theirs, under the model's own distribution
(softmax of the raw logits, before temperature, top-k and top-p: what OpenAI's and
vLLM's `logprobs` report). Their cost is one top-k over the vocabulary per row, small
beside the LM head, so they are always computed and the compiled programs do not
depend on whether a request asked for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Top tokens every call returns with their log-probabilities: OpenAI's completions API
# allows at most 5, and `core.sampling.MAX_LOGPROBS` (what requests may ask) equals it.
MAX_LOGPROBS = 5


def sample(logits, temperature, top_k, top_p, seeds, token_index):
  """logits f32 [B, V]; temperature, top_p f32 [B]; top_k, seeds, token_index int32 [B].

  Returns (tokens int32 [B], logprob f32 [B], top_ids int32 [B, K], top_logprobs f32
  [B, K]) with K = min(MAX_LOGPROBS, V): each row's token, or -1 where that row's logits
  are not finite, its log-probability, and the K most likely tokens.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Sorting the vocabulary costs more than the argmax; all-greedy batches skip it.
  tokens = jax.lax.cond(jnp.any(temperature > 0),
                        lambda: _sample(logits, temperature, top_k, top_p, seeds, token_index,
                                        greedy),
                        lambda: greedy)
  # Every step of _sample is per row, so a bad row cannot change the others' tokens.
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  tokens = jnp.where(finite, tokens, jnp.int32(-1))
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logprobs, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
  return tokens, picked, top_ids.astype(jnp.int32), top_logprobs


def _sample(logits, temperature, top_k, top_p, seeds, token_index, greedy):
  V = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  order = jnp.argsort(-scaled, axis=-1)  # descending
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(V)[None, :]
  k = jnp.where(top_k > 0, top_k, V)[:, None]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (rank < k) & ((mass_before < top_p[:, None]) | (rank == 0))
  masked = jnp.where(keep, sorted_logits, -jnp.inf)

  def draw(seed, index, row):
    key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), index)
    return jax.random.categorical(key, row)

  picked = jax.vmap(draw)(seeds, token_index, masked)
  sampled = jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)
