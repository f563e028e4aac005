"""The specification of block_sparse_attention in plain jnp: same signature, same semantics
(the mask is rebuilt from the block metadata; rows that see no key output zeros). It is also the
XLA fallback."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.masks import MaskInfo


@jax.jit  # one program per shape (eager, each operation compiled apart: several times slower)
def dense_mask(info: MaskInfo) -> jax.Array:
  """(Bm, Hm, T, S) bool from the block metadata; works on traced (dynamic) metadata too."""
  idx, num, part = (jnp.asarray(info.kv_indices), jnp.asarray(info.num_kv),
                    jnp.asarray(info.partial))
  blocks = jnp.asarray(info.blocks) != 0
  bm, hm, nq, width = idx.shape
  nk = info.q_indices.shape[2]
  bq, bk = info.block_q, info.block_kv
  valid = jnp.arange(width)[None, None, None, :] < num[..., None]  # (Bm,Hm,nq,W)
  values = jnp.where((part < 0)[..., None, None], True, blocks[jnp.maximum(part, 0)])
  values = values & valid[..., None, None]  # (Bm,Hm,nq,W,bq,bk)
  grid = jnp.zeros((bm, hm, nq, nk, bq, bk), jnp.bool_)
  bi = jnp.arange(bm)[:, None, None, None]
  hi = jnp.arange(hm)[None, :, None, None]
  qi = jnp.arange(nq)[None, None, :, None]
  grid = grid.at[bi, hi, qi, idx].max(values)  # padding entries repeat an index: OR, not set
  dense = grid.transpose(0, 1, 2, 4, 3, 5).reshape(bm, hm, nq * bq, nk * bk)
  return dense[:, :, :info.shape[0], :info.shape[1]]


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, *,
                                     q_segment_ids: jax.Array | None = None,
                                     kv_segment_ids: jax.Array | None = None,
                                     scale: float | None = None,
                                     interpret: bool | None = None) -> jax.Array:
  del interpret
  b, n, t, h = q.shape
  kv_heads = k.shape[1]
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, kv_heads, n // kv_heads, t, h)
  logits = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = dense_mask(info)  # (Bm, Hm, T, S)
  mask = jnp.broadcast_to(mask, (mask.shape[0], n, t, k.shape[2]))
  mask = mask.reshape(mask.shape[0], kv_heads, n // kv_heads, t, k.shape[2])
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, None, None, :, None] == kv_segment_ids[:, None, None, None, :])
  logits = jnp.where(mask, logits, -jnp.inf)
  seen = jnp.any(mask, axis=-1, keepdims=True)
  probs = jnp.where(seen, jax.nn.softmax(jnp.where(seen, logits, 0.0), axis=-1), 0.0)
  out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, t, h).astype(q.dtype)
