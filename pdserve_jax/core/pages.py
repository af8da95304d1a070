"""Host-side page allocator for one paged KV pool, with an optional prefix cache.

Single owner: the scheduler thread of one instance allocates and frees. Keeps a free
list and per-owner page lists. Knows nothing of device arrays, so the simulator
uses it too.

Prefix cache (`prefix_cache=True`; vLLM's automatic prefix caching is the model).
A full page whose KV is computed can be registered under its key (`core.prefix`:
the page's tokens and everything before them). Registered pages are
reference-counted: an owner admitted with keys maps the longest registered prefix
of them (`lookup`, `admit`) instead of computing it. A registered page nobody holds
stays resident in an LRU list and counts as free: it is evicted, oldest first, only
when a page is needed and the free list is empty. An owner's pages are freed tail
first, so a prefix loses its last pages before its first. Pages that are not
registered (partly filled ones, decode pages, a duplicate of a page registered
meanwhile) belong to one owner only, as without the cache. Keys an admitted owner
will compute are `pending` until it registers them, so a scheduler can let a
request that shares them wait one step instead of computing them twice.

`check()` verifies: free + evictable + held = capacity; an unregistered page has
exactly one owner; a registered page's count is the number of owners holding it
and it is evictable exactly when that is 0. `forget()` drops the cache when the
pool's KV is lost (a failed step that consumed it).
"""

from __future__ import annotations

import collections
from typing import Dict, Hashable, List, Optional, Sequence


class OutOfPages(RuntimeError):
  """Raised when an allocation asks for more pages than are free."""


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class PageAllocator:

  def __init__(self, num_pages: int, page_size: int, reserved: int = 0,
               prefix_cache: bool = False):
    """`reserved` pages at the front are never handed out (page 0 is the scratch page
    that padded slots write into)."""
    if num_pages <= reserved:
      raise ValueError(f"num_pages={num_pages} must exceed reserved={reserved}")
    if page_size <= 0:
      raise ValueError(f"page_size must be positive, got {page_size}")
    self.num_pages = num_pages
    self.page_size = page_size
    self.reserved = reserved
    self.capacity = num_pages - reserved  # pages that may be handed out
    self.prefix_cache = prefix_cache
    self._free: List[int] = list(range(num_pages - 1, reserved - 1, -1))
    self._owned: Dict[Hashable, List[int]] = {}
    # The cache: registered pages by key, and per page id its key (None: not
    # registered) and its holders (0 for a page that is not shared: free or owned by
    # one owner alone; a page registered and then forgotten keeps its count until
    # freed); the evictable ones (oldest first, with their keys); how many leading
    # pages of each owner are registered or matched; the keys owners will compute.
    self._page_of: Dict[Hashable, int] = {}
    self._key: List[Optional[Hashable]] = [None] * num_pages
    self._refs: List[int] = [0] * num_pages
    self._lru: collections.OrderedDict[int, Hashable] = collections.OrderedDict()  # -> key
    self._done: Dict[Hashable, int] = {}
    self._pending: Dict[Hashable, Hashable] = {}  # key -> owner computing it next
    self._pending_of: Dict[Hashable, Hashable] = {}  # owner -> that key
    # Counters (see `cache_stats`).
    self.lookups = self.hit_lookups = 0
    self.lookup_tokens = self.hit_tokens = 0
    self.evictions = 0

  @property
  def num_free(self) -> int:
    """Pages an allocation may take: free ones and evictable cached ones."""
    return len(self._free) + len(self._lru)

  @property
  def num_cached(self) -> int:
    """Registered pages, held or evictable."""
    return len(self._page_of)

  def pages(self, owner: Hashable) -> List[int]:
    return self._owned.get(owner, [])

  def owners(self):
    return list(self._owned)

  def can_fit(self, owner: Hashable, num_tokens: int) -> bool:
    """Whether `owner` can grow to hold `num_tokens` tokens."""
    need = pages_for(num_tokens, self.page_size) - len(self.pages(owner))
    return need <= self.num_free

  def ensure(self, owner: Hashable, num_tokens: int) -> List[int]:
    """Grows `owner`'s page list to hold `num_tokens` tokens; returns the list."""
    have = self._owned.setdefault(owner, [])
    need = pages_for(num_tokens, self.page_size) - len(have)
    if need > self.num_free:
      if not have:
        del self._owned[owner]
      raise OutOfPages(f"{owner!r} needs {need} more pages for {num_tokens} tokens; "
                       f"{self.num_free} of {self.capacity} free")
    if need > 0:
      self._take(have, need)
    return have

  def grow(self, owner: Hashable, num_tokens: int) -> bool:
    """`ensure` if enough pages are free (True), else nothing changes (False)."""
    have = self._owned.get(owner)
    need = -(-num_tokens // self.page_size) - (len(have) if have else 0)  # `pages_for`
    if need <= 0:
      return True
    free = self._free
    if need > len(free) + len(self._lru):
      return False
    if have is None:
      have = self._owned[owner] = []
    if need == 1 and free:  # a decode crossing a page boundary: the common case
      have.append(free.pop())
    else:
      self._take(have, need)
    return True

  def free(self, owner: Hashable) -> int:
    """Returns all of `owner`'s pages: registered ones lose a holder (and become
    evictable at none), the others go back to the free list. Returns how many."""
    pages = self._owned.pop(owner, [])
    done = self._done.pop(owner, 0)  # only these leading pages may be registered
    free = self._free
    if not done:
      free.extend(reversed(pages))
    else:
      free.extend(reversed(pages[done:]))
      refs, lru, key = self._refs, self._lru, self._key
      for i in range(done - 1, -1, -1):  # the tail first: evicted before the head
        p = pages[i]
        n = refs[p]
        if n == 0:  # owned by this owner alone
          free.append(p)
        elif n > 1:
          refs[p] = n - 1
        else:
          refs[p] = 0
          k = key[p]
          if k is None:  # registered, then forgotten while held
            free.append(p)
          else:
            lru[p] = k
    pending = self._pending_of.pop(owner, None)
    if pending is not None and self._pending.get(pending) is owner:
      del self._pending[pending]
    return len(pages)

  # -- the prefix cache -------------------------------------------------------------

  def key_of(self, page: int) -> Optional[Hashable]:
    """The key `page` is registered under, or None (owned by one owner alone)."""
    return self._key[page]

  def lookup(self, keys: Sequence[Hashable], limit: int) -> List[int]:
    """The registered pages of the longest prefix of `keys[:limit]`."""
    out = []
    if self.prefix_cache:
      page_of = self._page_of
      for i in range(min(limit, len(keys))):
        p = page_of.get(keys[i])
        if p is None:
          break
        out.append(p)
    return out

  def pending(self, keys: Sequence[Hashable], start: int, limit: int) -> bool:
    """Whether `keys[start]` (the first page the caller would compute) is the next
    page an admitted owner computes: waiting for it would turn the page into a hit.
    (Only each owner's next page is marked: a request that shares a prefix with an
    admitted one misses first where that one computes next.)"""
    return start < min(limit, len(keys)) and keys[start] in self._pending

  def cost(self, hits: Sequence[int], num_tokens: int) -> int:
    """Free pages an owner holding nothing takes to hold `num_tokens` tokens when it
    maps `hits` (from `lookup`): its new pages, plus hits that were evictable."""
    refs = self._refs
    revived = sum(1 for p in hits if refs[p] == 0)
    return pages_for(num_tokens, self.page_size) - len(hits) + revived

  def admit(self, owner: Hashable, hits: Sequence[int], num_tokens: int,
            keys: Sequence[Hashable] = (), lookup_tokens: int = 0) -> List[int]:
    """Maps `hits` (from `lookup`, this step) for `owner`, which holds nothing, and
    grows it to `num_tokens` tokens; the first of its other full pages (up to
    `len(keys)`) is marked pending until `commit`. Counts a lookup of
    `lookup_tokens` tokens (0: none). Raises OutOfPages, changing nothing, when the
    pages are not free."""
    if owner in self._owned:
      raise ValueError(f"{owner!r} already holds pages")
    if self.cost(hits, num_tokens) > self.num_free:
      raise OutOfPages(f"{owner!r} needs {self.cost(hits, num_tokens)} pages for "
                       f"{num_tokens} tokens ({len(hits)} cached); {self.num_free} of "
                       f"{self.capacity} free")
    refs, lru = self._refs, self._lru
    for p in hits:
      n = refs[p]
      if n == 0:
        del lru[p]
      refs[p] = n + 1
    have = self._owned[owner] = list(hits)
    need = pages_for(num_tokens, self.page_size) - len(have)
    if need > 0:
      self._take(have, need)
    if self.prefix_cache:
      self._done[owner] = len(hits)
      if len(keys) > len(hits):
        self._mark(owner, keys[len(hits)])
    if lookup_tokens:
      self.lookups += 1
      self.lookup_tokens += lookup_tokens
      if hits:
        self.hit_lookups += 1
        self.hit_tokens += len(hits) * self.page_size
    return have

  def commit(self, owner: Hashable, keys: Sequence[Hashable], num_tokens: int) -> None:
    """`owner`'s first `num_tokens` tokens hold computed KV: registers its full pages
    among them under `keys` (one per page). A key registered meanwhile by another
    page leaves this page unregistered, owned by `owner` alone."""
    if not self.prefix_cache:
      return
    start = self._done.get(owner, 0)
    end = min(len(keys), num_tokens // self.page_size)
    if end <= start:
      return
    pages = self._owned[owner]
    page_of, key, refs = self._page_of, self._key, self._refs
    for j in range(start, end):
      k = keys[j]
      if k not in page_of:
        p = pages[j]
        page_of[k] = p
        key[p] = k
        refs[p] = 1
    self._done[owner] = end
    if owner in self._pending_of:
      self._mark(owner, keys[end] if end < len(keys) else None)

  def _mark(self, owner: Hashable, key: Optional[Hashable]) -> None:
    """`key` is the next page `owner` computes (None: no more)."""
    pending = self._pending
    old = self._pending_of.pop(owner, None)
    if old is not None and pending.get(old) is owner:
      del pending[old]
    if key is not None:
      self._pending_of[owner] = key
      pending.setdefault(key, owner)

  def forget(self) -> None:
    """The pool's KV is lost: nothing registered may be matched again. Evictable pages
    become free; held ones keep their holder counts until they are freed."""
    self._free.extend(self._lru)
    self._lru.clear()
    for p in self._page_of.values():
      self._key[p] = None  # held ones keep their counts until freed
    self._page_of.clear()
    self._pending.clear()
    self._pending_of.clear()
    # `_done` stays: `free` walks those pages to release the ones still counted.

  def cache_stats(self) -> dict:
    """Counters since this pool was made: admissions that looked the cache up and
    their prefill tokens, those that hit and the tokens they found, pages evicted,
    and pages registered now."""
    return {"lookups": self.lookups, "hit_lookups": self.hit_lookups,
            "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens,
            "evictions": self.evictions, "cached_pages": len(self._page_of)}

  def _take(self, into: List[int], n: int) -> None:
    """Moves `n` pages to `into`: free ones first (last first, as n pops would), then
    evictable cached ones, least recently freed first."""
    free = self._free
    k = min(n, len(free))
    if k:
      into.extend(free[:-k - 1:-1])
      del free[-k:]
    if n > k:
      lru, page_of, key = self._lru, self._page_of, self._key
      for _ in range(n - k):
        p, old = lru.popitem(last=False)
        del page_of[old]
        key[p] = None
        into.append(p)
      self.evictions += n - k

  def check(self) -> None:
    owned = [p for ps in self._owned.values() for p in ps]
    held = set(owned)
    every = list(held) + self._free + list(self._lru)
    if len(every) != self.capacity:
      raise AssertionError(f"free {len(self._free)} + evictable {len(self._lru)} + held "
                           f"{len(held)} != {self.capacity}")
    if len(set(every)) != len(every):
      raise AssertionError("a page is both free (or evictable) and held, or free twice")
    if any(p < self.reserved or p >= self.num_pages for p in every):
      raise AssertionError("a page id is out of range")
    holders = collections.Counter(owned)
    for p in range(self.reserved, self.num_pages):
      n, k, held_by = self._refs[p], self._key[p], holders.get(p, 0)
      if k is not None and self._page_of.get(k) != p:
        raise AssertionError(f"registered page {p} and its key disagree")
      if n < 0 or (n or k is not None) and n != held_by:
        raise AssertionError(f"page {p} counts {n} holders, has {held_by}")
      if not n and k is None and held_by > 1:
        raise AssertionError(f"unregistered page {p} is held by {held_by} owners")
      if (p in self._lru) != (k is not None and n == 0):
        raise AssertionError(f"page {p} ({'registered' if k is not None else 'unregistered'},"
                             f" {n} holders) is {'' if p in self._lru else 'not '}evictable")
    if len(self._page_of) != sum(k is not None for k in self._key):
      raise AssertionError("the keys by page and the pages by key disagree")
    for owner, n in self._done.items():
      ps = self._owned.get(owner, [])
      if n > len(ps):
        raise AssertionError(f"{owner!r}: {n} pages marked computed, holds {len(ps)}")
