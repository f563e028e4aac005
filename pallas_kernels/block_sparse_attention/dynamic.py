"""Dynamic (input-dependent) sparsity patterns, built inside jit with no host round trip:
MInference's per-block top-k from pooled Q·K and its vertical-slash pattern, at block granularity.

B batch, N q heads, K kv heads, T = S sequence length, H head dim, b block size, nb = T / b.
Both produce a `MaskInfo` whose metadata is per batch and per head, for causal self-attention
(prefill) with square blocks: selected blocks strictly below the diagonal are FULL, diagonal
blocks are causal (the one stored partial block). A selected block is computed densely, so the
block-granular pattern is a superset of the element-level pattern it approximates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.masks import MaskInfo


def _compact(selected: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """selected (B,N,n,m) bool -> ascending indices (B,N,n,width) padded by repeating the last
  valid one, and counts (B,N,n)."""
  order = jnp.argsort(~selected, axis=-1, stable=True)[..., :width].astype(jnp.int32)
  num = jnp.minimum(selected.sum(-1), width).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(num - 1, 0)[..., None], axis=-1)
  valid = jnp.arange(width)[None, None, None, :] < num[..., None]
  return jnp.where(valid, order, last), num


def _info_from_blocks(selected: jax.Array, block: int, seq_len: int, width: int) -> MaskInfo:
  """selected (B,N,nb,nb) causal block pattern -> MaskInfo (diagonal blocks partial)."""
  nb = selected.shape[-1]
  eye = jnp.eye(nb, dtype=jnp.bool_)
  selected = (selected & jnp.tril(jnp.ones((nb, nb), jnp.bool_))) | eye  # a row sees itself
  kv_idx, num_kv = _compact(selected, width)
  q_idx, num_q = _compact(jnp.swapaxes(selected, -1, -2), nb)
  rows = jnp.arange(nb)[None, None, :, None]
  partial = jnp.where(kv_idx == rows, 0, -1).astype(jnp.int32)
  partial_t = jnp.where(q_idx == rows, 0, -1).astype(jnp.int32)
  tril = np.tril(np.ones((block, block), bool))[None]
  return MaskInfo(kv_indices=kv_idx, num_kv=num_kv, partial=partial, q_indices=q_idx,
                  num_q=num_q, partial_t=partial_t, blocks=jnp.asarray(tril),
                  shape=(seq_len, seq_len), block_q=block, block_kv=block)


def _check(q, k, block):
  b, n, t, h = q.shape
  if k.shape[2] != t:
    raise ValueError(f"dynamic masks are for self-attention prefill: q len {t} != kv len "
                     f"{k.shape[2]}")
  if t % block:
    raise ValueError(f"dynamic masks: sequence length {t} must be a multiple of block {block}")
  return b, n, t, h, k.shape[1]


def _real(b: int, t: int, lengths: jax.Array | None) -> jax.Array:
  """(B,T) bool: the tokens of each row before its length (all without lengths)."""
  if lengths is None:
    return jnp.ones((b, t), jnp.bool_)
  return jnp.arange(t)[None, :] < lengths[:, None]


def block_topk_mask_info(q: jax.Array, k: jax.Array, block: int, top_k: int,
                         num_sink_blocks: int = 1, num_local_blocks: int = 1,
                         lengths: jax.Array | None = None) -> MaskInfo:
  """MInference's block-sparse pattern: per q block, the `top_k` kv blocks with the largest
  mean-pooled q·k score, plus the first `num_sink_blocks` and the `num_local_blocks` nearest.
  lengths (B,): each row's tokens before it are real, padding after it; blocks pool only real
  tokens, so the pattern over a row's real blocks does not depend on its padding."""
  b, n, t, h, kv_heads = _check(q, k, block)
  nb = t // block
  real = _real(b, t, lengths).reshape(b, 1, nb, block, 1)

  def pool(x, heads):
    x = jnp.where(real, x.astype(jnp.float32).reshape(b, heads, nb, block, h), 0.0)
    return x.sum(3) / jnp.maximum(real.sum(3), 1)

  qp, kp = pool(q, n), pool(k, kv_heads)
  kp = jnp.repeat(kp, n // kv_heads, axis=1)
  scores = jnp.einsum("bnqh,bnkh->bnqk", qp, kp)
  qi, ki = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  causal = ki <= qi
  forced = causal & ((ki < num_sink_blocks) | (ki > qi - num_local_blocks))
  scores = jnp.where(causal & ~forced, scores, -jnp.inf)
  k_eff = min(top_k, nb)
  top = jax.lax.top_k(scores, k_eff)[1]  # (B,N,nb,k_eff)
  picked = jnp.zeros((b, n, nb, nb), jnp.bool_)
  picked = picked.at[jnp.arange(b)[:, None, None, None], jnp.arange(n)[None, :, None, None],
                     jnp.arange(nb)[None, None, :, None], top].set(True)
  picked &= jnp.isfinite(scores)  # top_k may have filled with masked entries
  # (the diagonal block is always kept, `_info_from_blocks`: one more where no local block is
  # asked for, else it was cut off the end of a full row)
  width = min(nb, k_eff + num_sink_blocks + max(num_local_blocks, 1))
  return _info_from_blocks(jax.lax.stop_gradient(picked | forced), block, t, width)


def vertical_slash_mask_info(q: jax.Array, k: jax.Array, block: int, num_vertical: int,
                             num_slash: int, last_q: int = 64,
                             lengths: jax.Array | None = None) -> MaskInfo:
  """MInference's vertical-slash pattern at block granularity: attention of the last `last_q`
  queries estimates the most-attended key columns (vertical) and query-key offsets (slash); a
  block is active if a selected column or diagonal passes through it. lengths (B,): each row's
  tokens before it are real, padding after it; the estimate reads the last real queries."""
  b, n, t, h, kv_heads = _check(q, k, block)
  nb = t // block
  last_q = min(last_q, t)
  end = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
  q_pos = end[:, None] - last_q + jnp.arange(last_q)[None, :]  # (B,last_q); < 0: none
  ql = jnp.take_along_axis(q.astype(jnp.float32), jnp.maximum(q_pos, 0)[:, None, :, None],
                           axis=2)
  kf = jnp.repeat(k.astype(jnp.float32), n // kv_heads, axis=1)
  logits = jnp.einsum("bnqh,bnkh->bnqk", ql, kf) * h**-0.5
  q_pos = q_pos[:, None, :, None]
  k_pos = jnp.arange(t)[None, None, None, :]
  logits = jnp.where(k_pos <= q_pos, logits, -jnp.inf)
  probs = jnp.where(q_pos >= 0, jax.nn.softmax(logits, axis=-1), 0.0)  # (B,N,last_q,T)
  vertical = probs.sum(axis=2)  # per key column
  offsets = jnp.broadcast_to(q_pos - k_pos, probs.shape)  # q - k >= 0 where visible
  slash = jnp.zeros((b, n, t), jnp.float32).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(n)[None, :, None, None],
      jnp.clip(offsets, 0, t - 1)].add(jnp.where(offsets >= 0, probs, 0.0))
  cols = jax.lax.top_k(vertical, min(num_vertical, t))[1]
  diags = jax.lax.top_k(slash, min(num_slash, t))[1]
  bi, ni = jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None]
  col_sel = jnp.zeros((b, n, t), jnp.bool_).at[bi, ni, cols].set(True)
  diag_sel = jnp.zeros((b, n, t), jnp.bool_).at[bi, ni, diags].set(True)
  col_blocks = col_sel.reshape(b, n, nb, block).any(-1)  # (B,N,nb) kv blocks with a column
  # Offset d passes through blocks with qb - kb = delta iff (delta-1)*b < d < (delta+1)*b.
  count = jnp.concatenate([jnp.zeros((b, n, 1), jnp.int32),
                           jnp.cumsum(diag_sel.astype(jnp.int32), -1)], -1)
  delta = jnp.arange(nb)
  hi = jnp.minimum((delta + 1) * block - 1, t - 1)
  lo = jnp.maximum((delta - 1) * block + 1, 0)
  delta_on = (count[..., hi + 1] - count[..., lo]) > 0  # (B,N,nb)
  qi, ki = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
  d_idx = jnp.clip(qi - ki, 0, nb - 1)
  selected = col_blocks[:, :, None, :] | delta_on[:, :, d_idx]
  return _info_from_blocks(jax.lax.stop_gradient(selected), block, t, nb)
