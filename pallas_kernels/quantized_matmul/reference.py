"""quantized_matmul's specification in plain jnp (same signature): unpack, dequantize the whole
weight in the scales' dtype, then one dot. Also the path off a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nibbles(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed int4 bytes (as int32) -> their low and high four bits as two's-complement values."""
  return ((v & 15) ^ 8) - 8, (((v >> 4) & 15) ^ 8) - 8


def unpack_int4(packed: jax.Array) -> jax.Array:
  """(K, N/2) uint8 -> (K, N) int8: byte j holds column j in its low four bits and column
  N/2 + j in its high four (jaxinfer.quant.ops.pack's layout for 4 bits)."""
  return jnp.concatenate(nibbles(packed.astype(jnp.int32)), axis=-1).astype(jnp.int8)


def dequantized(values: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """The weight (K, N) in the scales' dtype: each value times the scale of its group of rows."""
  w = unpack_int4(values) if bits == 4 else values
  groups, n = scale.shape
  k = w.shape[0]
  w = w.reshape(groups, k // groups, n).astype(scale.dtype) * scale[:, None, :]
  return w.reshape(k, n)


def quantized_matmul_reference(x: jax.Array, values: jax.Array, scale: jax.Array, *, bits: int,
                               interpret=None, block_m: int | None = None,
                               block_n: int | None = None) -> jax.Array:
  del interpret, block_m, block_n
  return jnp.dot(x, dequantized(values, scale, bits).astype(x.dtype))
