"""What every kernel shares: the mask value, interpret-mode defaults, backend compiler params."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve_interpret(interpret: bool | None) -> bool:
  """None: interpret on CPU (no Pallas backend there), compile on GPU and TPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return interpret


def compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Backend compiler parameters; None lets Pallas choose (CPU interpret, TPU)."""
  if jax.default_backend() != "gpu":
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def merge_splits(o: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
  """Combines split-K partial results o (..., C, rows, H) by their log-sum-exps lse
  (..., C, rows) along the split axis; a split that saw no key (lse = -inf) weighs 0."""
  total = jax.nn.logsumexp(lse, axis=axis, keepdims=True)
  weights = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)),
                      0.0)
  return jnp.sum(weights[..., None] * o, axis=axis)
