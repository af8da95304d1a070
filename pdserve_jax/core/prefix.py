"""Page keys: what names a full page of a prompt in a prefix cache.

A page's key names the page's tokens together with every token before it, so two
requests share a page only when their prompts agree up to the page's end. Two
sources feed the one API (`Request.prefix_keys`, one key per full prompt page):

  `token_keys`  real token ids (the engine): a chained hash, each page's key the
                BLAKE2b digest of its parent's key and its token ids (vLLM's
                automatic prefix caching names blocks this way). A 128-bit digest
                makes a false match (which would serve wrong KV) practically
                impossible, unlike Python's 64-bit `hash`.
  `block_keys`  block hashes (Mooncake's traces: one id per 512-token prompt block,
                equal ids meaning equal blocks with equal prefixes; the ids are
                already chained). A page ending `k` tokens into block `b` is named
                (id of b, k): the block's id names everything before the block,
                and k how far into it the page reaches. Any page size works.

Only full pages get keys: a partly filled page is never shared. No JAX here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Hashable, Sequence

import numpy as np

MOONCAKE_BLOCK = 512  # tokens per hash id in Mooncake's traces (FAST'25 release)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """A prompt's prefix structure as block ids: block i covers tokens
  [i * size, (i + 1) * size) (the last may be partial), and equal ids mean equal
  tokens with equal prefixes."""
  ids: tuple
  size: int = MOONCAKE_BLOCK

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"block size must be >= 1, got {self.size}")


def token_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
  """One chained key per full page of `tokens`."""
  arr = np.asarray(tokens, dtype=np.int64)
  keys, parent = [], b""
  for end in range(page_size, len(arr) + 1, page_size):
    parent = hashlib.blake2b(parent + arr[end - page_size:end].tobytes(),
                             digest_size=16).digest()
    keys.append(parent)
  return keys


def block_keys(blocks: Blocks, prompt_len: int, page_size: int) -> list[Hashable]:
  """One key per full page of a `prompt_len`-token prompt described by `blocks`."""
  size, ids = blocks.size, blocks.ids
  if len(ids) * size < prompt_len:
    raise ValueError(f"{len(ids)} blocks of {size} tokens do not cover a prompt of "
                     f"{prompt_len} tokens")
  if page_size == size:
    return list(ids[:prompt_len // size])
  keys: list[Hashable] = []
  for end in range(page_size, prompt_len + 1, page_size):
    b = (end - 1) // size
    keys.append((ids[b], end - b * size))
  return keys


def reuse_bound(blocks: Sequence[Blocks], prompt_lens: Sequence[int]) -> float:
  """The share of these prompts' tokens (in order) lying in blocks an earlier prompt
  had: what an infinite cache of whole blocks could reuse (Mooncake's "repeated
  blocks", weighted by tokens; a partial last block counts its tokens)."""
  seen, hit, total = set(), 0, 0
  for b, p in zip(blocks, prompt_lens):
    for i, block in enumerate(b.ids):
      tokens = min(b.size, int(p) - i * b.size)
      total += tokens
      if block in seen:
        hit += tokens
      seen.add(block)
  return hit / total if total else 0.0


def block_tokens(blocks: Blocks, prompt_len: int, vocab_size: int, seed: int = 0) -> list[int]:
  """Token ids for a prompt described by `blocks`, the same for the same block ids
  (each id's tokens drawn from a generator seeded by (seed, id)), so prompts made
  from shared blocks share real prefixes. The last block is cut to the prompt."""
  out = []
  for i in range((prompt_len + blocks.size - 1) // blocks.size):
    rng = np.random.default_rng([seed, int(blocks.ids[i])])
    out.extend(rng.integers(0, vocab_size, blocks.size).tolist())
  return out[:prompt_len]
