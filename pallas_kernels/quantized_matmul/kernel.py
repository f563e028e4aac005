"""x (M, K) @ W (K, N) where W is stored as integers and scales: `values` (K, N) int8 (bits=8)
or (K, N/2) uint8 holding two int4 per byte (bits=4; `reference.unpack_int4`'s layout: in
blocks of two runs of columns, which a tile puts back in order in VMEM), and
`scale` (G, N), one row per group of K / G consecutive rows (G = 1: per output channel).

The heads form takes values (K, H, W) and scales (G, H, D), D = W or 2W, and gives (M, H, D),
reading the values as XLA on a TPU lays them out, where flattening them to (K, N) for the form
above was a copy of the weight in every step (320 MiB of a one-chip Llama-3-8B int4 decode
step's temporaries for q, k and v; 700 MiB in int8). Values whose rows are not a multiple of 128
lanes over a K that is lie K-minor (`k_minor`; libtpu 0.0.42.1 for v4, v5e, v5p and v6e), e.g.
q, k and v in int4 ((K, H, 64) bytes) and an int4 LM head split over 2, 4 or 8 chips (H = 1, a
shard's 8,016 packed columns): read as (H, W, K) (that transpose is free), a tile is each
head's (block_w, block_k) rows with K along the lanes, unpacked along the rows, dequantized with
its scales turned to (D, groups) in VMEM, and multiplied into (M, D). Row-major values (int8
heads of 128) are read per head as (block_k, D) tiles, as the form above reads them.

Why a kernel: in a decode step XLA on a TPU writes a weight with grouped scales out whole in
bfloat16 before the dot (measured with libtpu's compile-only client on Llama-3-8B shapes: every
layer's MLP weights in int4 groups of 128, 112 MiB each, among the step's temporaries; per-channel
scales it fuses), so such a weight costs more memory traffic than its bfloat16 original. Here a
(block_k, block_n) tile of values and its scales come into VMEM, are dequantized there and
multiplied, accumulating in float32 over the K blocks; the weight is read once per block of M
rows, as stored.

Both forms are Mosaic TPU's; off a TPU the model takes the XLA product instead
(`jaxinfer.quant.linear`), and the tests run them in jax's TPU interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul.reference import nibbles, packed_run

BLOCK_N = (512, 256, 128)  # lanes of a weight tile, largest first (packed columns for int4)
BLOCK_K = (512, 256, 128)  # rows of a weight tile with per-channel scales, largest first
BLOCK_M = 256  # rows of x per program, at most
TILE = 1 << 20  # at most this many dequantized weight elements, and x elements, per program
MIN_RUN = 16  # fewest packed columns in an int4 run: tiles of shorter runs, put back in column
# order in VMEM, ran out of VMEM (libtpu, v5e: runs of 2-8 at LM-head shapes)
LANES = 128  # a TPU vector register's lanes
HEADS_VALUES = 1 << 21  # bytes of a heads-form tile of values, at most
HEADS_OUT = 1 << 19  # accumulated outputs (rows x heads x D) of a heads-form program, at most
HEADS_MOST = 48  # heads of a heads-form program, at most (its loop over them is unrolled: 64
# heads in groups of 32 needed 24 MiB of scoped VMEM on v5e, over its 16; 48 compiled); more
# heads go in blocks of 32 or 16


def _blocks(k: int, n: int, groups: int, bits: int) -> tuple[int, int] | None:
  """(block_k, block_n) for a (K, N) weight, or None when no tile the TPU takes fits VMEM.
  block_k is x's lanes (a multiple of 128, or all of K); with groups, a tile's scales are a
  multiple of 8 rows (32-bit sublanes) or all of them. block_n divides the columns where a
  width does; otherwise the last tile is partial (its lanes past the weight are read as
  undefined values and their outputs dropped: each output column depends on its own weight
  column alone), as for a weight of 464 packed columns in tiles of 256."""
  cols = n // 2 if bits == 4 else n
  if groups == 1:
    block_k = next((b for b in BLOCK_K if k % b == 0), k)
  else:
    g = k // groups
    block_k = next((b for b in range(8 * g, k, 8 * g) if b % 128 == 0 and k % b == 0), k)
  per_column = block_k * (2 if bits == 4 else 1)  # dequantized elements per packed column
  widths = [b for b in BLOCK_N if b * per_column <= TILE]
  block_n = next((b for b in widths if cols % b == 0),
                 next((b for b in widths if b < cols), None))
  return None if block_n is None else (block_k, block_n)


def _heads_blocks(k: int, heads: int, width: int, groups: int, bits: int,
                  run: int) -> tuple[int, int, int, int] | None:
  """(block_k, block_h, block_w, most rows of x per program) for the heads form of a
  (K, heads, width) weight with `groups` scale rows, or None. Values that lie K-minor
  (`k_minor`): block_h all heads, up to HEADS_MOST, else 32 or 16 of them (the scales' and the
  output's sublanes); block_w all of a head's rows, or, for one head of more than 512, 512 rows,
  the last tile partial (its rows past the weight give output columns that are dropped: 501
  tiles of 64 rows for 32,064 would cost 8 times the grid steps). Row-major values (int8 heads
  of a multiple of 128): block_w all of a head's, block_h all heads or 32 (the values'
  sublanes). block_k: a multiple of 128 lanes that divides K and either divides a group's rows
  (one scale row a tile) or is a multiple of them, which must then be a multiple of 32 (a tile's
  groups are slices of its lanes). A tile of values holds at most HEADS_VALUES bytes (as VMEM
  tiles them: 32 rows of 128 bytes), a program at most HEADS_OUT outputs."""
  per_row = 2 if bits == 4 else 1  # output columns per row of values
  lying_k = k_minor(k, width)
  if not lying_k and (bits != 8 or width % LANES):
    return None
  block_h = heads if heads <= HEADS_MOST else next(
      (b for b in ((32, 16) if lying_k else (32,)) if heads % b == 0), None)
  block_w = width
  if lying_k and heads == 1 and width > 512:  # (a partial last tile rather than small ones)
    block_w = 512
  if block_h is None or block_w % 8 or block_w % run:
    return None
  tile_rows = block_h * -(-block_w // 32) * 32 if lying_k else -(-block_h // 32) * 32 * block_w
  group = k // groups
  for block_k in (512, 256, 128) if lying_k else (128,):  # (row-major: its strided loads
    # unroll per row of a tile; 512 rows took 15 s to compile for 32 heads)
    if (k % block_k == 0 and (group % block_k == 0 or block_k % group == 0 and group % 32 == 0)
        and tile_rows * block_k <= HEADS_VALUES):
      most = HEADS_OUT // (block_h * block_w * per_row) // 8 * 8
      return block_k, block_h, block_w, max(8, min(BLOCK_M, most))
  return None


def fits(k: int, n: int, groups: int, bits: int, run: int | None = None,
         heads: int | None = None) -> bool:
  """Whether the kernel takes a (K, N) weight with `groups` scale rows and `bits`-bit values
  (int4: in packed runs of `run` columns, None: `packed_run`'s of its last axis); heads: in the
  heads form, its N columns split into that many heads (1: a two-axis weight), int4 in runs
  of at least 8 rows (a vector register's sublanes) and lying K-minor."""
  if bits not in (4, 8) or n % 2 or groups < 1 or k % groups:
    return False
  if heads is not None:
    width = n // heads // (2 if bits == 4 else 1)  # a head's rows of values
    run = 1 if bits == 8 else run or packed_run(width)
    return (n % heads == 0 and width % run == 0 and (bits == 8 or run >= 8)
            and _heads_blocks(k, heads, width, groups, bits, run) is not None)
  if bits == 4 and (run or packed_run(n // 2)) < MIN_RUN:
    return False
  return _blocks(k, n, groups, bits) is not None


def k_minor(k: int, width: int) -> bool:
  """Whether XLA on a TPU lays out integer values (K, ..., width) K-minor in HBM: a last axis not
  a multiple of 128 lanes over a K that is (so it pads less; libtpu 0.0.42.1, v4, v5e, v5p and
  v6e alike). The heads form reads such values so, others row-major."""
  return width % LANES != 0 and k % LANES == 0


def _dequantize(v: jax.Array, s: jax.Array, dtype) -> jax.Array:
  """A tile of integer values (bk, bn) times its scales (rows of groups, bn), rounded to `dtype`
  as the reference rounds the whole weight (the product in the scales' dtype)."""
  bk, bn = v.shape
  rows = s.shape[0]
  w = v.astype(jnp.float32).reshape(rows, bk // rows, bn) * s.astype(jnp.float32)[:, None, :]
  return w.astype(s.dtype).astype(dtype).reshape(bk, bn)


def in_order(v: jax.Array, run: int, axis: int) -> jax.Array:
  """A tile's packed int4 bytes (as int32) -> its values in order along `axis`: each run of `run`
  bytes' low nibbles, then its high ones (`reference.unpack_int4`'s blocks)."""
  low, high = nibbles(v)
  take = lambda t, r: jax.lax.slice_in_dim(t, r * run, (r + 1) * run, axis=axis)
  return jnp.concatenate([take(t, r) for r in range(v.shape[axis] // run) for t in (low, high)],
                         axis=axis)


def dequantize_lanes(v: jax.Array, s: jax.Array, lanes: int, scale_dtype, dtype) -> jax.Array:
  """A tile of integer values (rows, K) with K along the lanes times its scales (rows, groups)
  in float32, a group every `lanes` lanes, rounded as `_dequantize` rounds (to the scales'
  dtype, then `dtype`)."""
  w = jnp.concatenate([v[:, i * lanes:(i + 1) * lanes].astype(jnp.float32) * s[:, i:i + 1]
                       for i in range(v.shape[1] // lanes)], axis=1)
  return w.astype(scale_dtype).astype(dtype)


def _kernel(x_ref, w_ref, s_ref, out_ref, acc_ref, *, bits: int, run: int):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  x = x_ref[...]
  v = w_ref[...].astype(jnp.int32)
  if bits == 4:  # the tile's columns in order
    v = in_order(v, run, axis=1)
  acc_ref[...] += jnp.dot(x, _dequantize(v, s_ref[...], x.dtype),
                          preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _heads_kernel(x_ref, w_ref, s_ref, out_ref, acc_ref, *, bits: int, run: int, group: int,
                  lying_k: bool):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  x = x_ref[...]
  lanes = min(group, x.shape[1])  # a tile's lanes under one scale row
  for h in range(acc_ref.shape[0]):
    if not lying_k:  # row-major int8: the head's (block_k, D) values, a dot as the other form's
      w = _dequantize(w_ref[:, h, :].astype(jnp.int32), s_ref[:, h, :], x.dtype)
      acc_ref[h] += jnp.dot(x, w, preferred_element_type=jnp.float32)
      continue
    v = w_ref[h].astype(jnp.int32)  # (block_w, block_k): a head's packed rows, K along lanes
    if bits == 4:  # the head's rows in column order
      v = in_order(v, run, axis=0)
    s = s_ref[:, h, :].astype(jnp.float32).T  # (columns, scale rows of the tile)
    w = dequantize_lanes(v, s, lanes, s_ref.dtype, x.dtype)
    acc_ref[h] += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    for h in range(acc_ref.shape[0]):
      out_ref[:, h, :] = acc_ref[h].astype(out_ref.dtype)


def _tpu_heads(x, values, scale, *, bits: int, run: int, interpret, block_m: int | None,
               out_dtype):
  m, k = x.shape
  _, heads, width = values.shape
  groups, _, d = scale.shape
  block_k, block_h, block_w, most = _heads_blocks(k, heads, width, groups, bits, run)
  block_d = block_w * d // width  # output columns of a head's tile
  group = k // groups
  srows = max(1, block_k // group)
  under_row = max(1, group // block_k)  # tiles under one scale row (lax.div: no floor's sign)
  bm = block_m or (m if m <= most else most)
  padded = -(-m // bm) * bm
  if padded != m:
    x = jnp.pad(x, ((0, padded - m), (0, 0)))
  # the middle grid axis walks blocks of heads, or of one head's rows
  hw = (lambda j: (j, 0)) if heads > 1 else (lambda j: (0, j))
  lying_k = k_minor(k, width)
  if lying_k:  # read as (H, W, K), as it lies
    values = jnp.transpose(values, (1, 2, 0))
    value_spec = pl.BlockSpec((block_h, block_w, block_k), lambda i, j, kk: (*hw(j), kk))
  else:
    value_spec = pl.BlockSpec((block_k, block_h, block_w), lambda i, j, kk: (kk, *hw(j)))
  out = pl.pallas_call(
      functools.partial(_heads_kernel, bits=bits, run=run, group=group, lying_k=lying_k),
      grid=(padded // bm, pl.cdiv(heads, block_h) * pl.cdiv(width, block_w), k // block_k),
      in_specs=[pl.BlockSpec((bm, block_k), lambda i, j, kk: (i, kk)), value_spec,
                pl.BlockSpec((srows, block_h, block_d),
                             lambda i, j, kk: (jax.lax.div(kk, under_row), *hw(j)))],
      out_specs=pl.BlockSpec((bm, block_h, block_d), lambda i, j, kk: (i, *hw(j))),
      out_shape=jax.ShapeDtypeStruct((padded, heads, d), out_dtype),
      scratch_shapes=[pltpu.VMEM((block_h, bm, block_d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(x, values, scale)
  return out[:m]


def _tpu(x, values, scale, *, bits: int, run: int, interpret, block_m: int | None,
         block_n: int | None, out_dtype):
  m, k = x.shape
  groups, n = scale.shape
  block_k, bn = _blocks(k, n, groups, bits)
  bn = block_n or bn  # packed columns of a weight tile
  out_bn = 2 * bn if bits == 4 else bn
  most = max(8, min(BLOCK_M, TILE // block_k // 8 * 8))  # rows of x in VMEM at once
  bm = block_m or (m if m <= most else most)
  padded = -(-m // bm) * bm
  if padded != m:
    x = jnp.pad(x, ((0, padded - m), (0, 0)))
  srows = 1 if groups == 1 else block_k * groups // k
  out = pl.pallas_call(
      functools.partial(_kernel, bits=bits, run=run),
      grid=(padded // bm, pl.cdiv(values.shape[1], bn), k // block_k),
      in_specs=[pl.BlockSpec((bm, block_k), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((block_k, bn), lambda i, j, kk: (kk, j)),
                pl.BlockSpec((srows, out_bn), lambda i, j, kk: (kk if groups > 1 else 0, j))],
      out_specs=pl.BlockSpec((bm, out_bn), lambda i, j, kk: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded, n), out_dtype),
      scratch_shapes=[pltpu.VMEM((bm, out_bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(x, values, scale)
  return out[:m]


def quantized_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, *, bits: int,
                     run: int | None = None, interpret=False, block_m: int | None = None,
                     block_n: int | None = None, out_dtype=None) -> jax.Array:
  """x (M, K) @ the weight `values` and `scale` stand for -> (M, N) in out_dtype (None: x's;
  accumulated in float32 either way), by the Mosaic TPU kernel (`fits` must hold); values
  (K, H, W) and scale (G, H, D) give (M, H, D) by the heads form (H = 1 for a two-axis weight
  lying K-minor), which reads them as XLA lays them out (`k_minor`). A weight stored
  transposed (a tied embedding table as the LM head) has `transposed.quantized_matmul_t`.
  run: int4's packed run (`reference.unpack_int4`; None: `packed_run` of the last axis);
  `interpret` (True or a `pltpu.InterpretParams`) runs it in jax's TPU interpret mode wherever
  this runs. Off a TPU, callers use the reference."""
  k = x.shape[1]
  heads = values.shape[1] if values.ndim == 3 else None
  if heads is not None and scale.ndim != 3:
    raise ValueError(f"quantized_matmul: values {values.shape} in heads take scales (G, H, D); "
                     f"got scale {scale.shape}")
  groups, n = scale.shape[0], math.prod(scale.shape[1:])
  words = values.shape[-1]  # packed columns of a run's axis (a head's, in heads)
  run = run or packed_run(words)
  if bits == 4 and (run & (run - 1) or 128 % run or words % run
                    or (block_n or 128) % run):
    raise ValueError(f"quantized_matmul: packed run {run} must be a power of two up to 128 "
                     f"dividing the {words} packed columns and block_n ({block_n})")
  expect = ((k, n // 2), jnp.uint8) if bits == 4 else ((k, n), jnp.int8)
  if heads is not None:
    expect = ((k, heads, expect[0][1] // heads), expect[1])
  if (values.shape, values.dtype) != expect:
    raise ValueError(f"quantized_matmul: {bits}-bit values for x {x.shape} and scale "
                     f"{scale.shape} must be {expect[0]} {jnp.dtype(expect[1]).name}, got "
                     f"{values.shape} {values.dtype}")
  if not fits(k, n, groups, bits, run, heads):
    raise ValueError(f"quantized_matmul: no TPU tile fits a ({k}, {n}) weight with {groups} "
                     f"scale rows" + (f" in {heads} heads" if heads else "")
                     + (f" in packed runs of {run}" if bits == 4 else "")
                     + "; use quantized_matmul_reference")
  if interpret is True:
    interpret = pltpu.InterpretParams()
  if heads is not None:
    return _tpu_heads(x, values, scale, bits=bits, run=run if bits == 4 else 1,
                      interpret=interpret, block_m=block_m, out_dtype=out_dtype or x.dtype)
  return _tpu(x, values, scale, bits=bits, run=run, interpret=interpret, block_m=block_m,
              block_n=block_n, out_dtype=out_dtype or x.dtype)
