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

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxinfer.quant.ops import ActQuantized, int_values, load_qwix, straight_through, weight

if TYPE_CHECKING:
  from qwix import QArray


def linear(eq: str, x: jax.Array, w) -> jax.Array:
  """einsum(eq, x, w) for a two-operand equation such as "btd,dnh->btnh"."""
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
