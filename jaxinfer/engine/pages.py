"""The host side of the paged KV cache: a page pool with reference counts, and a prefix cache
that lets sequences with a common prompt prefix share its pages by reference.

A page is shareable when it is a *full* page of a prompt: its content (the K/V of its tokens)
depends only on the tokens up to its end, so it is keyed by a hash chained over every page
before it (and over the `lookahead` tokens after it, when a draft layer's K/V in it depend on
those: EAGLE's pair at a position holds the next token). A prompt prefilled whole under a
dynamic sparsity pattern has pages that depend on all of it: keyed by all of it, its partial
last page too (which a sharer copies, since it writes its own tokens after the prompt's). A
page is registered when its owner is admitted and marked ready once the owner's prefill has
written it; a sequence that finds a page not yet ready waits for it instead of computing it
again. Pages nobody references but that hold a cached prefix stay in the pool, least recently
used first in line for reuse.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np


def page_keys(tokens: Sequence[int], page_size: int, num_pages: int,
              lookahead: int = 0, whole: bool = False) -> list[bytes]:
  """Chained keys of the first `num_pages` full pages of `tokens`, each over its tokens and the
  `lookahead` after it (there must be that many). whole: the pages of `tokens` computed at once
  (a dynamic sparsity pattern sees them all), keyed by all of them, the last page partial."""
  keys = []
  prev = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16,
                         person=b"whole").digest() if whole else b""
  for j in range(num_pages):
    chunk = np.asarray(tokens[j * page_size:(j + 1) * page_size + lookahead],
                       np.int64).tobytes()
    prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
    keys.append(prev)
  return keys


class PagePool:

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"PagePool: need at least one page of size >= 1, got {num_pages} x "
                       f"{page_size}")
    self.num_pages, self.page_size = num_pages, page_size
    self.refcount = np.zeros(num_pages, np.int32)
    self.ready = np.zeros(num_pages, bool)
    self._free = collections.deque(range(num_pages))
    self._cached: dict[bytes, int] = {}
    self._key_of: dict[int, bytes] = {}
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.peak_in_use = 0

  @property
  def in_use(self) -> int:
    return int((self.refcount > 0).sum())

  @property
  def available(self) -> int:
    return len(self._free) + len(self._evictable)

  def lookup(self, key: bytes) -> int | None:
    """A cached page for `key`, now referenced once more; None if not cached."""
    page = self._cached.get(key)
    if page is None:
      return None
    self._ref(page)
    return page

  def alloc(self, n: int) -> list[int] | None:
    """n fresh pages (referenced once), evicting unreferenced cached pages if needed; None,
    allocating nothing, if the pool cannot supply them."""
    if n > self.available:
      return None
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._evictable.popitem(last=False)
        del self._cached[self._key_of.pop(page)]
      self.ready[page] = False
      pages.append(page)
      self._ref(page)
    return pages

  def register(self, key: bytes, page: int) -> None:
    """Makes an owned page findable under `key` (it becomes usable once marked ready)."""
    if key not in self._cached:
      self._cached[key] = page
      self._key_of[page] = key

  def release(self, pages: Sequence[int]) -> None:
    for page in pages:
      self.refcount[page] -= 1
      if self.refcount[page] < 0:
        raise RuntimeError(f"PagePool: page {page} released more often than referenced")
      if self.refcount[page] == 0:
        if page in self._key_of and self.ready[page]:
          self._evictable[page] = None  # keep the prefix; reuse it last
        else:
          self._forget(page)
          self._free.append(page)

  def forget_prefixes(self) -> None:
    """No page is findable any more: pages in use stay their holders' (and are freed when
    released), cached unreferenced ones are free."""
    self._cached.clear()
    self._key_of.clear()
    self._free.extend(self._evictable)
    self._evictable.clear()

  def _ref(self, page: int) -> None:
    self.refcount[page] += 1
    self._evictable.pop(page, None)
    self.peak_in_use = max(self.peak_in_use, self.in_use)

  def _forget(self, page: int) -> None:
    key = self._key_of.pop(page, None)
    if key is not None and self._cached.get(key) == page:
      del self._cached[key]
