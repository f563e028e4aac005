"""Tree-verification attention over a paged KV cache, as a Pallas kernel.

B sequences, T tree tokens per sequence (a chain is a tree), N q heads, K kv heads, G = N // K,
H head dim, P pages of ps positions, M pages per sequence, W mask words, C splits.

Each sequence's committed prefix occupies positions [0, L) of its pages and its draft tree's K/V
have been written at positions [L, L + T) (node j at L + j). Tree token t sees the whole prefix
and, among the tree positions, only itself and its ancestors (bit j of its packed mask). One
program per (sequence, kv head, split): the T tree tokens times the G query heads sharing the kv
head are the rows of one (T*G, H) x (H, ps) matmul per page, so each page is read once for the
whole tree; splits walk disjoint page ranges (FlashDecoding) and are merged by log-sum-exp.

With a sliding window (at least T), tree token t at position L + depth(t) sees prefix positions
> L + depth(t) - window only (its ancestors always), plus the first `sinks` positions
(StreamingLLM's attention sinks); pages holding neither are not read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (check_heads, check_scales, gpu_rows, merge_splits,
                                   on_target, pack_rows, pow2, scale_grid,
                                   scale_kwargs, softmax_finish, softmax_init, split_pages,
                                   triton_params, unpack_rows, walk_pages,
                                   walk_sinks_and_window)
from pallas_kernels.paged_attention.kernel import page_walk_forms
from pallas_kernels.paged_attention.tpu import paged_rows_attention, sublanes
from pallas_kernels.tree_attention.reference import check_window, tree_depths

def _visible(tree_size, window, sinks):
  """visible(pos (1,bk), end, words (rows, W), depth (rows, 1)) -> (rows, bk): the prefix
  (within the window, or among the sinks) and the row's own tree ancestors (its mask bits).
  words and depth are refs: a word is loaded by a ref slice (Triton cannot slice values)."""
  def visible(pos, end, words, depth):
    prefix = end - tree_size
    rel = pos - prefix
    in_tree = (rel >= 0) & (rel < tree_size)
    relc = jnp.clip(rel, 0, tree_size - 1)
    bit = jnp.zeros((words.shape[0], pos.shape[1]), jnp.int32)
    for w in range(words.shape[1]):  # the word holding each column's bit
      shifted = words[:, w:w + 1] >> (relc & 31)  # bit 31 is read after & 1
      bit = jnp.where((relc >> 5) == w, shifted & 1, bit)
    seen = pos < prefix
    if window is not None:
      recent = pos > prefix + depth[...] - window  # each row's depth
      seen &= (recent | (pos < sinks)) if sinks else recent
    return seen | (in_tree & (bit == 1))
  return visible


def _kernel(len_ref, pt_ref, mask_ref, depth_ref, q_ref, k_ref, v_ref, *refs, scale, page_size,
            pages_per_split, tree_size, window, sinks, head_rows):
  *scale_refs, o_ref, lse_ref = refs  # (ks_ref, vs_ref) with int8 pools
  q = q_ref[...]
  rows, h = q.shape
  prefix = len_ref[0]
  first, last = split_pages(prefix + tree_size, page_size, pt_ref.shape[0], pages_per_split)
  visible = functools.partial(_visible(tree_size, window, sinks), end=prefix + tree_size,
                              words=mask_ref, depth=depth_ref)
  walk = functools.partial(walk_pages, q, k_ref, v_ref, pt_ref, visible_fn=visible,
                           head=pl.program_id(1), scale=scale, page_size=page_size,
                           head_rows=head_rows, **scale_kwargs(scale_refs))
  # the root (depth 0) sees the earliest prefix position
  carry = walk_sinks_and_window(walk, first, last, softmax_init(rows, h), page_size=page_size,
                                sinks=sinks,
                                window_start=None if window is None else prefix - window + 1)
  o_ref[...], lse_ref[...] = softmax_finish(carry)


def _check(q, k_pages, v_pages, prefix_len, page_table, tree_mask, k_scales, v_scales):
  if q.ndim != 4 or k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
    raise ValueError(f"tree_attention: expected q (B,T,N,H) and pages (K/c,P,ps,c*H), got "
                     f"{q.shape}, {k_pages.shape}, {v_pages.shape}")
  b, t, n, h = q.shape
  c = check_heads("tree_attention", n, h, k_pages.shape)
  if prefix_len.shape != (b,) or page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"tree_attention: prefix_len {prefix_len.shape} / page_table "
                     f"{page_table.shape} do not match batch {b}")
  if tree_mask.shape != (b, t, -(-t // 32)):
    raise ValueError(f"tree_attention: tree_mask must be (B, T, ceil(T/32)) = "
                     f"{(b, t, -(-t // 32))}, got {tree_mask.shape}")
  check_scales("tree_attention", k_pages, k_scales, v_scales, c)
  return c


def _pad_rows(rows, *xs):
  """Pads axis 2 (rows) of q (B,K,R,H) and axis 1 of the per-row inputs (B,R,X) to `rows`."""
  q, *per_row = xs
  r = q.shape[2]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - r), (0, 0)))
  return (q, *(jnp.pad(x, ((0, 0), (0, rows - r), (0, 0))) for x in per_row))


def _gpu_form(qg, k_pages, v_pages, prefix_len, page_table, mask, depth, *scales, scale, splits,
              tree_size, window, sinks, head_rows, min_rows, interpret):
  """The Triton form (what CPU interprets): qg (B,K,T*G,H) -> (B,K,T*G,H) f32. Rows and mask
  words are padded to powers of two when compiled (Triton's array sizes)."""
  b, kv_heads, tg, h = qg.shape
  max_pages = page_table.shape[1]
  rows = gpu_rows(tg, interpret, min_rows)
  words = mask.shape[2] if interpret else pow2(mask.shape[2])
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, words - mask.shape[2])))
  qg, mask, depth = _pad_rows(rows, qg, mask, depth)
  scales = tuple(scale_grid(x, *k_pages.shape[1:3]) for x in scales)  # (K,P,ps): read per page
  kernel = functools.partial(_kernel, scale=scale, page_size=k_pages.shape[2],
                             pages_per_split=-(-max_pages // splits), tree_size=tree_size,
                             window=window, sinks=sinks, head_rows=head_rows)
  pool = pl.BlockSpec(memory_space=pl.ANY)  # read page by page through the page table
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, splits),
      in_specs=[pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, max_pages), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, rows, words), lambda bi, ki, si: (bi, 0, 0)),
                pl.BlockSpec((None, rows, 1), lambda bi, ki, si: (bi, 0, 0)),
                pl.BlockSpec((None, None, rows, h), lambda bi, ki, si: (bi, ki, 0, 0)),
                pool, pool] + [pool] * len(scales),
      out_specs=[pl.BlockSpec((None, None, None, rows, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda bi, ki, si: (bi, ki, si, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32)],
      interpret=interpret, compiler_params=None if interpret else triton_params(),
      name="tree_verify_attention",
  )(prefix_len[:, None], page_table, mask, depth, qg, k_pages, v_pages, *scales)
  return merge_splits(o, lse, axis=2)[:, :, :tg]


def _tpu_form(qg, k_pages, v_pages, prefix_len, page_table, mask, depth, *scales, scale, splits,
              tree_size, window, sinks, head_rows, block_pages, interpret):
  """The Mosaic TPU form (paged_attention/tpu.py); rows padded to a whole sublane tile."""
  tg = qg.shape[2]
  tile = sublanes(qg.dtype)
  qg, mask, depth = _pad_rows(-(-tg // tile) * tile, qg, mask, depth)
  o, lse = paged_rows_attention(
      qg, k_pages, v_pages, prefix_len + tree_size, page_table, (mask, depth),
      _visible(tree_size, window, sinks), scale=scale, num_splits=splits,
      window_lag=None if window is None else window + tree_size - 1, sinks=sinks,
      block_pages=block_pages, scales=scales, head_rows=head_rows, interpret=interpret)
  return merge_splits(o, lse, axis=2)[:, :, :tg]


@functools.partial(jax.jit, static_argnames=("window", "sinks", "num_splits", "scale", "backend",
                                             "interpret", "min_rows", "block_pages"))
def tree_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, prefix_len: jax.Array,
                   page_table: jax.Array, tree_mask: jax.Array, k_scales: jax.Array | None = None,
                   v_scales: jax.Array | None = None, *, window: int | None = None,
                   sinks: int = 0, num_splits: int | None = None, scale: float | None = None,
                   backend: str | None = None, interpret: bool | None = None,
                   min_rows: int | None = None, block_pages: int | None = None) -> jax.Array:
  """q (B,T,N,H): the tree tokens; their keys at positions prefix_len[b] + j (node j) in the
  pages, position p living in page page_table[b, p // ps] at offset p % ps; tree_mask (B,T,W)
  packed ancestor bits (pack_ancestors); window: a sliding window (>= T) over positions, token
  t's being prefix_len + its depth; sinks: with a window, the first positions every token also
  sees. Returns (B,T,N,H).

  The platform being lowered for picks the kernel form (TPU: Mosaic with DMAs; CUDA: Triton;
  CPU: the Triton form interpreted); `backend` / `interpret` force them (common.on_target);
  `block_pages` is the TPU form's pages per DMA block (default: about 256 keys). Pages and
  int8 pools' float32 scale rows `k_scales`, `v_scales` are as in paged_attention (c kv heads a
  row or one)."""
  c = _check(q, k_pages, v_pages, prefix_len, page_table, tree_mask, k_scales, v_scales)
  b, t, n, h = q.shape
  check_window(window, t, sinks)
  kv_heads = k_pages.shape[0] * c
  g = n // kv_heads
  # Row r = t * G + g: tree token t, query head g of the group (of each of a pool row's c heads).
  qg = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
  qg = pack_rows(qg, c)
  mask = jnp.tile(jnp.repeat(tree_mask.astype(jnp.int32), g, axis=1), (1, c, 1))  # (B,c*T*G,W)
  depth = jnp.tile(jnp.repeat(tree_depths(tree_mask), g, axis=1), (1, c))[..., None]
  build = page_walk_forms(_gpu_form, _tpu_form, batch=b, kv_heads=k_pages.shape[0],
                          max_pages=page_table.shape[1], num_splits=num_splits,
                          min_rows=min_rows, block_pages=block_pages,
                          scale=h**-0.5 if scale is None else scale, tree_size=t, window=window,
                          sinks=sinks, head_rows=t * g)
  out = on_target(build, qg, k_pages, v_pages, prefix_len.astype(jnp.int32),
                  page_table.astype(jnp.int32), mask, depth,
                  *(() if k_scales is None else (k_scales, v_scales)), backend=backend,
                  interpret=interpret)
  out = unpack_rows(out, c).reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, n, h).astype(q.dtype)
