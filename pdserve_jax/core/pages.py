"""Host-side page allocator for one paged KV pool.

Single owner: the scheduler thread of one instance allocates and frees. Keeps a free
list and per-request page lists; `check()` verifies free + owned = total and that no
page is owned twice. Knows nothing of device arrays, so the simulator uses it too.
"""

from __future__ import annotations

from typing import Dict, Hashable, List


class OutOfPages(RuntimeError):
  """Raised when an allocation asks for more pages than are free."""


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class PageAllocator:

  def __init__(self, num_pages: int, page_size: int, reserved: int = 0):
    """`reserved` pages at the front are never handed out (page 0 is the scratch page
    that padded slots write into)."""
    if num_pages <= reserved:
      raise ValueError(f"num_pages={num_pages} must exceed reserved={reserved}")
    if page_size <= 0:
      raise ValueError(f"page_size must be positive, got {page_size}")
    self.num_pages = num_pages
    self.page_size = page_size
    self.reserved = reserved
    self._free: List[int] = list(range(num_pages - 1, reserved - 1, -1))
    self._owned: Dict[Hashable, List[int]] = {}

  @property
  def capacity(self) -> int:
    return self.num_pages - self.reserved

  @property
  def num_free(self) -> int:
    return len(self._free)

  def pages(self, owner: Hashable) -> List[int]:
    return self._owned.get(owner, [])

  def owners(self):
    return list(self._owned)

  def can_fit(self, owner: Hashable, num_tokens: int) -> bool:
    """Whether `owner` can grow to hold `num_tokens` tokens."""
    need = pages_for(num_tokens, self.page_size) - len(self.pages(owner))
    return need <= len(self._free)

  def ensure(self, owner: Hashable, num_tokens: int) -> List[int]:
    """Grows `owner`'s page list to hold `num_tokens` tokens; returns the list."""
    have = self._owned.setdefault(owner, [])
    need = pages_for(num_tokens, self.page_size) - len(have)
    if need > len(self._free):
      if not have:
        del self._owned[owner]
      raise OutOfPages(f"{owner!r} needs {need} more pages for {num_tokens} tokens; "
                       f"{len(self._free)} of {self.capacity} free")
    if need > 0:
      _take(self._free, have, need)
    return have

  def grow(self, owner: Hashable, num_tokens: int) -> bool:
    """`ensure` if enough pages are free (True), else nothing changes (False)."""
    have = self._owned.get(owner)
    need = pages_for(num_tokens, self.page_size) - (len(have) if have else 0)
    if need > len(self._free):
      return False
    if need > 0:
      if have is None:
        have = self._owned[owner] = []
      _take(self._free, have, need)
    return True

  def free(self, owner: Hashable) -> int:
    """Returns all of `owner`'s pages to the free list; returns how many."""
    pages = self._owned.pop(owner, [])
    self._free.extend(reversed(pages))
    return len(pages)

  def check(self) -> None:
    owned = [p for ps in self._owned.values() for p in ps]
    every = owned + self._free
    if len(every) != self.capacity:
      raise AssertionError(f"free {len(self._free)} + owned {len(owned)} != {self.capacity}")
    if len(set(every)) != len(every):
      raise AssertionError("a page is owned twice or both owned and free")
    if any(p < self.reserved or p >= self.num_pages for p in every):
      raise AssertionError("a page id is out of range")


def _take(free: List[int], into: List[int], n: int) -> None:
  """Moves the last `n` pages of `free` to `into`, as n pops would (last first)."""
  into.extend(free[:-n - 1:-1])
  del free[-n:]
