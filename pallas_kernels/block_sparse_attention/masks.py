"""Host-side attention masks and their compilation to per-block metadata.

A mask is a (q_len, kv_len) boolean pattern, defined by a vectorised predicate over query and
key indices, and composable with `&` and `|`. `mask_info(mask, block_q, block_kv)` compiles it
once, on the host, into what the kernel walks:

  kv_indices  (1, Hm, nq, max_nnz) int32  the non-empty kv blocks of each q block, in order; the
                                          tail repeats the last valid index (no new fetch)
  num_kv      (1, Hm, nq)          int32  how many of them there are
  partial     (1, Hm, nq, max_nnz) int32  -1 for a full block (no mask work), else an index into
  blocks      (P, bq, bkv)         bool   the distinct partial blocks
  and the same walk transposed (q blocks of each kv block) for the dK/dV pass.

Hm is 1 when every head shares the mask, else the number of heads (`MultiHead`). Classification
is analytic for the structured masks (causal, local, sinks, chunked, full), so building metadata
for 32k x 32k costs O(blocks), not O(q_len x kv_len); only blocks the analysis leaves ambiguous
are evaluated elementwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


class Mask:
  shape: tuple[int, int]

  def predicate(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Broadcasting q, k index arrays -> bool."""
    raise NotImplementedError

  def classify(self, bq: int, bk: int) -> np.ndarray:
    """(nq, nk) int8 of EMPTY / PARTIAL / FULL. Default: exact, from the dense mask."""
    nq, nk = _num_blocks(self.shape, bq, bk)
    dense = self.dense()
    pad = ((0, nq * bq - self.shape[0]), (0, nk * bk - self.shape[1]))
    inside = np.pad(np.ones(self.shape, bool), pad).reshape(nq, bq, nk, bk)
    values = np.pad(dense, pad).reshape(nq, bq, nk, bk)
    any_ = values.any(axis=(1, 3))
    all_ = (values | ~inside).all(axis=(1, 3))  # over the part of the block inside the mask
    return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)

  def dense(self) -> np.ndarray:
    q, k = np.arange(self.shape[0])[:, None], np.arange(self.shape[1])[None, :]
    return np.broadcast_to(self.predicate(q, k), self.shape)

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, other)


def _num_blocks(shape, bq, bk):
  return (-(-shape[0] // bq), -(-shape[1] // bk))


def _block_ranges(shape, bq, bk):
  """First and last (inclusive, clipped) q / k index of every block: (nq,1) and (1,nk) arrays."""
  nq, nk = _num_blocks(shape, bq, bk)
  q0 = np.arange(nq)[:, None] * bq
  k0 = np.arange(nk)[None, :] * bk
  return q0, np.minimum(q0 + bq, shape[0]) - 1, k0, np.minimum(k0 + bk, shape[1]) - 1


def _classify_dense(mask: Mask, bq: int, bk: int, which: np.ndarray) -> np.ndarray:
  """Exact classes for the blocks selected by `which` (others EMPTY), elementwise."""
  nq, nk = which.shape
  out = np.zeros((nq, nk), np.int8)
  for i, j in zip(*np.nonzero(which)):  # over the part of the block inside the mask
    q = np.arange(i * bq, min((i + 1) * bq, mask.shape[0]))[:, None]
    k = np.arange(j * bk, min((j + 1) * bk, mask.shape[1]))[None, :]
    block = mask.predicate(q, k)
    out[i, j] = FULL if block.all() else PARTIAL if block.any() else EMPTY
  return out


def _block_values(mask: Mask, bq: int, bk: int, i: int, j: int) -> np.ndarray:
  """The mask's values in block (i, j), padded with False past the mask's edge to (bq, bk)."""
  q = i * bq + np.arange(bq)[:, None]
  k = j * bk + np.arange(bk)[None, :]
  inside = (q < mask.shape[0]) & (k < mask.shape[1])
  return np.broadcast_to(mask.predicate(q, k), (bq, bk)) & inside


def _from_interval_bounds(lo_ok_all, lo_ok_any, hi_ok_all, hi_ok_any):
  """Classes for masks of the form lo(q) <= k <= hi(q) from corner tests."""
  any_ = lo_ok_any & hi_ok_any
  all_ = lo_ok_all & hi_ok_all
  return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  shape: tuple[int, int]

  def predicate(self, q, k):
    return np.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), bool)

  def classify(self, bq, bk):
    return np.full(_num_blocks(self.shape, bq, bk), FULL, np.int8)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """k <= q + offset; offset defaults to kv_len - q_len (the last query sees every key)."""

  shape: tuple[int, int]
  offset: int | None = None

  @property
  def _offset(self) -> int:
    return self.shape[1] - self.shape[0] if self.offset is None else self.offset

  def predicate(self, q, k):
    return k <= q + self._offset

  def classify(self, bq, bk):
    q0, q1, k0, k1 = _block_ranges(self.shape, bq, bk)
    o = self._offset
    return _from_interval_bounds(True, True, k1 <= q0 + o, k0 <= q1 + o)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """q + offset - window < k <= q + offset: each query sees itself and window - 1 earlier keys."""

  shape: tuple[int, int]
  window: int
  offset: int | None = None

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"SlidingWindow: window must be >= 1, got {self.window}")

  @property
  def _offset(self) -> int:
    return self.shape[1] - self.shape[0] if self.offset is None else self.offset

  def predicate(self, q, k):
    c = q + self._offset
    return (k <= c) & (k > c - self.window)

  def classify(self, bq, bk):
    q0, q1, k0, k1 = _block_ranges(self.shape, bq, bk)
    o, w = self._offset, self.window
    return _from_interval_bounds(k0 > q1 + o - w, k1 > q0 + o - w, k1 <= q0 + o, k0 <= q1 + o)


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
  """k < num_sinks: the first keys, visible to every query (combine with Causal)."""

  shape: tuple[int, int]
  num_sinks: int

  def predicate(self, q, k):
    return np.broadcast_to(k < self.num_sinks, np.broadcast_shapes(np.shape(q), np.shape(k)))

  def classify(self, bq, bk):
    q0, q1, k0, k1 = _block_ranges(self.shape, bq, bk)
    cls = np.where(k1 < self.num_sinks, FULL, np.where(k0 < self.num_sinks, PARTIAL, EMPTY))
    return np.broadcast_to(cls, _num_blocks(self.shape, bq, bk)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """(q + offset) // chunk == k // chunk: attention within fixed chunks (combine with Causal)."""

  shape: tuple[int, int]
  chunk: int
  offset: int | None = None

  @property
  def _offset(self) -> int:
    return self.shape[1] - self.shape[0] if self.offset is None else self.offset

  def predicate(self, q, k):
    return (q + self._offset) // self.chunk == k // self.chunk

  def classify(self, bq, bk):
    q0, q1, k0, k1 = _block_ranges(self.shape, bq, bk)
    o, c = self._offset, self.chunk
    qa, qb, ka, kb = (q0 + o) // c, (q1 + o) // c, k0 // c, k1 // c
    full = (qa == qb) & (ka == kb) & (qa == ka)
    overlap = (qa <= kb) & (ka <= qb)
    return np.where(full, FULL, np.where(overlap, PARTIAL, EMPTY)).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class Document(Mask):
  """Packed sequences: a query sees keys of its own document (segment id)."""

  q_segments: np.ndarray
  kv_segments: np.ndarray | None = None

  @property
  def shape(self):
    kv = self.q_segments if self.kv_segments is None else self.kv_segments
    return (len(self.q_segments), len(kv))

  def predicate(self, q, k):
    kv = self.q_segments if self.kv_segments is None else self.kv_segments
    return np.asarray(self.q_segments)[np.minimum(q, self.shape[0] - 1)] == \
        np.asarray(kv)[np.minimum(k, self.shape[1] - 1)]


@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Mask):
  """An explicit boolean array."""

  array: np.ndarray

  @property
  def shape(self):
    return tuple(self.array.shape)

  def predicate(self, q, k):
    a = np.asarray(self.array, bool)
    return a[np.minimum(q, a.shape[0] - 1), np.minimum(k, a.shape[1] - 1)]


@dataclasses.dataclass(frozen=True)
class And(Mask):
  a: Mask
  b: Mask

  def __post_init__(self):
    if tuple(self.a.shape) != tuple(self.b.shape):
      raise ValueError(f"mask &: shapes differ, {self.a.shape} vs {self.b.shape}")

  @property
  def shape(self):
    return tuple(self.a.shape)

  def predicate(self, q, k):
    return self.a.predicate(q, k) & self.b.predicate(q, k)

  def classify(self, bq, bk):
    ca, cb = self.a.classify(bq, bk), self.b.classify(bq, bk)
    out = np.minimum(ca, cb)
    ambiguous = (ca == PARTIAL) & (cb == PARTIAL)  # their overlap may be empty, full or neither
    out[ambiguous] = _classify_dense(self, bq, bk, ambiguous)[ambiguous]
    return out


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  a: Mask
  b: Mask

  def __post_init__(self):
    if tuple(self.a.shape) != tuple(self.b.shape):
      raise ValueError(f"mask |: shapes differ, {self.a.shape} vs {self.b.shape}")

  @property
  def shape(self):
    return tuple(self.a.shape)

  def predicate(self, q, k):
    return self.a.predicate(q, k) | self.b.predicate(q, k)

  def classify(self, bq, bk):
    ca, cb = self.a.classify(bq, bk), self.b.classify(bq, bk)
    out = np.maximum(ca, cb)
    ambiguous = (ca == PARTIAL) & (cb == PARTIAL)  # together they may cover the block
    out[ambiguous] = _classify_dense(self, bq, bk, ambiguous)[ambiguous]
    return out


@dataclasses.dataclass(frozen=True)
class MultiHead:
  """One mask per query head (e.g. DuoAttention's retrieval vs streaming heads)."""

  masks: tuple[Mask, ...]

  def __post_init__(self):
    shapes = {tuple(m.shape) for m in self.masks}
    if len(shapes) != 1:
      raise ValueError(f"MultiHead: every head's mask must have one shape, got {sorted(shapes)}")

  @property
  def shape(self):
    return tuple(self.masks[0].shape)


def causal_window(shape, window: int | None) -> Mask:
  """Causal attention, limited to a sliding window when `window` is given."""
  return Causal(shape) if window is None else SlidingWindow(shape, window)


def sinks_and_window(shape, num_sinks: int, window: int) -> Mask:
  """The A-shape / Λ-shape (StreamingLLM, LM-Infinite, MInference's A-shape): causal attention to
  the first `num_sinks` keys and to a sliding window."""
  return Causal(shape) & (Sinks(shape, num_sinks) | SlidingWindow(shape, window))


def duo_attention(shape, retrieval_heads: Sequence[bool], num_sinks: int,
                  window: int) -> MultiHead:
  """DuoAttention: retrieval heads attend causally to everything, streaming heads to sinks and a
  recent window."""
  streaming = sinks_and_window(shape, num_sinks, window)
  return MultiHead(tuple(Causal(shape) if r else streaming for r in retrieval_heads))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv_indices", "num_kv", "partial", "q_indices", "num_q",
                                "partial_t", "blocks"],
                   meta_fields=["shape", "block_q", "block_kv"])
@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """Block metadata the kernel walks (see the module docstring). Arrays may be numpy (static
  masks, built on the host) or jax arrays (dynamic masks, built inside jit)."""

  kv_indices: np.ndarray
  num_kv: np.ndarray
  partial: np.ndarray
  q_indices: np.ndarray
  num_q: np.ndarray
  partial_t: np.ndarray
  blocks: np.ndarray
  shape: tuple[int, int]
  block_q: int
  block_kv: int

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(self.shape))

  @property
  def max_kv_blocks(self) -> int:
    return self.kv_indices.shape[-1]

  def density(self) -> float:
    """Fraction of (head, q block, kv block) tiles the kernel visits."""
    nk = self.q_indices.shape[2]
    return float(np.mean(np.asarray(self.num_kv)) / nk)

  def to_dense(self) -> np.ndarray:
    """Rebuilds (Bm, Hm, q_len, kv_len) from the blocks: the metadata's own specification."""
    kv_idx, num, part = map(np.asarray, (self.kv_indices, self.num_kv, self.partial))
    blocks = np.asarray(self.blocks)
    bm, hm, nq, _ = kv_idx.shape
    nk = self.q_indices.shape[2]
    bq, bk = self.block_q, self.block_kv
    out = np.zeros((bm, hm, nq * bq, nk * bk), bool)
    for b in range(bm):
      for h in range(hm):
        for i in range(nq):
          for s in range(num[b, h, i]):
            j, p = kv_idx[b, h, i, s], part[b, h, i, s]
            out[b, h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = True if p < 0 else blocks[p]
    return out[:, :, :self.shape[0], :self.shape[1]]


def _compact(classes: np.ndarray, axis_major: bool, block_ids: np.ndarray, min_width: int = 1):
  """classes (Hm, nq, nk) -> indices (Hm, n, width), counts (Hm, n), partial ids (Hm, n, width).

  axis_major=True walks kv blocks of each q block; False walks q blocks of each kv block."""
  c = classes if axis_major else classes.transpose(0, 2, 1)
  ids = block_ids if axis_major else block_ids.transpose(0, 2, 1)
  hm, n, m = c.shape
  counts = (c != EMPTY).sum(-1).astype(np.int32)
  width = max(min_width, int(counts.max()) if counts.size else 1, 1)
  idx = np.zeros((hm, n, width), np.int32)
  part = np.full((hm, n, width), -1, np.int32)
  for h in range(hm):
    for i in range(n):
      nz = np.nonzero(c[h, i])[0]
      if len(nz):
        idx[h, i, :len(nz)] = nz
        idx[h, i, len(nz):] = nz[-1]  # repeat: no new fetch for the padding steps
        part[h, i, :len(nz)] = ids[h, i, nz]
  return idx, counts, part


def mask_info(mask: Mask | MultiHead, block_q: int, block_kv: int) -> MaskInfo:
  """Compiles a static mask into block metadata (host side, once per mask and block size)."""
  heads = mask.masks if isinstance(mask, MultiHead) else (mask,)
  shape = tuple(mask.shape)
  if block_q < 1 or block_kv < 1:
    raise ValueError(f"mask_info: block sizes must be positive, got {block_q}, {block_kv}")
  classes = np.stack([m.classify(block_q, block_kv) for m in heads])
  # A block hanging over the mask's edge is never FULL: its padding must stay masked.
  if shape[0] % block_q:
    classes[:, -1, :] = np.minimum(classes[:, -1, :], PARTIAL)
  if shape[1] % block_kv:
    classes[:, :, -1] = np.minimum(classes[:, :, -1], PARTIAL)
  # Distinct partial blocks, shared across heads and positions.
  table: dict[bytes, int] = {}
  blocks: list[np.ndarray] = []
  block_ids = np.full(classes.shape, -1, np.int32)
  for h, i, j in zip(*np.nonzero(classes == PARTIAL)):
    values = _block_values(heads[h], block_q, block_kv, i, j)
    key = np.packbits(values).tobytes()
    if key not in table:
      table[key] = len(blocks)
      blocks.append(values)
    block_ids[h, i, j] = table[key]
  if not blocks:
    blocks.append(np.zeros((block_q, block_kv), bool))  # never referenced
  kv_idx, num_kv, part = _compact(classes, True, block_ids)
  q_idx, num_q, part_t = _compact(classes, False, block_ids)
  return MaskInfo(kv_indices=kv_idx[None], num_kv=num_kv[None], partial=part[None],
                  q_indices=q_idx[None], num_q=num_q[None], partial_t=part_t[None],
                  blocks=np.stack(blocks), shape=shape, block_q=block_q, block_kv=block_kv)


def as_jax(info: MaskInfo) -> MaskInfo:
  """The same metadata as device arrays (what the kernel consumes)."""
  conv = lambda x: jnp.asarray(x)
  return dataclasses.replace(info, kv_indices=conv(info.kv_indices), num_kv=conv(info.num_kv),
                             partial=conv(info.partial), q_indices=conv(info.q_indices),
                             num_q=conv(info.num_q), partial_t=conv(info.partial_t),
                             blocks=conv(info.blocks))
