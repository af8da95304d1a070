"""Shape buckets: every dynamic size is rounded up to one of a few values so the
programs compile a bounded set of shapes, all of them during warm-up."""

from __future__ import annotations

import bisect
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
