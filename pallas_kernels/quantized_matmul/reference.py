"""quantized_matmul's specification in plain jnp (same signature): unpack, dequantize the whole
weight in the scales' dtype, then one dot. Also the path off a TPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def nibbles(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed int4 bytes (as int32) -> their low and high four bits as two's-complement values."""
  return ((v & 15) ^ 8) - 8, (((v >> 4) & 15) ^ 8) - 8


def default_run(cols: int) -> int:
  """The packed run of a two-axis weight of `cols` packed columns: the largest power of two up
  to 128 that divides it."""
  return math.gcd(cols, 128)


def unpack_int4(packed: jax.Array, run: int | None = None) -> jax.Array:
  """(K, N/2) uint8 -> (K, N) int8, in blocks of 2 * `run` columns: byte j of a block's `run`
  bytes holds its column j in the low four bits and column run + j in the high four
  (jaxinfer.quant.ops.pack's layout for 4 bits). run: that of the weight's own last axis
  (None: `default_run`, as for a two-axis weight)."""
  k, cols = packed.shape
  run = run or default_run(cols)
  low, high = nibbles(packed.astype(jnp.int32).reshape(k, cols // run, run))
  return jnp.stack([low, high], axis=-2).reshape(k, 2 * cols).astype(jnp.int8)


def dequantized(values: jax.Array, scale: jax.Array, bits: int, run: int | None = None
                ) -> jax.Array:
  """The weight (K, N) in the scales' dtype: each value times the scale of its group of rows."""
  w = unpack_int4(values, run) if bits == 4 else values
  groups, n = scale.shape
  k = w.shape[0]
  w = w.reshape(groups, k // groups, n).astype(scale.dtype) * scale[:, None, :]
  return w.reshape(k, n)


def quantized_matmul_reference(x: jax.Array, values: jax.Array, scale: jax.Array, *, bits: int,
                               run: int | None = None, interpret=None,
                               block_m: int | None = None,
                               block_n: int | None = None) -> jax.Array:
  del interpret, block_m, block_n
  return jnp.dot(x, dequantized(values, scale, bits, run).astype(x.dtype))
