"""quantized_matmul's specification in plain jnp (same signature): unpack, dequantize the whole
weight in the scales' dtype, then one dot. Also the path off a TPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def nibbles(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed int4 bytes (as int32) -> their low and high four bits as two's-complement values."""
  return ((v & 15) ^ 8) - 8, (((v >> 4) & 15) ^ 8) - 8


RUN = 128  # most words in one run of a packed block
SPLITS = 8  # a long last axis splits this many ways into whole blocks


def packed_run(words: int) -> int:
  """Words per run of a packed last axis of `words` words (jaxinfer.quant.ops.pack's layout;
  for int4 a word is a byte, a packed column): the largest power of two up to RUN that divides
  it, or, for an axis of at least SPLITS runs of RUN whose words divide by SPLITS, that divides
  a SPLITS-th of it, so that the axis split 2, 4 or 8 ways leaves every shard whole blocks (Llama-3's LM head, 128,256
  int4 columns: runs of 16 bytes, 4,008 blocks; runs of 128 made 501, which 8 shards split)."""
  if words >= SPLITS * RUN and words % SPLITS == 0:
    return math.gcd(words // SPLITS, RUN)
  return math.gcd(words, RUN)


def unpack_int4(packed: jax.Array, run: int | None = None) -> jax.Array:
  """(K, N/2) uint8 -> (K, N) int8, in blocks of 2 * `run` columns: byte j of a block's `run`
  bytes holds its column j in the low four bits and column run + j in the high four
  (jaxinfer.quant.ops.pack's layout for 4 bits). run: that of the weight's own last axis
  (None: `packed_run`, as for a two-axis weight)."""
  k, cols = packed.shape
  run = run or packed_run(cols)
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
                               block_n: int | None = None, out_dtype=None) -> jax.Array:
  """values (K, H, W) and scale (G, H, D), a weight in heads, give (M, H, D): flattened, each
  head's runs kept (run: the last axis's)."""
  del interpret, block_m, block_n
  if values.ndim == 3:
    run = run or packed_run(values.shape[-1])
    y = quantized_matmul_reference(x, values.reshape(values.shape[0], -1),
                                   scale.reshape(scale.shape[0], -1), bits=bits, run=run,
                                   out_dtype=out_dtype)
    return y.reshape(x.shape[:1] + scale.shape[1:])
  return jnp.dot(x, dequantized(values, scale, bits, run).astype(x.dtype),
                 preferred_element_type=out_dtype)


def quantized_matmul_t_reference(x: jax.Array, values: jax.Array, scale: jax.Array, *,
                                 bits: int, run: int | None = None, interpret=None,
                                 block_m: int | None = None, out_dtype=None) -> jax.Array:
  """`transposed.quantized_matmul_t`'s specification: values (N, K) packed along K and scale
  (N, G), x @ W.T with W dequantized as stored (the model's XLA product of a tied table)."""
  del interpret, block_m
  w = unpack_int4(values, run) if bits == 4 else values  # (N, K), unpacked along K
  n, groups = scale.shape
  w = (w.reshape(n, groups, -1).astype(scale.dtype) * scale[:, :, None]).reshape(n, -1)
  return jnp.einsum("mk,nk->mn", x, w.astype(x.dtype), preferred_element_type=out_dtype)
