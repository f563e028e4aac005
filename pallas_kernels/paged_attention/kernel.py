"""Paged decode attention (FlashDecoding split-K over pages), as a Pallas kernel.

B batch, N q heads, K kv heads, G = N // K, H head dim, P pages in the pool, ps page size,
M max pages per sequence, C splits.

One program per (sequence, kv head, split): the G query heads that share the kv head are the
rows of one (G, H) x (H, ps) matmul per page, so each K/V page is read once for all of them.
Each split walks its share of the sequence's pages and writes an unnormalised partial result
and its log-sum-exp; the splits are merged outside the kernel (a tiny reduction).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check_heads, check_scales, gpu_rows, merge_splits,
                                   on_target, pack_rows, scale_grid, scale_kwargs,
                                   softmax_finish, softmax_init, split_pages, triton_params,
                                   unpack_rows, walk_pages, walk_sinks_and_window)
from pallas_kernels.paged_attention.tpu import paged_rows_attention, sublanes


def _kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, *refs, scale, page_size, pages_per_split,
            window, sinks, head_rows):
  *scale_refs, o_ref, lse_ref = refs  # (ks_ref, vs_ref) with int8 pools
  q = q_ref[...]
  rows, h = q.shape
  length = len_ref[0]
  first, last = split_pages(length, page_size, pt_ref.shape[0], pages_per_split)

  def visible(pos):
    vis = pos < length
    if window is not None:
      vis &= (pos >= length - window) | (pos < sinks)
    return vis

  walk = functools.partial(walk_pages, q, k_ref, v_ref, pt_ref, visible_fn=visible,
                           head=pl.program_id(1), scale=scale, page_size=page_size,
                           head_rows=head_rows, **scale_kwargs(scale_refs))
  carry = walk_sinks_and_window(walk, first, last, softmax_init(rows, h), page_size=page_size,
                                sinks=sinks,
                                window_start=None if window is None else length - window)
  o_ref[...], lse_ref[...] = softmax_finish(carry)


def default_num_splits(batch: int, kv_heads: int, max_pages: int, target: int = 256) -> int:
  """Enough programs to fill a large GPU (~2 per SM) without splitting a sequence too finely."""
  return max(1, min(max_pages, -(-target // max(1, batch * kv_heads))))


def page_walk_forms(gpu_form, tpu_form, *, batch: int, kv_heads: int, max_pages: int,
                    num_splits: int | None, min_rows: int | None, block_pages: int | None, **kw):
  """`build(form, interpret)` for common.on_target, shared by the kernels that walk pages."""
  def build(form, interp):
    if form == "tpu":  # a TPU core walks the grid in order: splits only cost there
      return functools.partial(tpu_form, splits=num_splits or 1, block_pages=block_pages,
                               interpret=interp, **kw)
    splits = num_splits or default_num_splits(batch, kv_heads, max_pages)
    return functools.partial(gpu_form, splits=splits, min_rows=min_rows, interpret=interp, **kw)
  return build


def _check(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales):
  if q.ndim != 3 or k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
    raise ValueError(f"paged_attention: expected q (B,N,H) and pages (K/c,P,ps,c*H), got "
                     f"{q.shape}, {k_pages.shape}, {v_pages.shape}")
  b, n, h = q.shape
  c = check_heads("paged_attention", n, h, k_pages.shape)
  if lengths.shape != (b,) or page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"paged_attention: lengths {lengths.shape} / page_table {page_table.shape} "
                     f"do not match batch {b}")
  check_scales("paged_attention", k_pages, k_scales, v_scales, c)
  return c


def _gpu_form(q, k_pages, v_pages, lengths, page_table, *scales, scale, splits, window, sinks,
              head_rows, min_rows, interpret):
  """The Triton form (what CPU interprets): q (B,K,G,H) -> (B,K,G,H) f32. Triton reads the
  pools through pointers (never staged whole); its rows are padded to a power of two >= 16."""
  b, kv_heads, g, h = q.shape
  max_pages = page_table.shape[1]
  rows = gpu_rows(g, interpret, min_rows)
  scales = tuple(scale_grid(x, *k_pages.shape[1:3]) for x in scales)  # (K,P,ps): read per page
  if rows > g:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
  kernel = functools.partial(_kernel, scale=scale, page_size=k_pages.shape[2],
                             pages_per_split=-(-max_pages // splits), window=window, sinks=sinks,
                             head_rows=head_rows)
  pool = pl.BlockSpec(memory_space=pl.ANY)  # read page by page through the page table
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, splits),
      in_specs=[pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, max_pages), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, None, rows, h), lambda bi, ki, si: (bi, ki, 0, 0)),
                pool, pool] + [pool] * len(scales),
      out_specs=[pl.BlockSpec((None, None, None, rows, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda bi, ki, si: (bi, ki, si, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32)],
      interpret=interpret, compiler_params=None if interpret else triton_params(),
      name="paged_decode_attention",
  )(lengths[:, None], page_table, q, k_pages, v_pages, *scales)
  return merge_splits(o, lse, axis=2)[:, :, :g]


def _decode_visible(window, sinks):
  def visible(pos, length):
    vis = pos < length
    if window is not None:
      vis &= (pos >= length - window) | (pos < sinks)
    return vis
  return visible


def _tpu_form(q, k_pages, v_pages, lengths, page_table, *scales, scale, splits, window, sinks,
              head_rows, block_pages, interpret):
  """The Mosaic TPU form (paged_attention/tpu.py); rows padded to a whole sublane tile."""
  g = q.shape[2]
  rows = -(-g // sublanes(q.dtype)) * sublanes(q.dtype)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
  o, lse = paged_rows_attention(q, k_pages, v_pages, lengths, page_table, (),
                                _decode_visible(window, sinks), scale=scale, num_splits=splits,
                                window_lag=window, sinks=sinks, block_pages=block_pages,
                                scales=scales, head_rows=head_rows, interpret=interpret)
  return merge_splits(o, lse, axis=2)[:, :, :g]


@functools.partial(jax.jit, static_argnames=("window", "sinks", "num_splits", "scale", "backend",
                                             "interpret", "min_rows", "block_pages"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_table: jax.Array, k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None, *, window: int | None = None, sinks: int = 0,
                    num_splits: int | None = None, scale: float | None = None,
                    backend: str | None = None, interpret: bool | None = None,
                    min_rows: int | None = None, block_pages: int | None = None) -> jax.Array:
  """q (B,N,H) one token per sequence; keys at positions < lengths[b] are visible (and, with a
  sliding window, >= lengths[b] - window or < sinks), position p living in page
  page_table[b, p // ps] at offset p % ps. Returns (B,N,H). Pages (K/c, P, ps, c*H) may hold
  c kv heads a row (common.heads_per_row; c = 1: (K, P, ps, H)).

  The platform being lowered for picks the kernel form (TPU: Mosaic with DMAs; CUDA: Triton;
  CPU: the Triton form interpreted); `backend` / `interpret` force them (common.on_target);
  `min_rows` pads the GPU form's rows (default: 16 and a power of two when compiled);
  `block_pages` is the TPU form's pages per DMA block (default: about 256 keys).

  int8 pools come with float32 scales `k_scales`, `v_scales`, one per key and kv head (pages hold
  round(x / scale)), laid out in rows of 128 (common.check_scales); the kernel reads the int8
  pages and applies the scales to the logits and the probabilities, never materialising
  dequantized pages."""
  c = _check(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales)
  b, n, h = q.shape
  kv_heads = k_pages.shape[0] * c
  g = n // kv_heads
  build = page_walk_forms(_gpu_form, _tpu_form, batch=b, kv_heads=k_pages.shape[0],
                          max_pages=page_table.shape[1], num_splits=num_splits,
                          min_rows=min_rows, block_pages=block_pages,
                          scale=h**-0.5 if scale is None else scale, window=window, sinks=sinks,
                          head_rows=g)
  scales = () if k_scales is None else (k_scales, v_scales)
  out = on_target(build, pack_rows(q.reshape(b, kv_heads, g, h), c), k_pages, v_pages,
                  lengths.astype(jnp.int32), page_table.astype(jnp.int32), *scales,
                  backend=backend, interpret=interpret)
  return unpack_rows(out, c).reshape(b, n, h).astype(q.dtype)
