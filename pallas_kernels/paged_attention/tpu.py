"""The Mosaic TPU form of attention over paged K/V: rows of queries per (sequence, kv head)
folded page block by page block, shared by paged decode (rows = the G heads of a group) and tree
verification (rows = T tree tokens x G heads).

B sequences, K kv heads, R rows, H head dim, P pages in the pool, ps page size, M pages per
sequence, C splits, bp pages per block (bk = bp * ps keys).

The TPU way: per-row scalars (how far each sequence reaches, its page table) are scalar
prefetch in SMEM; the pools stay in HBM (`memory_space=ANY`) and a block of bp pages comes into
VMEM by one DMA per page, double-buffered, so VMEM holds 2 x 2 x bp pages whatever the pool or
context size. Pages that no row can see are never fetched; a page is read once for all R rows.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE, NT, SCALE_LANES, rows_by_head

LANES = 128


def _div(a, b: int):
  """Division of non-negative integers as Mosaic lowers it without asking which chip it is for
  (`//` rounds toward -inf, which needs the sign and so the device kind)."""
  return lax.div(a, jnp.int32(b))


def sublanes(dtype) -> int:
  """Rows of one native (sublane) tile: 8 for 32-bit, 16 for bf16."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def pages_per_block(page_size: int, max_pages: int, keys: int = 256) -> int:
  """Enough pages for about `keys` keys per block (an MXU-sized matmul), at most a sequence."""
  return max(1, min(max_pages, keys // page_size))


def _segments(end, split, *, page_size, max_pages, per_split, window_lag, sinks):
  """The page ranges [a0, a1) and [b0, b1) this program reads: without a window all of its
  split's pages holding positions < end; with one, the pages of the first `sinks` positions, then
  those from the window's first page (earliest visible position end - window_lag) on."""
  num_pages = jnp.minimum(_div(end + page_size - 1, page_size), max_pages)
  first = split * per_split
  last = jnp.maximum(first, jnp.minimum(first + per_split, num_pages))
  if window_lag is None:
    return (first, first), (first, last)
  sink_end = first
  if sinks:
    sink_end = jnp.maximum(first, jnp.minimum(last, -(-sinks // page_size)))
  wfirst = _div(jnp.maximum(end - window_lag, 0), page_size)
  return (first, sink_end), (jnp.minimum(jnp.maximum(sink_end, wfirst), last), last)


def _page_scales(buf, slot, pages, *, page_size: int, bk: int, first: int = 0):
  """(1, bk): a block's keys' scales, from its pages' fetched scale rows `buf[slot]` from row
  `first` on (`pages`: their pool page ids). Page j's segment of its row is rotated to lanes j*ps.. of the 128-lane
  chunk it belongs to (whole chunks are then joined: Mosaic joins and slices lanes only at
  128-lane boundaries)."""
  lane = lax.broadcasted_iota(jnp.int32, (1, SCALE_LANES), 1)
  chunks = [jnp.zeros((1, SCALE_LANES), jnp.float32) for _ in range(-(-bk // SCALE_LANES))]
  for j, page in enumerate(pages):
    offset = lax.rem(page * page_size, SCALE_LANES)  # in the row
    dest = j * page_size % SCALE_LANES  # in the chunk
    shift = lax.rem(dest - offset + SCALE_LANES, SCALE_LANES)
    rolled = pltpu.roll(buf[slot, pl.ds(first + j, 1), :], shift, 1)
    mine = (lane >= dest) & (lane < dest + page_size)
    chunks[j * page_size // SCALE_LANES] += jnp.where(mine, rolled, 0.0)
  row = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)
  return row[:, :bk]


def _fold(carry, logits, seen, v, v_scale=None):
  """One block of keys into the running (o, m, l), m and l as (rows, 1) columns: logits
  (rows, keys) already scaled, seen (rows, keys), v (keys, H); an int8 v's per-key scales
  (1, keys) weigh the probabilities."""
  o, m, l = carry
  logits = jnp.where(seen, logits, MASK_VALUE)
  m_new = jnp.maximum(m, logits.max(axis=-1, keepdims=True))
  p = jnp.where(seen, jnp.exp(logits - m_new), 0.0)
  corr = jnp.exp(m - m_new)
  l = corr * l + p.sum(axis=-1, keepdims=True)
  weights = p if v_scale is None else jnp.where(seen, p * v_scale, 0.0)
  o = corr * o + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o, m_new, l


def _finish(carry):
  """(normalised output, log-sum-exp down LANES lanes); rows that saw no key give 0 and -inf."""
  o, m, l = carry
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)
  return jnp.where(seen, o / safe_l, 0.0), jnp.broadcast_to(lse, (lse.shape[0], LANES))


def _kernel(ends_ref, pt_ref, q_ref, *refs, num_extra, quantized, visible, scale, page_size, bp,
            max_pages, per_split, window_lag, sinks, heads, head_rows):
  extras = refs[:num_extra]
  nq = 2 if quantized else 0  # int8 pools: their scales' HBM refs and VMEM buffers
  k_hbm, v_hbm, *scale_hbm = refs[num_extra:num_extra + 2 + nq]
  o_ref, lse_ref, k_buf, v_buf, *rest = refs[num_extra + 2 + nq:]
  scale_buf, sems = rest[:nq], rest[nq]
  pairs = [(k_hbm, k_buf), (v_hbm, v_buf)] + list(zip(scale_hbm, scale_buf))
  b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  end = ends_ref[b]
  (a0, a1), (b0, b1) = _segments(end, split, page_size=page_size, max_pages=max_pages,
                                 per_split=per_split, window_lag=window_lag, sinks=sinks)
  na = _div(a1 - a0 + bp - 1, bp)
  nb = _div(b1 - b0 + bp - 1, bp)

  num_pages = k_hbm.shape[1]

  def block(i):
    """First page and the segment's end page of page block i (sink blocks first)."""
    in_a = i < na
    return jnp.where(in_a, a0 + i * bp, b0 + (i - na) * bp), jnp.where(in_a, a1, b1)

  def page_of(i, j):
    """(block i's page j, its pool page id; an id past the pool reads its last page, as XLA's
    gather clamps: a table's out-of-range id marks a page no write may land in)."""
    p = block(i)[0] + j
    return p, jnp.minimum(pt_ref[b * max_pages + jnp.minimum(p, max_pages - 1)], num_pages - 1)

  def copies(i, slot):
    stop = block(i)[1]
    for j in range(bp):
      p, page = page_of(i, j)
      row = _div(page * page_size, SCALE_LANES)  # the aligned row of 128 holding its scales
      pages = [pltpu.make_async_copy(src.at[head, page], buf.at[slot, j], sems.at[n, slot])
               for n, (src, buf) in enumerate(pairs[:2])]
      scales = [pltpu.make_async_copy(src.at[head * heads + c, row], buf.at[slot, c * bp + j],
                                      sems.at[2 + n, slot])  # each kv head's row of the page
                for n, (src, buf) in enumerate(pairs[2:]) for c in range(heads)]
      yield p < stop, pages + scales

  def dma(i, slot, op):  # op: "start" or "wait" each valid page's K and V copies
    for valid, pair in copies(i, slot):
      @pl.when(valid)
      def _():
        for c in pair:
          getattr(c, op)()

  q = q_ref[...]
  rows, h = q.shape
  bk = bp * page_size

  def body(i, carry):
    slot = lax.rem(i, 2)

    @pl.when(i + 1 < na + nb)
    def _():
      dma(i + 1, 1 - slot, "start")

    dma(i, slot, "wait")
    start, stop = block(i)
    limit = jnp.minimum(stop * page_size, end)  # fetched, and written
    pos = start * page_size + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k, v = k_buf[slot], v_buf[slot]
    if quantized:  # int8 rows widened per page (a 32-bit tile holds a page's rows whole)
      k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    k = k.reshape(bk, h).astype(q.dtype)
    v = v.reshape(bk, h).astype(q.dtype)
    # Unfetched or stale buffer rows may hold anything, NaN included: mask keys and values.
    v = jnp.where(start * page_size + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < limit, v,
                  jnp.zeros_like(v))
    seen = visible(pos, end, *extras) & (pos < limit)
    logits = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    vs = None
    if quantized:  # per-key scales along the lanes: on the logits, and on the weights of v
      pages = [page_of(i, j)[1] for j in range(bp)]
      ks, vs = (rows_by_head([_page_scales(buf, slot, pages, page_size=page_size, bk=bk,
                                           first=c * bp) for c in range(heads)], rows, head_rows)
                for buf in scale_buf)
      logits = logits * ks
    return _fold(carry, logits, seen, v, vs)

  @pl.when(na + nb > 0)
  def _():
    dma(0, 0, "start")

  init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  o_ref[...], lse_ref[...] = _finish(lax.fori_loop(0, na + nb, body, init))


def paged_rows_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, ends: jax.Array,
                         page_table: jax.Array, extras: tuple[jax.Array, ...],
                         visible: Callable[..., jax.Array], *, scale: float, num_splits: int,
                         window_lag: int | None, sinks: int, block_pages: int | None = None,
                         scales: tuple[jax.Array, ...] = (), head_rows: int | None = None,
                         interpret=False):
  """q (B,K,R,H) -> (o (B,K,C,R,H) f32 unnormalised per split, lse (B,K,C,R)).

  Row r of (b, k) sees key position `pos` iff pos < ends[b] and visible(pos (1,bk), ends[b],
  *refs to extras' (R, X) blocks of b) -> (R, bk); `extras` are (B, R, X) int32 per-row
  inputs. With a window, no row sees a position below ends[b] - window_lag except the first
  `sinks`, so those pages are skipped. block_pages: pages per DMA block (default: about 256
  keys). scales: () or, for int8 pools, their float32 scale rows (k's, v's;
  common.check_scales), a page's row fetched beside it, one per kv head of a pool row: with
  c kv heads a row (pools (K/c, ..., c*H)), rows [i*head_rows, (i+1)*head_rows) are head i's
  (common.pack_rows) and take its scales."""
  b, kv_heads, rows, h = q.shape
  _, _, page_size, _ = k_pages.shape
  max_pages = page_table.shape[1]
  per_split = -(-max_pages // num_splits)
  bp = min(block_pages, per_split) if block_pages else pages_per_block(page_size, per_split)
  heads = scales[0].shape[0] // kv_heads if scales else 1
  kernel = functools.partial(_kernel, num_extra=len(extras), quantized=bool(scales),
                             visible=visible, scale=scale,
                             page_size=page_size, bp=bp, max_pages=max_pages,
                             per_split=per_split, window_lag=window_lag, sinks=sinks, heads=heads,
                             head_rows=head_rows or rows)
  row_spec = lambda x: pl.BlockSpec((None,) + x.shape[1:], lambda bi, ki, si, *_: (bi, 0, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kv_heads, num_splits),
      in_specs=[pl.BlockSpec((None, None, rows, h), lambda bi, ki, si, *_: (bi, ki, 0, 0))]
      + [row_spec(x) for x in extras] + [hbm] * (2 + len(scales)),
      out_specs=[pl.BlockSpec((None, None, None, rows, h),
                              lambda bi, ki, si, *_: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((None, None, None, rows, LANES),
                              lambda bi, ki, si, *_: (bi, ki, si, 0, 0))],
      scratch_shapes=[pltpu.VMEM((2, bp, page_size, h), k_pages.dtype),
                      pltpu.VMEM((2, bp, page_size, h), v_pages.dtype)]
      + [pltpu.VMEM((2, heads * bp, SCALE_LANES), jnp.float32)] * len(scales)
      + [pltpu.SemaphoreType.DMA((2 + len(scales), 2))])
  o, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="paged_rows_attention_tpu",
  )(ends.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), q, *extras, k_pages,
    v_pages, *scales)
  return o, lse[..., 0]
