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
