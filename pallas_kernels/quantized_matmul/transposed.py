"""x (M, K) @ W.T for a weight W (N, K) stored as `values` packed along K — (N, K) int8, or
(N, K/2) uint8 holding two int4 per byte (`reference.unpack_int4`'s runs along K) — and `scale`
(N, G), one per group of K / G consecutive elements of a row: a tied embedding table as the
LM head, whose rows are looked up and whose transpose makes the logits.

XLA on a TPU writes such a table out dequantized in every step before the dot, per-channel int4
too (its unpacking is never fused): 1.7 GiB of temporaries for Llama-3.2-1B's int4 table, more
than its bfloat16 table's own bytes. The values lie row-major, K along the lanes, and the
scales (N, G) lie as (G, N) when G is not a multiple of 128 (libtpu 0.0.42.1, v5e and v6e), so
both are read as they lie: a grid over blocks of x's rows and of the table's rows (the last of
each partial: their rows past the arrays give outputs that are dropped), all of K a program, so
that a program's scales are whole columns of (G, N); K is dequantized a chunk at a time in VMEM
(int4 runs unpacked along the lanes, the chunk's scales turned to (rows, groups), rounded as the
reference rounds) and multiplied by x's chunk with the table's rows as the contracted side.

A table whose packed rows are not a multiple of 128 lanes (Qwen2.5-0.5B's 448 bytes) lies N-minor
and XLA copies it to be read here, and scales of G a multiple of 128 are copied to (G, N): still
a fraction of the dequantized table's bytes. Mosaic TPU's only, as `kernel.quantized_matmul`;
off a TPU the model takes the XLA product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul.kernel import (BLOCK_M, LANES, TILE, dequantize_lanes,
                                                    in_order)
from pallas_kernels.quantized_matmul.reference import packed_run

CHUNK = 1 << 18  # elements of a chunk of the table's rows, at most, as dequantized in VMEM
VMEM = 12 << 20  # bytes a program's tiles may take (v5e's scoped VMEM is 16 MiB), as estimated


def _vmem(bm: int, block_n: int, k: int, chunk: int, per_byte: int) -> int:
  """A program's VMEM bytes, estimated: its values, x (float32 at most) and output tiles
  double-buffered, and a chunk's integer, float and rounded copies as it is dequantized."""
  return 2 * block_n * k // per_byte + 8 * bm * k + 8 * bm * block_n + 20 * chunk * block_n


def _blocks(k: int, n: int, groups: int, bits: int, run: int) -> tuple[int, int, int] | None:
  """(chunk, block_n, most rows of x per program), or None. chunk: a multiple of 128 lanes of
  values (and of an int4 run) that divides K and either divides a group or is a multiple of one
  (of 32 elements), else all of K; block_n: 512, 256 or 128 of the table's rows (all of N where
  fewer) and most rows, the largest whose tiles fit `VMEM`."""
  per_byte = 2 if bits == 4 else 1
  group = k // groups
  chunk = next((c for c in (512, 256) if k % c == 0 and (c // per_byte) % LANES == 0
                and (c // per_byte) % run == 0
                and (group % c == 0 or c % group == 0 and group % 32 == 0)), k)
  if (k // per_byte) % run or groups > 1 and group % 32 and chunk == k:
    return None
  most = max(8, min(BLOCK_M, TILE // k // 8 * 8))
  for block_n in (512, 256, 128):
    block_n = min(n, block_n)
    rows = next((m for m in range(most, 7, -8)
                 if _vmem(m, block_n, k, chunk, per_byte) <= VMEM), None)
    if chunk * block_n <= CHUNK and rows is not None:
      return chunk, block_n, rows
  return None


def fits_t(k: int, n: int, groups: int, bits: int, run: int | None = None) -> bool:
  """Whether `quantized_matmul_t` takes an (N, K) table with `groups` scales a row and
  `bits`-bit values (int4: in packed runs of `run` bytes, None: `packed_run`'s of K / 2)."""
  if bits not in (4, 8) or groups < 1 or k % groups or bits == 4 and k % 2:
    return False
  return _blocks(k, n, groups, bits, (run or packed_run(k // 2)) if bits == 4 else 1) is not None


def _kernel(x_ref, w_ref, s_ref, out_ref, *, bits: int, run: int, group: int, chunk: int):
  per_byte = 2 if bits == 4 else 1
  lanes = min(group, chunk)  # a chunk's lanes under one scale row
  acc = jnp.zeros(out_ref.shape, jnp.float32)
  for c in range(x_ref.shape[1] // chunk):
    v = w_ref[:, c * chunk // per_byte:(c + 1) * chunk // per_byte].astype(jnp.int32)
    if bits == 4:  # K in order
      v = in_order(v, run, axis=1)
    first = c * chunk // group
    s = s_ref[first:first + max(1, chunk // group), :].astype(jnp.float32).T
    w = dequantize_lanes(v, s, lanes, s_ref.dtype, x_ref.dtype)
    acc += jax.lax.dot_general(x_ref[:, c * chunk:(c + 1) * chunk], w,
                               (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  out_ref[...] = acc.astype(out_ref.dtype)


def quantized_matmul_t(x: jax.Array, values: jax.Array, scale: jax.Array, *, bits: int,
                       run: int | None = None, interpret=False, block_m: int | None = None,
                       out_dtype=None) -> jax.Array:
  """x (M, K) @ W.T -> (M, N) in out_dtype (None: x's; accumulated in float32), W the (N, K)
  weight `values` (packed along K) and `scale` (N, G) stand for, by the Mosaic TPU kernel
  (`fits_t` must hold). run: int4's packed run along K (None: `packed_run` of K / 2);
  `interpret` (True or a `pltpu.InterpretParams`): jax's TPU interpret mode, wherever this
  runs. Off a TPU, callers use `reference.quantized_matmul_t_reference`."""
  m, k = x.shape
  n, groups = scale.shape if scale.ndim == 2 else (None, None)
  expect = ((n, k // 2), jnp.uint8) if bits == 4 else ((n, k), jnp.int8)
  if n is None or (values.shape, values.dtype) != expect:
    raise ValueError(f"quantized_matmul_t: {bits}-bit values for x {x.shape} take scale (N, G) "
                     f"and values {expect[0]} {jnp.dtype(expect[1]).name}; got scale "
                     f"{scale.shape}, values {values.shape} {values.dtype}")
  run = (run or packed_run(values.shape[1])) if bits == 4 else 1
  if not fits_t(k, n, groups, bits, run):
    raise ValueError(f"quantized_matmul_t: no TPU tile fits an ({n}, {k}) table with {groups} "
                     f"scales a row; use quantized_matmul_t_reference")
  chunk, block_n, most = _blocks(k, n, groups, bits, run)
  bm = block_m or (m if m <= most else most)
  return pl.pallas_call(
      functools.partial(_kernel, bits=bits, run=run, group=k // groups, chunk=chunk),
      grid=(pl.cdiv(m, bm), pl.cdiv(n, block_n)),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((block_n, values.shape[1]), lambda i, j: (j, 0)),
                pl.BlockSpec((groups, block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype or x.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
  )(x, values, scale.T)
