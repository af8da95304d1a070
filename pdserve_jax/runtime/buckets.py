"""Shape buckets: every dynamic size is rounded up to one of a few values so the
programs compile a bounded set of shapes, all of them during warm-up.

`RunnerShape` holds an instance's bucket lists and says which compiled shape a
program call lands in. The runner pads to it, and the simulator's measured-shape
latency model (`sim.latency.ShapeTableLatencyModel`) looks it up, so both round
the same way. No JAX here: the simulator imports it.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence


def powers_of_two(lo: int, hi: int) -> tuple:
  """lo, 2lo, 4lo, ... up to and including hi (hi itself always present)."""
  out, n = [], lo
  while n < hi:
    out.append(n)
    n *= 2
  out.append(hi)
  return tuple(out)


def bucket(n: int, buckets: Sequence[int], what: str = "size") -> int:
  """Smallest bucket >= n."""
  i = bisect.bisect_left(buckets, n)
  if i == len(buckets):
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")
  return buckets[i]


def groups(items: Sequence, size: int) -> list:
  """`items` in consecutive groups of at most `size`: one program call each."""
  return [items[i:i + size] for i in range(0, len(items), size)]


@dataclasses.dataclass(frozen=True)
class RunnerShape:
  """Sizes that fix an instance's buckets.

  Two programs, each bucketed on one axis: a packed call carries any mix of prompt
  chunks and decode rows on one token axis, bucketed by its total tokens (its rows
  axis is min(tokens, max_rows): every row holds a token); a decode call carries
  one token per row, bucketed by rows. Page tables have one width, `max_seq_len /
  page_size`, so with the defaults an instance compiles a dozen or so programs."""
  page_size: int = 16
  num_pages: int = 256
  max_rows: int = 32  # requests in one call (decode batch; rows of a packed call)
  max_step_tokens: int = 512  # largest packed call
  max_seq_len: int = 512  # prompt + output, fixes the page-table width
  min_step_tokens: int = 16  # smallest packed bucket
  # A call runs the layers as this many programs in a row (1: one per pipeline
  # stage), so each group's KV can leave as soon as it is written.
  layer_groups: int = 1

  def __post_init__(self):
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len={self.max_seq_len} must be a multiple of "
                       f"page_size={self.page_size}")

  @property
  def decode_batches(self):
    return powers_of_two(1, self.max_rows)

  @property
  def token_buckets(self):
    return powers_of_two(min(self.min_step_tokens, self.max_step_tokens), self.max_step_tokens)

  @property
  def table_width(self) -> int:
    return self.max_seq_len // self.page_size

  def packed_rows(self, tokens_bucket: int) -> int:
    """Rows of a packed call of this token bucket."""
    return min(tokens_bucket, self.max_rows)

  def packed_shape(self, num_tokens: int) -> tuple:
    return (bucket(num_tokens, self.token_buckets, "tokens in a packed call"),)

  def decode_shape(self, batch: int) -> tuple:
    return (bucket(batch, self.decode_batches, "decode batch"),)

  def packed_groups(self, row_tokens: Sequence[int]) -> list:
    """Consecutive rows [lo, hi) of each packed call: as many rows as fit
    `max_rows` and `max_step_tokens`."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(row_tokens):
      if n > self.max_step_tokens:
        raise ValueError(f"a row of {n} tokens exceeds the largest packed call "
                         f"({self.max_step_tokens} tokens)")
      if i > lo and (total + n > self.max_step_tokens or i - lo == self.max_rows):
        out.append((lo, i))
        lo, total = i, 0
      total += n
    if lo < len(row_tokens):
      out.append((lo, len(row_tokens)))
    return out

  def step_calls(self, chunk_lens: Sequence[int], num_decodes: int) -> tuple:
    """(packed call shapes, decode call shapes) of a step: with prompt chunks, every
    row (a decode is a one-token row) goes into packed calls; without, the decodes
    go into decode calls."""
    if not chunk_lens:
      return (), tuple(self.decode_shape(len(g)) for g in groups(range(num_decodes),
                                                                self.max_rows))
    rows = list(chunk_lens) + [1] * num_decodes
    return tuple(self.packed_shape(sum(rows[lo:hi]))
                 for lo, hi in self.packed_groups(rows)), ()

  def compiled_packed_shapes(self):
    return [(t,) for t in self.token_buckets]

  def compiled_decode_shapes(self):
    return [(b,) for b in self.decode_batches]
