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
  """Sizes that fix an instance's buckets."""
  page_size: int = 16
  num_pages: int = 256
  max_decode_batch: int = 32
  max_prefill_batch: int = 8
  max_prefill_len: int = 256  # longest chunk one prefill row carries
  max_seq_len: int = 512  # prompt + output, bounds the page-table width
  min_prefill_len: int = 16  # smallest chunk bucket
  min_table_width: int = 1  # smallest page-table bucket (pages); raise it for fewer shapes

  def __post_init__(self):
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len={self.max_seq_len} must be a multiple of "
                       f"page_size={self.page_size}")

  @property
  def decode_batches(self):
    return powers_of_two(1, self.max_decode_batch)

  @property
  def prefill_batches(self):
    return powers_of_two(1, self.max_prefill_batch)

  @property
  def prefill_lens(self):
    return powers_of_two(min(self.min_prefill_len, self.max_prefill_len), self.max_prefill_len)

  @property
  def table_widths(self):
    widest = self.max_seq_len // self.page_size
    return powers_of_two(min(self.min_table_width, widest), widest)

  def table_width(self, page_counts: Sequence[int]) -> int:
    """Page-table columns of a call whose rows hold these many pages."""
    return bucket(max(max(page_counts, default=1), 1), self.table_widths, "page-table width")

  def prefill_shape(self, chunk_lens: Sequence[int], page_counts: Sequence[int]):
    """(batch, chunk length, table width) of one prefill call."""
    return (bucket(len(chunk_lens), self.prefill_batches, "prefill batch"),
            bucket(max(chunk_lens), self.prefill_lens, "prefill chunk length"),
            self.table_width(page_counts))

  def decode_shape(self, page_counts: Sequence[int]):
    """(batch, table width) of one decode call."""
    return (bucket(len(page_counts), self.decode_batches, "decode batch"),
            self.table_width(page_counts))

  def compiled_prefill_shapes(self):
    """Every (batch, chunk length, table width) a prefill call can land in."""
    lens, out = self.prefill_lens, []
    for B in self.prefill_batches:
      for j, T in enumerate(lens):
        shortest = lens[j - 1] + 1 if j else 1  # the shortest chunk padded to T
        out += [(B, T, W) for W in self.table_widths if shortest <= W * self.page_size]
    return out

  def compiled_decode_shapes(self):
    return [(B, W) for B in self.decode_batches for W in self.table_widths]
