"""KV caches: contiguous per-sequence buffers, and a page pool addressed through page tables.

K kv heads, B rows (sequences, or flattened tokens in the engine), S slots, H head dim,
P pages in the pool, ps page size, M pages per row.

Both are stored heads-major. A pool's rows are at least a TPU vector (128 lanes) wide where the
heads allow: heads narrower than that lie c = 128 // H side by side in a row, pools
(K/c, P, ps, c*H) (`pool_heads_per_row`; pallas_kernels.common: why and how the kernels read them),
written and gathered here as (K, ..., H) heads. A contiguous buffer (K, B, S, H) is itself a page pool with an
identity page table, so the paged decode kernel reads either without a copy.

Either may be int8 (`kv_cache_dtype="int8"`): each buffer is then a `kv_quant.QuantizedKV`, int8
values and beside them one float32 scale per token and kv head (symmetric absmax). A token's
K/V are quantized once, when written; every attention path reads the int8 values and applies
their scales to its logits and probabilities.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxinfer.config import ModelConfig
from jaxinfer.kv_quant import (QuantizedKV, kv_bytes_per_vector, kv_move, kv_read, kv_set,
                               kv_zeros, scales_shape)
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules
from jaxinfer.sparsity import Sparsity
from pallas_kernels.common import SCALE_LANES, unpack_heads

CACHE_AXES = ("kv_heads", "batch", "cache_seq", "head_dim")
POOL_AXES = ("kv_heads", "cache_pages", "page", "head_dim")
SCALE_AXES = ("kv_heads", None, None)  # an int8 buffer's scale rows (kv_quant.QuantizedKV)


@struct.dataclass
class LayerKV:
  """One layer's keys and values; `page_table` (B, M) is None for a contiguous cache."""

  k: jax.Array
  v: jax.Array
  page_table: Optional[jax.Array] = None

  def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "LayerKV":
    """Stores k, v (B,T,K,H) at `positions` (B,T); positions past the end are dropped."""
    if self.page_table is None:
      write = _write_contiguous
    else:
      write = lambda buf, new, pos: _write_paged(buf, new, pos, self.page_table)
    return LayerKV(write(self.k, k, positions), write(self.v, v, positions), self.page_table)

  def attend(self, impl, q: jax.Array, positions: jax.Array, **kw) -> jax.Array:
    return impl.cache(q, self, positions, **kw)


def _write_contiguous(buf, new: jax.Array, positions: jax.Array):
  rows = jnp.arange(buf.shape[1])[:, None]
  return kv_set(buf, (slice(None), rows, positions), new.transpose(2, 0, 1, 3))


def _as_rows(new: jax.Array, pool) -> jax.Array:
  """new (B,T,K,H) as the pool's rows (B,T,K/c,c*H): c adjacent heads side by side (a reshape)."""
  return new.reshape(new.shape[:2] + (pool.shape[0], pool.shape[-1]))


def _write_paged(pool, new: jax.Array, positions: jax.Array, page_table: jax.Array):
  ps, m = pool.shape[2], page_table.shape[1]
  index = positions // ps
  page = jnp.take_along_axis(page_table, jnp.clip(index, 0, m - 1), axis=1)
  page = jnp.where((index >= 0) & (index < m), page, pool.shape[1])  # out of range: dropped
  return kv_set(pool, (slice(None), page, positions % ps),
                _as_rows(new, pool).transpose(2, 0, 1, 3))


@struct.dataclass
class KVCache:
  """Per-layer buffers (K, B, S, H); slot s holds the token at position s."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  def layer(self, i: int) -> LayerKV:
    return LayerKV(self.k[i], self.v[i])

  def with_layers(self, layers: list[LayerKV]) -> "KVCache":
    return KVCache(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers))

  @classmethod
  def shape_of(cls, cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
    return (cfg.kv_heads, batch, max_len, cfg.head_dim)

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, mesh: Mesh | None = None,
           rules: ShardingRules = DEFAULT_RULES, kv_cache_dtype: str | None = None) -> "KVCache":
    shape = cls.shape_of(cfg, batch, max_len)
    shard = lambda axes, shape: None if mesh is None else rules.sharding(mesh, axes, shape)
    zeros = lambda: tuple(kv_zeros(shape, cfg.jnp_dtype, kv_cache_dtype, shard(CACHE_AXES, shape),
                                   shard(SCALE_AXES, scales_shape(shape)))
                          for _ in range(cfg.num_layers))
    return cls(k=zeros(), v=zeros())


@struct.dataclass
class PagedKVCache:
  """Per-layer page pools (K/c, P, ps, c*H) and one page table (B, M) shared by all layers: row b's
  position p lives in page page_table[b, p // ps] at offset p % ps. Rows may share pages (a
  common prompt prefix) by listing the same page ids."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  page_table: jax.Array

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  def layer(self, i: int) -> LayerKV:
    return LayerKV(self.k[i], self.v[i], self.page_table)

  def rows(self, head_dim: int) -> KVCache:
    """Each row's pages gathered in order: a contiguous cache (K, B, M * ps, H) per layer (of
    unquantized pools)."""
    gather = lambda pool: gather_rows(pool, self.page_table, pool.dtype, head_dim)[0]
    return KVCache(tuple(map(gather, self.k)), tuple(map(gather, self.v)))

  def with_layers(self, layers: list[LayerKV]) -> "PagedKVCache":
    return PagedKVCache(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers),
                        page_table=self.page_table)

  @staticmethod
  def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int, mesh: Mesh | None = None,
                 rules: ShardingRules = DEFAULT_RULES) -> tuple[int, ...]:
    """(K/c, P, ps, c*H): c = pool_heads_per_row(cfg, mesh, rules) kv heads a row."""
    c = pool_heads_per_row(cfg, mesh, rules)
    return (cfg.kv_heads // c, num_pages, page_size, c * cfg.head_dim)

  @staticmethod
  def pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int,
                 kv_cache_dtype: str | None = None) -> int:
    """Bytes of K and V pools for every layer (however many heads a row)."""
    return (2 * cfg.num_layers * num_pages * page_size * cfg.kv_heads
            * kv_bytes_per_vector(cfg.head_dim, cfg.jnp_dtype, kv_cache_dtype))

  @staticmethod
  def pool_shardings(cfg: ModelConfig, num_pages: int, page_size: int, mesh: Mesh | None,
                     rules: ShardingRules = DEFAULT_RULES):
    """(values' sharding, scales' sharding) of one pool; None without a mesh."""
    shape = PagedKVCache.pool_shape(cfg, num_pages, page_size, mesh, rules)
    if mesh is None:
      return None, None
    return (rules.sharding(mesh, POOL_AXES, shape),
            rules.sharding(mesh, SCALE_AXES, scales_shape(shape, cfg.kv_heads // shape[0])))

  @staticmethod
  def init_pools(cfg: ModelConfig, num_pages: int, page_size: int, mesh: Mesh | None = None,
                 rules: ShardingRules = DEFAULT_RULES, kv_cache_dtype: str | None = None):
    """(k pools, v pools), zero-filled, one (K/c, P, ps, c*H) buffer per layer each."""
    shape = PagedKVCache.pool_shape(cfg, num_pages, page_size, mesh, rules)
    shardings = PagedKVCache.pool_shardings(cfg, num_pages, page_size, mesh, rules)
    zeros = lambda: tuple(kv_zeros(shape, cfg.jnp_dtype, kv_cache_dtype, *shardings,
                                   heads_per_row=cfg.kv_heads // shape[0])
                          for _ in range(cfg.num_layers))
    return zeros(), zeros()


def pool_heads_per_row(cfg: ModelConfig, mesh: Mesh | None = None,
                       rules: ShardingRules = DEFAULT_RULES) -> int:
  """c, the kv heads each row of a page pool holds: 128 // H for heads narrower than a TPU
  vector when the kv heads (those of each device, on a mesh) group evenly by it; else 1.

  Why: XLA on a TPU lays out a pool whose last axis is 64 with its pages minor (a 64-lane row
  would be padded to 128), so the kernels' row-major view of it was a copy of the whole pool
  into their layout and back at every step. Rows of 128 lie row-major, as stored. An int8
  pool keeps a scale per token and kv head (QuantizedKV)."""
  h, k = cfg.head_dim, cfg.kv_heads
  if h >= SCALE_LANES or SCALE_LANES % h:
    return 1
  shards = 1 if mesh is None else math.prod(mesh.shape.get(a, 1)
                                            for a in rules.mesh_axes("kv_heads"))
  c = SCALE_LANES // h
  return c if k % c == 0 and (k // c) % shards == 0 else 1


def gather_rows(pool, page_table, dtype, head_dim: int | None = None):
  """Each row's pages of a pool (K/c,P,ps,c*H), in order: (values (K, B, M*ps, H), their scales
  (K, B, M*ps) or None), as kv_quant.kv_read; `head_dim` None: values as stored (K/c, ..., c*H)."""
  rows, _, ps, width = pool.shape
  b, m = page_table.shape
  x, scale = kv_read(pool, (slice(None), page_table), dtype)
  x = x.reshape(rows, b, m * ps, width)
  scale = None if scale is None else scale.reshape(scale.shape[0], b, m * ps)
  return (x if head_dim is None else unpack_heads(x, head_dim)), scale


@struct.dataclass
class PagePools:
  """A draft layer's K/V kept in the engine's page layout, (K/c, P, ps, c*H) buffers per layer: the
  engine's page ids name its pages, so a prompt page shared by reference carries them too."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @classmethod
  def init(cls, cfg: ModelConfig, num_pages: int, page_size: int) -> "PagePools":
    return cls(*PagedKVCache.init_pools(cfg, num_pages, page_size))

  def over(self, page_table: jax.Array) -> PagedKVCache:
    """The pools read and written through `page_table` (B, M); a row of -1 (not live) reads
    clamped pages and writes nothing."""
    return PagedKVCache(self.k, self.v, jnp.where(page_table < 0, self.k[0].shape[1],
                                                  page_table))

  @classmethod
  def of(cls, cache: PagedKVCache) -> "PagePools":
    return cls(cache.k, cache.v)


@struct.dataclass
class MixedLayerKV:
  """One layer of a `MixedPagedKVCache`: the step's flat rows split into their two groups."""

  k: jax.Array
  v: jax.Array
  decode_table: jax.Array
  chunk_table: jax.Array
  prefix_len: jax.Array | None = None
  tree_mask: jax.Array | None = None
  whole: Sparsity | None = struct.field(pytree_node=False, default=None)
  lanes_kv: tuple[jax.Array, jax.Array] | None = None  # (whole lanes: their K/V, as written)

  def _split(self, x: jax.Array):
    """x (1, S*T + G*Q, ...) -> decode rows (S, T, ...) and chunk lanes (G, Q, ...) (None when
    G == 0: a decode-only step)."""
    s, g = self.decode_table.shape[0], self.chunk_table.shape[0]
    t = 1 if self.tree_mask is None else self.tree_mask.shape[1]
    dec = x[0, :s * t].reshape((s, t) + x.shape[2:])
    if g == 0:
      return dec, None
    return dec, x[0, s * t:].reshape((g, -1) + x.shape[2:])

  def _decode_group(self):
    if self.tree_mask is None:
      return LayerKV(self.k, self.v, self.decode_table)
    return TreeLayerKV(self.k, self.v, self.decode_table, self.prefix_len, self.tree_mask)

  def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "MixedLayerKV":
    kd, kc = self._split(k)
    vd, vc = self._split(v)
    pd, pc = self._split(positions)
    dec = self._decode_group().write(kd, vd, pd)
    if kc is None:
      return self.replace(k=dec.k, v=dec.v)
    dec = LayerKV(dec.k, dec.v, self.chunk_table).write(kc, vc, pc)
    return self.replace(k=dec.k, v=dec.v, lanes_kv=None if self.whole is None else (kc, vc))

  def attend(self, impl, q: jax.Array, positions: jax.Array, **kw) -> jax.Array:
    qd, qc = self._split(q)
    pd, pc = self._split(positions)
    out_d = self._decode_group().attend(impl, qd, pd, **kw)  # (S, T, N, H)
    out_d = out_d.reshape((-1,) + out_d.shape[2:])
    if qc is None:
      return out_d[None]
    if self.whole is None:
      out_c = LayerKV(self.k, self.v, self.chunk_table).attend(impl, qc, pc, **kw)
    else:  # each lane a whole prompt: it attends to itself, with the run's pattern
      lengths = (pc < self.chunk_table.shape[1] * self.k.shape[2]).sum(-1)  # (then padding)
      out_c = impl.chunk(qc, *self.lanes_kv, pc, sparsity=self.whole, segment_ids=None,
                         lengths=lengths, **kw)
    return jnp.concatenate([out_d, out_c.reshape((-1,) + out_c.shape[2:])])[None]


@struct.dataclass
class MixedPagedKVCache:
  """The continuous-batching engine's step: one flat row of S*T + G*Q tokens (B=1) whose first
  S*T tokens are T per slot (page tables `decode_table` (S, M)) and whose rest are G lanes of Q
  prompt tokens, each lane a chunk of one sequence (`chunk_table` (G, M)). Dense layers see all
  tokens as one batch (SARATHI's mixed step); attention runs per group.

  T = 1 (no `tree_mask`): one decode token per slot. Otherwise each slot's T tokens are a draft
  tree verified over its pages (`TreeLayerKV`: stored at prefix_len + node index, seeing the
  prefix and their ancestors, `tree_mask` (S, T, W) packed ancestor bits); `commit_path` then
  moves the accepted path's K/V to consecutive positions.

  `whole` (a dynamic sparsity pattern, which needs a prompt's queries and keys all at once):
  each lane is a whole prompt (but its last token) from position 0, and attends to its own K/V
  with that pattern instead of reading its pages."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  decode_table: jax.Array
  chunk_table: jax.Array
  prefix_len: jax.Array | None = None
  tree_mask: jax.Array | None = None
  whole: Sparsity | None = struct.field(pytree_node=False, default=None)

  def layer(self, i: int) -> MixedLayerKV:
    return MixedLayerKV(self.k[i], self.v[i], self.decode_table, self.chunk_table,
                        self.prefix_len, self.tree_mask, self.whole)

  def with_layers(self, layers: list[MixedLayerKV]) -> "MixedPagedKVCache":
    return self.replace(k=tuple(l.k for l in layers), v=tuple(l.v for l in layers))


@struct.dataclass
class TreeLayerKV:
  """One layer of draft trees over a paged cache: writes the T tree tokens at slots
  prefix_len + node index (whatever their RoPE positions; a token at a position past the rows'
  pages, as a row that is not verifying has, is not written), and attends through the
  tree-verification kernel."""

  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  prefix_len: jax.Array
  tree_mask: jax.Array

  def slots(self, positions: jax.Array) -> jax.Array:
    """Where the tokens at RoPE `positions` (B, T) are stored: by node index after the prefix;
    out of range (dropped) where their position is."""
    end = self.page_table.shape[1] * self.k.shape[2]
    index = self.prefix_len[:, None] + jnp.arange(positions.shape[1], dtype=positions.dtype)
    return jnp.where(positions >= end, end, index)

  def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "TreeLayerKV":
    slots = self.slots(positions)
    return self.replace(k=_write_paged(self.k, k, slots, self.page_table),
                        v=_write_paged(self.v, v, slots, self.page_table))

  def attend(self, impl, q: jax.Array, positions: jax.Array, **kw) -> jax.Array:
    return impl.tree(q, self, positions, **kw)


def commit_path(pools: tuple[jax.Array, ...], page_table: jax.Array, prefix_len: jax.Array,
                path: jax.Array, num_accepted: jax.Array) -> tuple[jax.Array, ...]:
  """Moves the K/V of accepted tree nodes path[:, d] (stored at prefix_len + path[:, d]) to
  prefix_len + d, for 1 <= d <= num_accepted; everything else in the tree region is left as
  garbage past the new length. pools: per-layer (K/c, P, ps, c*H) buffers."""
  b, t = path.shape
  ps, m = pools[0].shape[2], page_table.shape[1]
  depth = jnp.arange(t)[None, :]
  src = prefix_len[:, None] + path
  dst = jnp.where((depth >= 1) & (depth <= num_accepted[:, None]), prefix_len[:, None] + depth,
                  m * ps)  # out of range: dropped

  def locate(pos):
    index = jnp.clip(pos // ps, 0, m - 1)
    page = jnp.take_along_axis(page_table, index, axis=1)
    return jnp.where(pos < m * ps, page, pools[0].shape[1]), pos % ps

  src_page, src_off = locate(src)
  dst_page, dst_off = locate(dst)
  src_page = jnp.clip(src_page, 0, pools[0].shape[1] - 1)
  return tuple(kv_move(pool, (slice(None), src_page, src_off), (slice(None), dst_page, dst_off))
               for pool in pools)
