"""The model's linear layers through possibly quantized weights: `linear(eq, x, w)`.

A plain or weight-only quantized `w` is `einsum(eq, x, weight(w))`. With int8 activations (an
`ActQuantized` weight, format :a8) the input is quantized too, per token: symmetric absmax int8
over the axes the weight contracts (qwix, as the weights), and the product is taken in integers
(int8 x int8 accumulated in int32) times the input's and the weight's scales (one per token,
one per output channel). A grouped weight (:gN) accumulates each group apart, in int32, and sums
the groups after their scales; a per-channel weight is the case of one group. QAT runs that same
forward (so trained and served outputs are equal bit for bit) and takes its gradient from the
product of the fake-quantized input and weight (straight-through: the rounding passes gradients
unchanged).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.ops import (ActQuantized, int_values, is_qarray, load_qwix, packed_bits,
                                straight_through, weight)

if TYPE_CHECKING:
  from qwix import QArray


def linear(eq: str, x: jax.Array, w, kernel: bool = False) -> jax.Array:
  """einsum(eq, x, w) for a two-operand equation such as "btd,dnh->btnh". kernel: on a TPU, an
  int8 or int4 weight in groups (:gN) goes through `pallas_kernels.quantized_matmul`
  (dequantized tile by tile in VMEM) where its layout allows (`_kernel_layout`); elsewhere, and
  for other weights, this is the XLA product. (XLA on a TPU fuses a per-channel weight's
  dequantization into the dot, but writes a grouped weight out whole in bfloat16 first: measured
  in the compiled decode step's temporaries, experiments/results/README.md.)"""
  if kernel and is_qarray(w) and _kernel_layout(eq, x, w) is not None:
    return jax.lax.platform_dependent(x, w, tpu=functools.partial(_through_kernel, eq),
                                      default=lambda x, w: jnp.einsum(eq, x, weight(w)))
  if not isinstance(w, ActQuantized):
    return jnp.einsum(eq, x, weight(w))
  inputs, out = eq.split("->")
  keep = tuple(i for i, c in enumerate(inputs.split(",")[0]) if c in out)  # a scale per token
  y = _integer_product(eq, jax.lax.stop_gradient(x), w.q, keep)
  if w.w is None:  # served
    return y
  # QAT: the value is y's; the gradient that of the fake-quantized product
  y_float = jnp.einsum(eq, _fake_quant_input(x, keep), w.w)
  return y + (y_float - jax.lax.stop_gradient(y_float))


def _kernel_layout(eq: str, x: jax.Array, q: QArray) -> tuple[int, int, int, int] | None:
  """(K, N, scale groups, bits) of `eq` as quantized_matmul's (M, K) @ (K, N): the weight's
  contracted axes (x's last, in order) then its output axes, flattened, its scales in groups of
  consecutive rows of K (more than one). None where the kernel does not apply (per-channel
  scales, another layout or format, or no tile divides the weight)."""
  from pallas_kernels.quantized_matmul import fits
  inputs, out = eq.split("->")
  xs, ws = inputs.split(",")
  c = _contracted(eq)
  bits = {jnp.dtype(jnp.uint8): 4, jnp.dtype(jnp.int8): 8}.get(jnp.dtype(q.qvalue.dtype))
  integer = q.qtype in (jnp.int8, jnp.int4) and (bits == 8 or packed_bits(q.qtype) == 4)
  if (bits is None or not integer or not 0 < c < len(ws) or not xs.endswith(ws[:c])
      or out != xs[:-c] + ws[c:] or jnp.dtype(x.dtype) != jnp.dtype(q.scale.dtype)):
    return None  # (mixed dtypes: XLA's product promotes, the kernel keeps x's)
  sizes, scales = x.shape[-c:], q.scale.shape[:c]
  split = next((i for i, (d, s) in enumerate(zip(sizes, scales)) if s != d), c)
  if any(s != 1 for s in scales[split + 1:]):  # groups would not be consecutive rows
    return None
  k, n, groups = math.prod(sizes), math.prod(q.scale.shape[c:]), math.prod(scales)
  return (k, n, groups, bits) if groups > 1 and fits(k, n, groups, bits) else None


def _through_kernel(eq: str, x: jax.Array, q: QArray, interpret=False) -> jax.Array:
  """einsum(eq, x, q) by quantized_matmul (`_kernel_layout` must hold)."""
  k, n, groups, bits = _kernel_layout(eq, x, q)
  c = _contracted(eq)
  out_shape = q.scale.shape[c:]  # a scale per output element
  scale = q.scale.reshape((groups,) + out_shape)
  halves = bits == 4 and len(out_shape) > 1  # packed along the last axis, per leading index
  if halves:  # the kernel's columns: every low half, then every high half
    scale = jnp.moveaxis(scale.reshape(scale.shape[:-1] + (2, -1)), -2, 1)
  y = _kernel_product(x.reshape(-1, k), q.qvalue.reshape(k, -1), scale.reshape(groups, n),
                      bits, interpret)
  if halves:
    y = jnp.moveaxis(y.reshape((-1, 2) + out_shape[:-1] + (out_shape[-1] // 2,)), 1, -2)
  return y.reshape(x.shape[:-c] + out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_product(x, values, scale, bits: int, interpret):
  """quantized_matmul, differentiable: its gradients are XLA's product's (the integer values
  get none)."""
  from pallas_kernels.quantized_matmul import quantized_matmul
  return quantized_matmul(x, values, scale, bits=bits, interpret=interpret)


def _kernel_product_fwd(x, values, scale, bits, interpret):
  return _kernel_product(x, values, scale, bits, interpret), (x, values, scale)


def _kernel_product_bwd(bits, interpret, res, g):
  from pallas_kernels.quantized_matmul import quantized_matmul_reference
  x, values, scale = res
  _, vjp = jax.vjp(lambda x, s: quantized_matmul_reference(x, values, s, bits=bits), x, scale)
  dx, dscale = vjp(g)
  return dx, np.zeros(values.shape, jax.dtypes.float0), dscale


_kernel_product.defvjp(_kernel_product_fwd, _kernel_product_bwd)


def _contracted(eq: str) -> int:
  """How many of the weight's leading axes `eq` contracts with x's."""
  xs, ws = eq.split("->")[0].split(",")
  return len(ws) - len(ws.lstrip(xs))


def _integer_product(eq: str, x: jax.Array, q: QArray, keep: tuple[int, ...]) -> jax.Array:
  """x quantized to int8 per token (a scale per `keep` axis), times q in integers: int32 sums,
  one per group where q has scales along contracted axes (a :gN format's groups, or a scale per
  element of another contracted axis), kept apart, then scaled by q's scales and summed, then by
  the input's."""
  xq = load_qwix().quantize(x, jnp.int8, channelwise_axes=keep)
  inputs, out = eq.split("->")
  xs, ws = inputs.split(",")
  xv, wv = xq.qvalue, int_values(q)
  free = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
  kept, scale_letters = "", ""
  for c, n in zip(ws, q.scale.shape):
    size = wv.shape[ws.index(c)]
    if c in out or n == 1:
      scale_letters += c if n > 1 else ""
      continue
    if n == size:  # a scale per element along a contracted axis
      kept += c
      scale_letters += c
      continue
    g = next(free)  # groups: axis c of both operands split into (n groups, size / n)
    i, j = xs.index(c), ws.index(c)
    xv = xv.reshape(xv.shape[:i] + (n, size // n) + xv.shape[i + 1:])
    wv = wv.reshape(wv.shape[:j] + (n, size // n) + wv.shape[j + 1:])
    xs, ws = xs.replace(c, g + c), ws.replace(c, g + c)
    kept += g
    scale_letters += g
  acc = jnp.einsum(f"{xs},{ws}->{out}{kept}", xv, wv, preferred_element_type=jnp.int32)
  sw = q.scale.reshape([n for n in q.scale.shape if n > 1]).astype(jnp.float32)
  y = jnp.einsum(f"{out}{kept},{scale_letters}->{out}", acc.astype(jnp.float32), sw)
  x_letters = inputs.split(",")[0]
  sx = xq.scale.astype(jnp.float32)  # (one per token: 1 along the contracted axes)
  per_token = [sx.shape[x_letters.index(c)] if c in x_letters else 1 for c in out]
  return (y * sx.reshape(per_token)).astype(x.dtype)


def _fake_quant_input(x: jax.Array, keep: tuple[int, ...]) -> jax.Array:
  """The input as served rounds it; straight-through gradient."""
  qwix = load_qwix()
  return straight_through(x, qwix.dequantize(qwix.quantize(x, jnp.int8, channelwise_axes=keep)))
