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

from pallas_kernels.common import (compiler_params, merge_splits, resolve_interpret,
                                   softmax_finish, softmax_init, split_pages, walk_pages,
                                   walk_sinks_and_window)

def _kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, page_size,
            pages_per_split, window, sinks):
  q = q_ref[...]
  rows, h = q.shape
  length = len_ref[0]
  first, last = split_pages(length, page_size, pt_ref.shape[0], pages_per_split)

  def visible(pos):
    vis = pos < length
    if window is not None:
      vis &= (pos >= length - window) | (pos < sinks)
    return vis

  walk = functools.partial(walk_pages, q, k_ref, v_ref, pt_ref, visible_fn=visible, scale=scale,
                           page_size=page_size)
  carry = walk_sinks_and_window(walk, first, last, softmax_init(rows, h), page_size=page_size,
                                sinks=sinks,
                                window_start=None if window is None else length - window)
  o_ref[...], lse_ref[...] = softmax_finish(carry)


def default_num_splits(batch: int, kv_heads: int, max_pages: int, target: int = 256) -> int:
  """Enough programs to fill a large GPU (~2 per SM) without splitting a sequence too finely."""
  return max(1, min(max_pages, -(-target // max(1, batch * kv_heads))))


def _check(q, k_pages, v_pages, lengths, page_table):
  if q.ndim != 3 or k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
    raise ValueError(f"paged_attention: expected q (B,N,H) and pages (K,P,ps,H), got {q.shape}, "
                     f"{k_pages.shape}, {v_pages.shape}")
  b, n, h = q.shape
  if k_pages.shape[3] != h or n % k_pages.shape[0]:
    raise ValueError(f"paged_attention: q {q.shape} does not fit pages {k_pages.shape}")
  if lengths.shape != (b,) or page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"paged_attention: lengths {lengths.shape} / page_table {page_table.shape} "
                     f"do not match batch {b}")


@functools.partial(jax.jit, static_argnames=("window", "sinks", "num_splits", "scale",
                                             "interpret", "min_rows"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_table: jax.Array, *, window: int | None = None, sinks: int = 0,
                    num_splits: int | None = None, scale: float | None = None,
                    interpret: bool | None = None, min_rows: int | None = None) -> jax.Array:
  """q (B,N,H) one token per sequence; keys at positions < lengths[b] are visible (and, with a
  sliding window, >= lengths[b] - window or < sinks), position p living in page
  page_table[b, p // ps] at offset p % ps. Returns (B,N,H)."""
  _check(q, k_pages, v_pages, lengths, page_table)
  b, n, h = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  g = n // kv_heads
  max_pages = page_table.shape[1]
  splits = num_splits or default_num_splits(b, kv_heads, max_pages)
  per_split = -(-max_pages // splits)
  scale = h**-0.5 if scale is None else scale
  if min_rows is None:
    min_rows = 16 if jax.default_backend() == "gpu" else 1  # Triton's smallest matmul
  rows = max(g, min_rows)
  qg = q.reshape(b, kv_heads, g, h)
  if rows > g:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
  kernel = functools.partial(_kernel, scale=scale, page_size=page_size,
                             pages_per_split=per_split, window=window, sinks=sinks)
  pool = pl.BlockSpec((None,) + k_pages.shape[1:], lambda bi, ki, si: (ki, 0, 0, 0))
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, splits),
      in_specs=[pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, max_pages), lambda bi, ki, si: (bi, 0)),
                pl.BlockSpec((None, None, rows, h), lambda bi, ki, si: (bi, ki, 0, 0)),
                pool, pool],
      out_specs=[pl.BlockSpec((None, None, None, rows, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda bi, ki, si: (bi, ki, si, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, rows), jnp.float32)],
      interpret=resolve_interpret(interpret), compiler_params=compiler_params(),
      name="paged_decode_attention",
  )(lengths.astype(jnp.int32)[:, None], page_table.astype(jnp.int32), qg, k_pages, v_pages)
  out = merge_splits(o, lse, axis=2)[:, :, :g]
  return out.reshape(b, n, h).astype(q.dtype)
