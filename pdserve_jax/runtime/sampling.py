"""Token sampling inside the jitted programs.

Per row: temperature (0 = greedy), top-k (0 = off), top-p (1 = off) and a seed. The
random key of a row depends only on its seed and the index of the token being
sampled, so a request draws the same tokens whatever batch it lands in.

A row whose logits hold a NaN or an infinity gets token -1 instead of a token id:
argmax over NaN would quietly pick one, and the caller should fail that request.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, temperature, top_k, top_p, seeds, token_index):
  """logits f32 [B, V]; temperature, top_p f32 [B]; top_k, seeds, token_index int32 [B].

  Returns int32 [B]: the token of each row, or -1 where that row's logits are not finite.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Sorting the vocabulary costs more than the argmax; all-greedy batches skip it.
  tokens = jax.lax.cond(jnp.any(temperature > 0),
                        lambda: _sample(logits, temperature, top_k, top_p, seeds, token_index,
                                        greedy),
                        lambda: greedy)
  # Every step of _sample is per row, so a bad row cannot change the others' tokens.
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  return jnp.where(finite, tokens, jnp.int32(-1))


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
