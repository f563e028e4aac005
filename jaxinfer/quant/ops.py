"""The one quantize function, its inverse, and the straight-through fake-quant built from them.

Quantized weights are data: a qwix `QArray` (qvalue, scale; a flax.struct pytree, so it is a
leaf group of the parameter tree). PTQ conversion, serving (`weight` at each use in model.py) and
QAT (`fake_quant` in the loss) all go through `quantize` and `dequantize` here, so trained and
served numerics cannot drift.

The scale layout comes from the weight's ParamSpec alone: one scale is shared along the axes it
is contracted over (`contract`); with groups, `group` consecutive elements of the declared group
axis share one, and every other axis, contracted or not, gets its own.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from jaxinfer.params import ParamSpec
from jaxinfer.quant.formats import CONTAINERS, PACKED_BITS, ROUNDED_HERE, QuantFormat
from pallas_kernels.quantized_matmul.reference import packed_run

if TYPE_CHECKING:
  from qwix import QArray


def load_qwix():
  """qwix, imported on first use: a model without quantized weights never needs it (importing it
  costs about 0.25 s of every start-up)."""
  import qwix
  return qwix


def is_qarray(x) -> bool:
  """Whether `x` is a qwix QArray (none exists before qwix is imported: also while another
  thread is importing it)."""
  cls = getattr(sys.modules.get("qwix"), "QArray", None)
  return cls is not None and isinstance(x, cls)


def is_quantized(x) -> bool:
  return isinstance(x, ActQuantized) or is_qarray(x)


def holds_quantized(params) -> bool:
  """Whether any weight of `params` is quantized."""
  return any(map(is_quantized, jax.tree_util.tree_leaves(params, is_leaf=is_quantized)))


def quantizes_activations(params) -> bool:
  """Whether any weight of `params` quantizes its input (format :a8)."""
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, ActQuantized))
  return any(isinstance(x, ActQuantized) for x in leaves)


def scale_axes(spec: ParamSpec, fmt: QuantFormat) -> tuple[tuple[int, ...], dict[int, int]]:
  """(channelwise axes, {tiled axis: group size}) in qwix's terms, from the declaration."""
  if fmt.group is None:
    contracted = {spec.axis(a) for a in spec.contract}
    return tuple(i for i in range(len(spec.shape)) if i not in contracted), {}
  g = spec.axis(spec.group)
  if spec.shape[g] % fmt.group:
    raise ValueError(f"{fmt.name}: groups of {fmt.group} do not divide {spec.group} "
                     f"({spec.shape[g]}); choose a group size that divides it")
  return tuple(i for i in range(len(spec.shape)) if i != g), {g: fmt.group}


def quantize(w: jax.Array, spec: ParamSpec, fmt: QuantFormat) -> QArray:
  """w (spec.shape) -> QArray in `fmt`, scales in w's dtype (they set the dequantized dtype);
  int4, int2, ternary, fp4 and fp6 values packed into uint8 where the last axis divides into
  whole words (see `pack` and formats.CONTAINERS)."""
  channelwise, tiled = scale_axes(spec, fmt)
  if fmt.kind == "ternary":
    q = _ternary(w, channelwise, tiled)
  elif fmt.kind in ROUNDED_HERE:
    q = _rounded_here(w, fmt.qtype, channelwise, tiled)
  else:
    q = load_qwix().quantize(w, fmt.qtype, channelwise_axes=channelwise, tiled_axes=tiled)
  bits = packed_bits(q.qtype)
  if bits is not None and q.qvalue.shape[-1] % _word(bits)[0] == 0:
    floats = jnp.issubdtype(q.qvalue.dtype, jnp.floating)
    return q.replace(qvalue=pack(_float_codes(q.qvalue, q.qtype) if floats else q.qvalue, bits))
  container = CONTAINERS.get(q.qvalue.dtype)
  return q if container is None else q.replace(qvalue=q.qvalue.astype(container))


def packed_bits(qtype) -> int | None:
  """Bits per value when `qtype` (a QArray's logical type) is packed, else None."""
  if isinstance(qtype, str):  # qwix's "int2" (levels -2..1, held in an int4 array)
    return 2
  return PACKED_BITS.get(jnp.dtype(qtype))


def _word(bits: int) -> tuple[int, int]:
  """(values, bytes) of the fewest whole bytes that `bits`-bit values fill: (4, 1) for 2 bits,
  (2, 1) for 4, (4, 3) for 6."""
  total = math.lcm(bits, 8)
  return total // bits, total // 8


def pack_blocks(words: int) -> tuple[int, int]:
  """(blocks, words per run) of a last axis of `words` words, runs as the quantized matmul
  kernel reads them (`packed_run`: up to 128 words, fewer where 8 shards would split a block)."""
  run = packed_run(words)
  return words // run, run


def pack(values: jax.Array, bits: int) -> jax.Array:
  """Signed `bits`-bit integers -> uint8 words (`_word`), block by block along the last axis: a
  block is as many runs of `pack_blocks` words as a word has values; run i of a block's values
  goes in bits [i*bits, (i+1)*bits) of its little-endian words, and byte j of those words in run
  j of the block's bytes. For int4 whose last axis is a multiple of 2,048: byte j of each 128
  holds column j of the block's 256 in its low four bits and column 128 + j in its high four. A
  block never straddles a shard of the last axis whose size is a multiple of the block (a long
  axis whose words divide by 8, split 2, 4 or 8 ways: `packed_run`), so a weight sharded there
  unpacks on each device alone. The last axis must divide into words."""
  per_word, num_bytes = _word(bits)
  n = values.shape[-1]
  if n % per_word:
    raise ValueError(f"packing {bits}-bit values {per_word} to {num_bytes} byte(s): the last "
                     f"axis ({n}) does not divide by {per_word}")
  blocks, run = pack_blocks(n // per_word)
  v = values.astype(jnp.int32).reshape(values.shape[:-1] + (blocks, per_word, run))
  word = sum((v[..., i, :] & ((1 << bits) - 1)) << (i * bits) for i in range(per_word))
  out = jnp.stack([(word >> (8 * j)) & 255 for j in range(num_bytes)], axis=-2)
  return out.reshape(values.shape[:-1] + (blocks * num_bytes * run,)).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, dtype) -> jax.Array:
  """The inverse of `pack`, as `dtype` integers."""
  per_word, num_bytes = _word(bits)
  blocks, run = pack_blocks(packed.shape[-1] // num_bytes)
  b = packed.astype(jnp.int32).reshape(packed.shape[:-1] + (blocks, num_bytes, run))
  word = sum(b[..., j, :] << (8 * j) for j in range(num_bytes))
  sign = 1 << (bits - 1)
  values = jnp.concatenate([(((word >> (i * bits)) & ((1 << bits) - 1)) ^ sign) - sign
                            for i in range(per_word)], axis=-1)  # (XLA on a TPU fuses it)
  return values.reshape(packed.shape[:-1] + (blocks * per_word * run,)).astype(dtype)


@functools.cache
def _float_table(qtype) -> np.ndarray:
  """Every value of a packed float type by its code, which is its own bit pattern (the sign on
  top, below it the magnitude's index in increasing order: `_float_codes`), as float32."""
  bits = PACKED_BITS[jnp.dtype(qtype)]
  return np.arange(1 << bits, dtype=np.uint8).view(qtype).astype(np.float32)


def _float_codes(values: jax.Array, qtype) -> jax.Array:
  """Values of the packed float type `qtype` (held exactly in any float type) -> their codes:
  the magnitude's index is its exponent field times 2 ** mantissa bits plus its mantissa
  (subnormals: exponent field 0), the sign above it."""
  info = ml_dtypes.finfo(qtype)
  x = values.astype(jnp.float32)
  exponent, step = _exponent_and_step(jnp.abs(x), info)
  index = (exponent - info.minexp) * (1 << info.nmant) + (jnp.abs(x) / step).astype(jnp.int32)
  return index + (1 << (PACKED_BITS[jnp.dtype(qtype)] - 1)) * jnp.signbit(x)


def _float_values(codes: jax.Array, qtype) -> jax.Array:
  """The inverse of `_float_codes` (codes in any integer type), in CONTAINERS[qtype] (the 8-bit
  float type that holds every value: what an unpacked weight of that type is stored in)."""
  table = jnp.asarray(_float_table(qtype), CONTAINERS[jnp.dtype(qtype)])
  return table[codes.astype(jnp.int32) & (len(table) - 1)]


def _scale_groups(w: jax.Array, channelwise, tiled):
  """(w split so that each scale's elements lie along `reduce`, reduce, the scales' shape): the
  layout qwix gives its scales for the same axes."""
  split, reduce, scale_shape = [], [], []
  for i, d in enumerate(w.shape):
    if i in tiled:
      split += [d // tiled[i], tiled[i]]
      scale_shape.append(d // tiled[i])
      reduce.append(len(split) - 1)
    else:
      split.append(d)
      scale_shape.append(d if i in channelwise else 1)
      if i not in channelwise:
        reduce.append(len(split) - 1)
  return w.reshape(split), tuple(reduce), tuple(scale_shape)


def _nonzero(scale: jax.Array) -> jax.Array:
  """An all-zero group's scale is 1 (as qwix's are): its values stay 0."""
  return jnp.where(scale < jnp.sqrt(jnp.finfo(scale.dtype).tiny), 1, scale)


def _ternary(w: jax.Array, channelwise, tiled) -> QArray:
  """BitNet b1.58: gamma = mean|W|, W_q = RoundClip(W / gamma, -1, 1); qwix has no absmean
  calibration, so the scale is computed here over the same axes absmax would reduce. BitNet
  shares one gamma per tensor; here it is per channel (or group), the same rule at finer grain."""
  ws, reduce, scale_shape = _scale_groups(w, channelwise, tiled)
  gamma = _nonzero(jnp.mean(jnp.abs(ws.astype(jnp.float32)), axis=reduce, keepdims=True))
  gamma = gamma.astype(w.dtype)
  q = jnp.clip(jnp.round(ws / gamma), -1, 1).reshape(w.shape).astype(jnp.int2)
  return load_qwix().QArray(q, gamma.reshape(scale_shape), None, jnp.int2)


def _rounded_here(w: jax.Array, qtype, channelwise, tiled) -> QArray:
  """A float format no XLA array holds (fp6), quantized as qwix quantizes the float types it
  can hold: absmax scales (absmax / the type's largest value, in w's dtype), w / scale clipped
  to the type's range and rounded to its grid (`round_to_float`), held in CONTAINERS[qtype]."""
  ws, reduce, scale_shape = _scale_groups(w, channelwise, tiled)
  bound = float(ml_dtypes.finfo(qtype).max)
  scale = _nonzero(jnp.max(jnp.abs(ws), axis=reduce, keepdims=True) / bound).astype(w.dtype)
  x = jnp.clip(ws / scale, -bound, bound).astype(jnp.float32)
  q = round_to_float(x, qtype).reshape(w.shape).astype(CONTAINERS[jnp.dtype(qtype)])
  return load_qwix().QArray(q, scale.reshape(scale_shape), None, qtype)


def round_to_float(x: jax.Array, qtype) -> jax.Array:
  """float32 x, within `qtype`'s range, rounded to the nearest `qtype` value (ties to even), as
  a cast to it would round, without an array of that type: a value's step is 2 ** (its exponent
  - the mantissa bits), subnormals taking the smallest normal exponent's."""
  _, step = _exponent_and_step(x, ml_dtypes.finfo(qtype))
  return jnp.round(x / step) * step  # (dividing by a power of two is exact)


def _exponent_and_step(x: jax.Array, info):
  """(x's exponent, or the smallest normal one below it (and for 0); the spacing of the float
  type `info` describes at that exponent), float32 x."""
  exponent = jnp.where(x == 0, info.minexp, jnp.maximum(jnp.frexp(x)[1] - 1, info.minexp))
  return exponent, jnp.ldexp(jnp.ones_like(x), exponent - info.nmant)


def logical_shape(x) -> tuple[int, ...]:
  """The shape of the weight `x` stands for: a packed QArray's last axis unpacked."""
  if isinstance(x, ActQuantized):
    x = x.q
  shape = tuple(x.shape)
  if is_qarray(x) and x.qvalue.dtype == jnp.uint8:
    per_word, num_bytes = _word(packed_bits(x.qtype))
    return shape[:-1] + (shape[-1] // num_bytes * per_word,)
  return shape


def int_values(q: QArray) -> jax.Array:
  """The integer values of an integer-format QArray, unpacked, as int8."""
  if q.qvalue.dtype == jnp.uint8:  # packed (see `quantize`)
    return unpack(q.qvalue, packed_bits(q.qtype), jnp.int8)
  return q.qvalue.astype(jnp.int8)


def dequantize(q: QArray) -> jax.Array:
  if q.qvalue.dtype == jnp.uint8:  # packed (see `quantize`)
    floats = not isinstance(q.qtype, str) and jnp.issubdtype(q.qtype, jnp.floating)
    q = q.replace(qvalue=_float_values(unpack(q.qvalue, packed_bits(q.qtype), jnp.int32),
                                       q.qtype) if floats else int_values(q))
  return load_qwix().dequantize(q)


@struct.dataclass
class ActQuantized:
  """A linear weight whose input is quantized to int8 too (format :a8), applied by
  `quant.linear`: `q` its QArray; in QAT also `w`, its fake-quantized array, which carries the
  straight-through gradient (the forward is the served one, from `q`)."""

  q: QArray
  w: Any = None


@struct.dataclass
class TrainedTable:
  """An embedding table as QAT sees it (a format including `embed`): `q` its QArray, `w` its
  fake-quantized array. `take_rows` computes the rows taken from `q` as serving does, with the
  straight-through gradient of `w`'s rows; elsewhere (a tied LM head) it is `w`. Taking rows of
  the table dequantized whole is not enough: XLA may fuse the served rows' dequantization into
  the addition that follows (a fused multiply-add, one rounding), the whole table's not."""

  q: QArray
  w: Any


def _held(x):
  """A weight leaf without its QAT or int8-activation wrapping: an ActQuantized weight's QArray
  as served, or the fake-quantized array QAT trains; anything else as it is."""
  if isinstance(x, TrainedTable):
    return x.w
  if isinstance(x, ActQuantized):
    return x.q if x.w is None else x.w
  return x


def weight(x):
  """The array a weight leaf stands for: a QArray dequantized, anything else as it is. Every
  weight use in the model goes through this, `take_rows` or `quant.linear`."""
  x = _held(x)
  return dequantize(x) if is_qarray(x) else x


def take_rows(x, index: jax.Array) -> jax.Array:
  """weight(x)[index] along its first axis (an embedding lookup), a QArray dequantizing only the
  rows taken: dequantized whole, a quantized table was a temporary of its full size in every
  step (Llama-3-8B's: 4.47 GiB of a decode step's temporaries on one TPU v5e chip). Equal to
  taking rows of the dequantized table, bit for bit (each element's unpacking and scaling is
  its own). In QAT the served rows, with the trained rows' gradient (`TrainedTable`)."""
  if isinstance(x, (TrainedTable, ActQuantized)) and x.w is not None:
    return straight_through(jnp.take(x.w, index, axis=0), _rows(x.q, index))
  return _rows(_held(x), index)


def _rows(x, index: jax.Array) -> jax.Array:
  if is_qarray(x) and x.scale.shape[0] == x.qvalue.shape[0]:  # a scale row per table row
    return dequantize(x.replace(qvalue=jnp.take(x.qvalue, index, axis=0),
                                scale=jnp.take(x.scale, index, axis=0)))
  return jnp.take(weight(x), index, axis=0)


def fake_quant(w: jax.Array, spec: ParamSpec, fmt: QuantFormat) -> jax.Array:
  """dequantize(quantize(w)) forward; straight-through (identity) gradient."""
  return straight_through(w, dequantize(quantize(w, spec, fmt)))


@jax.custom_vjp
def straight_through(x: jax.Array, rounded: jax.Array) -> jax.Array:
  """`rounded` (x as some quantizer rounds it) forward, x's gradient passed through unchanged. A
  custom VJP rather than x + stop_gradient(rounded - x), whose own rounding would differ from
  `rounded`: trained values must be the served ones exactly."""
  return rounded


straight_through.defvjp(lambda x, rounded: (rounded, None),
                        lambda _, g: (g, jnp.zeros_like(g)))
