"""Attention implementations behind one registry, chosen by `implementation=`.

B batch, T query len, S kv len, N q heads, K kv heads, G = N // K, H head dim.

The mask is given by positions, so one function serves training (keys = the chunk itself),
prefill and decode (keys = the cache slots): key j is visible to query i when
  k_pos[j] <= q_pos[i]  and  k_pos[j] > q_pos[i] - window  and  segments match.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row cannot NaN


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None,
                   q_segment: jax.Array | None = None,
                   k_segment: jax.Array | None = None) -> jax.Array:
  """(B, T, S) bool: which keys each query sees."""
  mask = k_pos[:, None, :] <= q_pos[:, :, None]
  if window is not None:
    mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
  if q_segment is not None:
    mask &= q_segment[:, :, None] == k_segment[:, None, :]
  return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                        k_pos: jax.Array, *, window: int | None = None,
                        q_segment: jax.Array | None = None, k_segment: jax.Array | None = None,
                        scale: float | None = None) -> jax.Array:
  """q (B,T,N,H), k/v (B,S,K,H), q_pos (B,T), k_pos (B,S) -> (B,T,N,H). Softmax in float32."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if n % kv_heads:
    raise ValueError(f"attention: {n} query heads is not a multiple of {kv_heads} kv heads")
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_pos, k_pos, window, q_segment, k_segment)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


AttentionFn = Callable[..., jax.Array]
IMPLEMENTATIONS: dict[str, AttentionFn] = {"xla": attention_reference}


def register(name: str, fn: AttentionFn) -> None:
  IMPLEMENTATIONS[name] = fn


def get(implementation: str) -> AttentionFn:
  try:
    return IMPLEMENTATIONS[implementation]
  except KeyError:
    raise ValueError(f"attention implementation: expected one of {sorted(IMPLEMENTATIONS)}, "
                     f"got {implementation!r}") from None
