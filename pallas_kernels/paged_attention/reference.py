"""paged_attention's specification in plain jnp (same signature): gather each sequence's pages,
then ordinary attention over its first `lengths[b]` positions. Also the XLA fallback."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import scale_grid, unpack_heads


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """pages (K,P,ps,H), page_table (B,M) -> (B,K,M*ps,H), each sequence's cache in order."""
  kv_heads, _, ps, h = pages.shape
  b, m = page_table.shape
  seq = pages[:, page_table]  # (K,B,M,ps,H)
  return seq.transpose(1, 0, 2, 3, 4).reshape(b, kv_heads, m * ps, h)


def dequantize_pages(pages: jax.Array, scales: jax.Array | None, dtype) -> jax.Array:
  """int8 pages (K,P,ps,H) (one kv head a row: common.unpack_heads) times their scales (rows,
  common.check_scales), in `dtype`; other pages as they are."""
  if scales is None:
    return pages
  grid = scale_grid(scales, pages.shape[1], pages.shape[2])
  return (pages.astype(jnp.float32) * grid[..., None]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("window", "sinks", "num_splits", "scale", "backend",
                                             "interpret", "min_rows", "block_pages"))
def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              lengths: jax.Array, page_table: jax.Array,
                              k_scales: jax.Array | None = None,
                              v_scales: jax.Array | None = None, *,
                              window: int | None = None, sinks: int = 0,
                              num_splits: int | None = None,
                              scale: float | None = None,
                              backend: str | None = None, interpret: bool | None = None,
                              min_rows: int | None = None,
                              block_pages: int | None = None) -> jax.Array:
  del num_splits, backend, interpret, min_rows, block_pages
  b, n, h = q.shape
  scale = h**-0.5 if scale is None else scale
  k_pages = dequantize_pages(unpack_heads(k_pages, h), k_scales, q.dtype)
  v_pages = dequantize_pages(unpack_heads(v_pages, h), v_scales, q.dtype)
  kv_heads = k_pages.shape[0]
  k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)
  qg = q.reshape(b, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
  pos = jnp.arange(k.shape[2])[None, :]
  visible = pos < lengths[:, None]  # (B,S)
  if window is not None:
    visible &= (pos >= lengths[:, None] - window) | (pos < sinks)
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  any_ = jnp.any(visible, axis=-1)[:, None, None, None]
  probs = jnp.where(any_, jax.nn.softmax(jnp.where(any_, logits, 0.0), axis=-1), 0.0)
  v = jnp.where(visible[:, None, :, None], v, jnp.zeros_like(v))  # unwritten slots may be NaN
  out = jnp.einsum("bkgs,bksh->bkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(q.dtype)
