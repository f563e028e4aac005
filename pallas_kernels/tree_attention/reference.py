"""tree_attention's specification in plain jnp (same signature), and the tree masks it takes.

B sequences, T tree tokens each, N q heads, K kv heads, H head dim, W = ceil(T / 32) mask words.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import unpack_heads
from pallas_kernels.paged_attention.reference import dequantize_pages, gather_pages


def ancestor_matrix(parents: jax.Array) -> jax.Array:
  """parents (..., T) (-1 for a root) -> (..., T, T) bool: [t, j] iff j is t or an ancestor.
  Works inside jit; a node's parent need not have a smaller index."""
  t = parents.shape[-1]
  eye = jnp.eye(t, dtype=bool)
  onehot_parent = jax.nn.one_hot(parents, t, dtype=jnp.int32)  # (..., T, T); a root's row is 0
  anc = eye | onehot_parent.astype(bool)
  for _ in range(max(1, (t - 1).bit_length())):  # pointer doubling: paths of length 2^k
    anc = anc | (jnp.einsum("...tj,...jk->...tk", anc.astype(jnp.int32),
                            anc.astype(jnp.int32)) > 0)
  return anc


def pack_ancestors(parents: jax.Array) -> jax.Array:
  """parents (..., T) -> (..., T, W) int32: bit j % 32 of word j // 32 of row t is set iff node
  j is t itself or one of its ancestors (the packed tree mask the kernel reads)."""
  anc = ancestor_matrix(parents)
  t = parents.shape[-1]
  w = -(-t // 32)
  anc = jnp.pad(anc, [(0, 0)] * (anc.ndim - 1) + [(0, 32 * w - t)])
  bits = anc.reshape(anc.shape[:-1] + (w, 32)).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(bits.sum(-1, dtype=jnp.uint32), jnp.int32)


def unpack_ancestors(words: jax.Array, t: int) -> jax.Array:
  """The inverse of pack_ancestors: (..., T, W) int32 -> (..., T, T) bool."""
  u = jax.lax.bitcast_convert_type(words, jnp.uint32)
  bits = (u[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  return bits.reshape(words.shape[:-1] + (-1,))[..., :t].astype(bool)


def tree_depths(tree_mask: jax.Array) -> jax.Array:
  """(B, T) int32: each tree token's depth (the root's is 0), from its packed ancestor bits."""
  return unpack_ancestors(tree_mask, tree_mask.shape[1]).sum(-1, dtype=jnp.int32) - 1


def check_window(window: int | None, tree_size: int, sinks: int = 0) -> None:
  """A sliding window must hold a whole tree path: then it only ever hides prefix keys."""
  if window is not None and window < tree_size:
    raise ValueError(f"tree_attention: a sliding window of {window} is smaller than the tree "
                     f"({tree_size} tokens)")
  if sinks < 0 or (sinks and window is None):
    raise ValueError(f"tree_attention: sinks ({sinks}) need a sliding window and must be >= 0")


def tree_visibility(prefix_len: jax.Array, tree_mask: jax.Array, num_keys: int,
                    window: int | None = None, sinks: int = 0) -> jax.Array:
  """(B, T, S) bool: tree token t sees cache position s iff s < prefix_len, or s holds a tree
  token (prefix_len <= s < prefix_len + T) that is t or an ancestor of t. With a sliding
  `window` (>= T), a prefix position s is seen only if s > prefix_len + depth(t) - window (t's
  position is prefix_len + depth(t)) or s < sinks; ancestors are always within it."""
  t = tree_mask.shape[1]
  anc = unpack_ancestors(tree_mask, t)  # (B,T,T)
  pos = jnp.arange(num_keys)[None, :]
  rel = pos - prefix_len[:, None]  # (B,S)
  in_tree = (rel >= 0) & (rel < t)
  tree_bit = jnp.take_along_axis(anc, jnp.clip(rel, 0, t - 1)[:, None, :].repeat(t, 1), axis=2)
  prefix = jnp.broadcast_to((pos < prefix_len[:, None])[:, None, :], tree_bit.shape)
  if window is not None:
    q_pos = prefix_len[:, None] + tree_depths(tree_mask)  # (B,T)
    recent = pos[:, None, :] > q_pos[:, :, None] - window
    prefix = prefix & ((recent | (pos[:, None, :] < sinks)) if sinks else recent)
  return prefix | (in_tree[:, None, :] & tree_bit)


@functools.partial(jax.jit, static_argnames=("window", "sinks", "num_splits", "scale", "backend",
                                             "interpret", "min_rows", "block_pages"))
def tree_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                             prefix_len: jax.Array, page_table: jax.Array, tree_mask: jax.Array,
                             k_scales: jax.Array | None = None,
                             v_scales: jax.Array | None = None, *, window: int | None = None,
                             sinks: int = 0,
                             num_splits: int | None = None, scale: float | None = None,
                             backend: str | None = None, interpret: bool | None = None,
                             min_rows: int | None = None,
                             block_pages: int | None = None) -> jax.Array:
  del num_splits, backend, interpret, min_rows, block_pages
  b, t, n, h = q.shape
  check_window(window, t, sinks)
  scale = h**-0.5 if scale is None else scale
  k_pages = dequantize_pages(unpack_heads(k_pages, h), k_scales, q.dtype)
  v_pages = dequantize_pages(unpack_heads(v_pages, h), v_scales, q.dtype)
  kv_heads = k_pages.shape[0]
  k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)  # (B,K,S,H)
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  # (operands widened to float32 after any rounding: exact, and XLA:CPU has no bfloat16 x
  # bfloat16 -> float32 product at these sizes)
  f32 = lambda x: x.astype(jnp.float32)
  logits = jnp.einsum("btkgh,bksh->bkgts", f32(qg), f32(k)) * scale
  visible = tree_visibility(prefix_len, tree_mask, k.shape[2], window, sinks)  # (B,T,S)
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)  # a tree token always sees itself
  v = jnp.where(visible.any(1)[:, None, :, None], v, jnp.zeros_like(v))  # unwritten: maybe NaN
  out = jnp.einsum("bkgts,bksh->btkgh", f32(probs.astype(v.dtype)), f32(v))
  return out.reshape(b, t, n, h).astype(q.dtype)
