"""The Mosaic TPU form of block-sparse flash attention: forward, dQ and dK/dV kernels.

B batch, N q heads, K kv heads (G = N // K), T q len, S kv len, H head dim; bq / bk block sizes;
R the rows a grid walks (q blocks, or kv blocks for dK/dV); W the widest row; L = 128 lanes.

Same contract as kernel._gpu_call; the layout is Mosaic's (as in jax's splash attention):
- The mask metadata comes in by scalar prefetch (SMEM, 1 MiB), flattened to 1-D (SMEM pads a
  2-D table to (8, 128) tiles) and packed one int32 per step. The grid is (B, N, R, W): its last
  axis walks one row of the metadata, and the walked operand's index_map reads the step's block
  index from it, so the pipeline fetches only non-empty blocks. A row's padding repeats its last
  index (no new fetch) and skips the compute.
- A PARTIAL step reads its stored (bq, bk) mask through an index_map on the partial id; a FULL
  step keeps the last fetched mask block (the ids are forward-filled) and does no mask work.
- Softmax state and gradients accumulate in VMEM scratch (m, l lane-replicated (bq, L); acc
  (bq, H) f32), set at the first step of a row and written out at its last.
- lse and delta are rows of q blocks (B, N, T / bq, 1, bq): a (1, bq) block is whole in its
  last two dims at any bq, where a (bq,) one, or (1, bq) of (1, T), needs bq a multiple of 128.
- Segment ids are broadcast to (B, T, L) / (B, 8, S), or (B, 8, T) / (B, S, L) for dK/dV, which
  works in the transposed (bk, bq) orientation so its matmuls need no transposed operand.
Compiled for a TPU, bq and bk must be multiples of 8 (or the whole padded length), and bk of 128
with segment ids (libtpu compiled forward and backward at 32, 64 and 128:
tests/test_block_sparse_tpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE, NN, NT

LANES, SUBLANES = 128, 8


def _dot(a, b, dims=NN):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lanes(x, n):
  """A lane-replicated (rows, L) value widened or cut to (rows, n) without a broadcast."""
  return jnp.tile(x, (1, -(-n // LANES)))[:, :n]


_PARTIAL = -2**31  # the sign bit of a packed step


def _flat_meta(meta, num_blocks: int, num_partial: int):
  """(Bm, Hm, R, W) indices / partial ids and (Bm, Hm, R) counts -> the 1-D scalar-prefetch
  arrays (packed steps, counts), `row(b, h, r)` -> the flat row, and W.

  A step packs its block index (bits 0-15), the mask block to fetch (bits 16-30) and whether
  the block is PARTIAL (the sign bit) into one int32: a third of the SMEM (1 MiB) that three
  arrays would take. The fetch id of a FULL step is the row's last partial id before it (or its
  first one), so the pipeline fetches no mask block for it. A leading metadata dim of 1 is
  shared by all batch rows / heads."""
  if num_blocks > 1 << 16 or num_partial > 1 << 15:
    raise ValueError(f"block_sparse_attention (TPU): at most {1 << 16} blocks per row and "
                     f"{1 << 15} distinct partial blocks, got {num_blocks} and {num_partial}; "
                     "use larger blocks")
  idx, num, part = meta
  bm, hm, rows, width = idx.shape
  steps = jnp.arange(width, dtype=jnp.int32)
  has = part >= 0
  last = lax.cummax(jnp.where(has, steps, -1), axis=3)
  first = jnp.argmax(has, axis=3, keepdims=True).astype(jnp.int32)
  fetch = jnp.maximum(jnp.take_along_axis(part, jnp.where(last >= 0, last, first), axis=3), 0)
  packed = jnp.where(has, _PARTIAL, 0) | (fetch << 16) | idx

  def row(b, h, r):
    return ((b if bm > 1 else 0) * hm + (h if hm > 1 else 0)) * rows + r

  return (packed.reshape(-1), num.reshape(-1)), row, width


def _walk(step_ref, num_ref, *, row, width, body):
  """Runs body(partial) if this grid step is one of its row's non-empty blocks: partial=False
  for a FULL block, True for a PARTIAL one (two branches, so FULL blocks carry no mask code)."""
  b, h, r, j = (pl.program_id(a) for a in range(4))
  at = row(b, h, r)
  run = j < num_ref[at]
  partial = step_ref[at * width + j] < 0
  pl.when(run & jnp.logical_not(partial))(lambda: body(False))
  pl.when(run & partial)(lambda: body(True))


def _visible(partial, blk_ref, seg_rows, seg_cols):
  """This step's (rows, cols) visibility, or None when every entry is visible: the stored block
  when `partial`, and equal segment ids (rows lane-replicated (rows, L), cols (8, cols))."""
  mask = (blk_ref[...] != 0) if partial else None
  if seg_rows is not None:
    cols = seg_cols[:1, :]
    seg = _lanes(seg_rows[...], cols.shape[1]) == cols
    mask = seg if mask is None else mask & seg
  return mask


def _fwd_kernel(step_ref, num_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, blk_ref, o_ref, lse_ref,
                m_ref, l_ref, acc_ref, *, scale, row, width):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(partial):
    s = _dot(q_ref[...], k_ref[...], NT) * scale  # (bq, bk)
    mask = _visible(partial, blk_ref, qseg_ref, kseg_ref)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # (bq, L)
    p = jnp.exp(s - _lanes(m_next, s.shape[1]))
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet keeps l == 0
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
    m_ref[...] = m_next
    pv = _dot(p.astype(v_ref.dtype), v_ref[...])
    acc_ref[...] = _lanes(alpha, pv.shape[1]) * acc_ref[...] + pv

  _walk(step_ref, num_ref, row=row, width=width, body=body)

  @pl.when(j == width - 1)
  def _finish():
    l, m = l_ref[...], m_ref[...]
    seen = l > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_ref[...] * _lanes(inv, o_ref.shape[1])).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # (bq, L)
    lse_ref[...] = lse.T[:1, :]


def _dq_kernel(step_ref, num_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, blk_ref, do_ref, lse_ref,
               delta_ref, dq_ref, acc_ref, *, scale, row, width):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(partial):
    k = k_ref[...]
    s = _dot(q_ref[...], k, NT) * scale  # (bq, bk)
    p = jnp.exp(s - lse_ref[0][:, None])  # lse +inf (a row that saw nothing): p = 0
    mask = _visible(partial, blk_ref, qseg_ref, kseg_ref)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    ds = p * (_dot(do_ref[...], v_ref[...], NT) - delta_ref[0][:, None])
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  _walk(step_ref, num_ref, row=row, width=width, body=body)

  @pl.when(j == width - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(step_ref, num_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, blk_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, row, width):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def body(partial):
    q, do = q_ref[...], do_ref[...]
    s = _dot(k_ref[...], q, NT) * scale  # (bk, bq): transposed, so lse/delta are rows
    p = jnp.exp(s - lse_ref[...])
    mask = _visible(partial, blk_ref, kseg_ref, qseg_ref)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dv_acc[...] += _dot(p.astype(do.dtype), do)
    ds = p * (_dot(v_ref[...], do, NT) - delta_ref[...])
    dk_acc[...] += _dot(ds.astype(q.dtype), q)

  _walk(step_ref, num_ref, row=row, width=width, body=body)

  @pl.when(j == width - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _segment_inputs(qseg, kseg, dkv: bool, bq: int, bk: int, q_at, kv_at):
  """([q segment ids, kv segment ids], their block specs) laid out for the kernel's tiles (both
  None without segments): the forward reads q ids down the rows and kv ids along the lanes, the
  dkv kernel (rows of kv) the other way round; each replicated to a whole tile's width."""
  if qseg is None:
    return [None, None], [None, None]
  spec = pl.BlockSpec
  (b, t), s = qseg.shape, kseg.shape[1]
  if dkv:
    return ([jnp.broadcast_to(qseg[:, None, :], (b, SUBLANES, t)),
             jnp.broadcast_to(kseg[:, :, None], (b, s, LANES))],
            [spec((None, SUBLANES, bq), lambda bi, hi, *a: (bi, 0, q_at(bi, hi, *a))),
             spec((None, bk, LANES), lambda bi, hi, *a: (bi, kv_at(bi, hi, *a), 0))])
  return ([jnp.broadcast_to(qseg[:, :, None], (b, t, LANES)),
           jnp.broadcast_to(kseg[:, None, :], (b, SUBLANES, s))],
          [spec((None, bq, LANES), lambda bi, hi, *a: (bi, q_at(bi, hi, *a), 0)),
           spec((None, SUBLANES, bk), lambda bi, hi, *a: (bi, 0, kv_at(bi, hi, *a)))])


def tpu_call(kind, q, k, v, qseg, kseg, meta, blocks, extra, *, scale, bq, bk, interpret):
  """One of the three kernels ("fwd" | "dq" | "dkv") over grid (B, N, R, W), with
  kernel._gpu_call's inputs and outputs: fwd -> (o (B,N,T,H), lse (B,N,T)), dq -> (dq,),
  dkv -> (dk, dv) per q head (B,N,S,H). `interpret` is False or a `pltpu.InterpretParams`."""
  b, n, t, h = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  g = n // kv_heads
  dkv = kind == "dkv"
  rows = (s // bk) if dkv else (t // bq)
  prefetch, row, width = _flat_meta(meta, (t // bq) if dkv else (s // bk), blocks.shape[0])
  grid = (b, n, rows, width)

  def step(bi, hi, r, j, step_ref, *_):  # this step's packed word
    return step_ref[row(bi, hi, r) * width + j]

  def walked(*a):  # the block index this step visits
    return step(*a) & 0xFFFF

  def own(bi, hi, r, j, *_):  # the row's own block index
    return r

  spec = pl.BlockSpec
  q_at, kv_at = (walked, own) if dkv else (own, walked)
  q_spec = spec((None, None, bq, h), lambda bi, hi, *a: (bi, hi, q_at(bi, hi, *a), 0))
  kv_spec = spec((None, None, bk, h),
                 lambda bi, hi, *a: (bi, lax.div(hi, g), kv_at(bi, hi, *a), 0))
  # rows of q blocks: (B, N, T // bq, 1, bq), so a block's last two dims are whole at any bq
  row_spec = spec((None, None, None, 1, bq), lambda bi, hi, *a: (bi, hi, q_at(bi, hi, *a), 0, 0))
  rows_of = lambda x: x.reshape(b, n, t // bq, 1, bq)
  blk_spec = spec((None, bk, bq) if dkv else (None, bq, bk),
                  lambda *a: ((step(*a) >> 16) & 0x7FFF, 0, 0))
  if dkv:
    blocks = blocks.transpose(0, 2, 1)
  seg_args, seg_specs = _segment_inputs(qseg, kseg, dkv, bq, bk, q_at, kv_at)
  in_specs = [q_spec, kv_spec, kv_spec, *seg_specs, blk_spec]
  args = [q, k, v, *seg_args, blocks]
  if kind != "fwd":
    do, lse, delta = extra
    in_specs += [q_spec, row_spec, row_spec]
    args += [do, rows_of(lse), rows_of(delta)]

  kw = dict(scale=scale, row=row, width=width)
  f32 = jnp.float32
  if kind == "fwd":
    kernel = functools.partial(_fwd_kernel, **kw)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t // bq, 1, bq), f32)]
    out_specs = [q_spec, row_spec]
    scratch = [pltpu.VMEM((bq, LANES), f32), pltpu.VMEM((bq, LANES), f32), pltpu.VMEM((bq, h), f32)]
  elif kind == "dq":
    kernel = functools.partial(_dq_kernel, **kw)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    scratch = [pltpu.VMEM((bq, h), f32)]
  else:
    kernel = functools.partial(_dkv_kernel, **kw)
    # dK/dV per q head; the G heads sharing a kv head are summed outside the kernel.
    per_head = spec((None, None, bk, h), lambda bi, hi, r, j, *_: (bi, hi, r, 0))
    out_shape = [jax.ShapeDtypeStruct((b, n, s, h), k.dtype),
                 jax.ShapeDtypeStruct((b, n, s, h), v.dtype)]
    out_specs = [per_head, per_head]
    scratch = [pltpu.VMEM((bk, h), f32), pltpu.VMEM((bk, h), f32)]
  out = pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=grid,
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name=f"block_sparse_attention_{kind}_tpu")(*prefetch, *args)
  if kind == "fwd":
    return out[0], out[1].reshape(b, n, t)
  return tuple(out)
