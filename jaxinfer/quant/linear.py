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

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer.quant.ops import (ActQuantized, int_values, is_qarray, load_qwix, pack_blocks,
                                packed_bits, straight_through, weight)
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules

if TYPE_CHECKING:
  from qwix import QArray


@dataclasses.dataclass(frozen=True)
class WeightKernel:
  """Asks `linear` for the quantized matmul kernel: on one device (mesh None or of one device),
  or on every device of `mesh` over its shard of a weight whose logical axes are `axes`, placed
  by `rules` as the parameters are (`quant.abstract_quantized`)."""

  mesh: Mesh | None = None
  rules: ShardingRules = DEFAULT_RULES
  axes: tuple[str | None, ...] = ()


def linear(eq: str, x: jax.Array, w, kernel: WeightKernel | None = None,
           out_dtype=None) -> jax.Array:
  """einsum(eq, x, w) for a two-operand equation such as "btd,dnh->btnh" (out_dtype: as
  einsum's preferred_element_type; weight-only formats and plain weights). kernel: on a TPU, an
  int8 or int4 weight in groups (:gN) goes through `pallas_kernels.quantized_matmul`
  (dequantized tile by tile in VMEM) where its layout allows (`_kernel_layout`, on each device's
  shard: `_sharded`); elsewhere, and for other weights, this is the XLA product. (XLA on a TPU
  fuses a per-channel weight's dequantization into the dot, but writes a grouped weight out whole
  in bfloat16 first: measured in the compiled decode step's temporaries,
  experiments/results/README.md.)"""
  through = (kernel is not None and is_qarray(w)
             and _kernel_fn(eq, x, w, kernel, out_dtype=out_dtype))
  xla = lambda x, w: jnp.einsum(eq, x, weight(w), preferred_element_type=out_dtype)
  if through:
    return jax.lax.platform_dependent(x, w, tpu=through, default=xla)
  if not isinstance(w, ActQuantized):
    return xla(x, w)
  inputs, out = eq.split("->")
  keep = tuple(i for i, c in enumerate(inputs.split(",")[0]) if c in out)  # a scale per token
  y = _integer_product(eq, jax.lax.stop_gradient(x), w.q, keep)
  if w.w is None:  # served
    return y
  # QAT: the value is y itself (y + (y_float - y_float) would round apart from the served y
  # where XLA fuses y's scaling into what follows); the gradient the fake-quantized product's
  y_float = jnp.einsum(eq, _fake_quant_input(x, keep), w.w)
  return straight_through(y_float, y)


def _run(q: QArray) -> int | None:
  """The packed run of an int4 weight's values (`ops.pack`; None unpacked): the whole weight's,
  which a shard is unpacked in too (its own size may give another)."""
  return pack_blocks(q.qvalue.shape[-1])[1] if q.qvalue.dtype == jnp.uint8 else None


class _Layout(NamedTuple):
  """A weight as quantized_matmul takes it: (M, K) @ (K, N), its scales in `groups` rows of K;
  heads: the heads form's heads (None: flattened); transposed: the transposed form's (values
  (N, K), packed along K)."""
  k: int
  n: int
  groups: int
  bits: int
  heads: int | None = None
  transposed: bool = False


def _kernel_layout(eq: str, x: jax.Array, q: QArray, run: int | None) -> _Layout | None:
  """`eq` as quantized_matmul's (M, K) @ (K, N): the weight's contracted axes (x's last, in
  order) then its output axes, flattened, its scales in groups of consecutive rows of K (more
  than one); heads: where the weight takes the kernel's heads form, which reads values as XLA
  lays them out (one contracted axis: q, k and v, or a two-axis weight lying K-minor,
  `k_minor`, such as a split int4 LM head), its first output axis's size when it has two,
  else 1; None for the flattened form (also where the heads form's tiles do not fit: then a
  copy of the weight on a TPU). A two-axis weight that contracts its last axis (a tied
  embedding table as the LM head, "...d,vd->...v") takes the transposed form, per-channel int4
  too (XLA on a TPU writes its unpacked table out whole: 1.7 GiB for Llama-3.2-1B's). None where
  the kernel does not apply (per-channel scales, another layout or format, or no tile fits the
  weight in its packed `run`, `_run`)."""
  from pallas_kernels.quantized_matmul import fits, fits_t, k_minor
  inputs, out = eq.split("->")
  xs, ws = inputs.split(",")
  c = _contracted(eq)
  transposed = c == 0 and len(ws) == 2 and xs[-1] == ws[1] and out == xs[:-1] + ws[0]
  bits = {jnp.dtype(jnp.uint8): 4, jnp.dtype(jnp.int8): 8}.get(jnp.dtype(q.qvalue.dtype))
  integer = q.qtype in (jnp.int8, jnp.int4) and (bits == 8 or packed_bits(q.qtype) == 4)
  if (bits is None or not integer or jnp.dtype(x.dtype) != jnp.dtype(q.scale.dtype)
      or not transposed and (not 0 < c < len(ws) or not xs.endswith(ws[:c])
                             or out != xs[:-c] + ws[c:])):
    return None  # (mixed dtypes: XLA's product promotes, the kernel keeps x's)
  if transposed:
    (n, groups), k = q.scale.shape, x.shape[-1]
    if groups == 1 and bits == 8 or not fits_t(k, n, groups, bits, run):
      return None
    return _Layout(k, n, groups, bits, transposed=True)
  sizes, scales = x.shape[-c:], q.scale.shape[:c]
  split = next((i for i, (d, s) in enumerate(zip(sizes, scales)) if s != d), c)
  if any(s != 1 for s in scales[split + 1:]):  # groups would not be consecutive rows
    return None
  k, n, groups = math.prod(sizes), math.prod(q.scale.shape[c:]), math.prod(scales)
  if groups == 1:
    return None
  if c == 1 and (q.scale.ndim == 3 or q.scale.ndim == 2 and k_minor(k, q.qvalue.shape[-1])):
    heads = q.scale.shape[1] if q.scale.ndim == 3 else 1
    if fits(k, n, groups, bits, run, heads=heads):
      return _Layout(k, n, groups, bits, heads)
  return _Layout(k, n, groups, bits) if fits(k, n, groups, bits, run) else None


def _kernel_fn(eq: str, x: jax.Array, q: QArray, kernel: WeightKernel, interpret=False,
               out_dtype=None):
  """(x, q) -> einsum(eq, x, q) through the kernel, on one device or per shard; None where the
  kernel does not take the weight (or its shards)."""
  mesh = kernel.mesh
  if mesh is not None and mesh.size > 1 and len(kernel.axes) != q.scale.ndim:
    raise ValueError(f"WeightKernel: {len(kernel.axes)} logical axes {kernel.axes} for a "
                     f"weight of {q.scale.ndim} axes")
  run = _run(q)
  if mesh is None or mesh.size == 1:
    return (_kernel_layout(eq, x, q, run) is not None
            and functools.partial(_through_kernel, eq, interpret=interpret, run=run,
                                  out_dtype=out_dtype))
  specs = _sharded(eq, x, q, kernel, run, out_dtype)
  if specs is None:
    return None
  x_spec, w_spec, out_spec, summed = specs

  def local(x, values, scale):
    y = _through_kernel(eq, x, q.replace(qvalue=values, scale=scale), interpret, run, out_dtype)
    return jax.lax.psum(y, summed) if summed else y

  def product(x, q):
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, w_spec),
                         out_specs=out_spec, check_vma=False)(x, q.qvalue, q.scale)
  return product


def _sharded(eq: str, x: jax.Array, q: QArray, kernel: WeightKernel, run: int | None,
             out_dtype=None):
  """(x's, the weight's (its values' and its scales') and the output's PartitionSpecs, the mesh
  axes summed over)
  for the kernel on each device's shard: the weight as the rules place it, x's rows as the rules
  place a batch, its contracted axes as the weight's; partial products summed over the
  contracted axes' mesh axes. Where a mesh axis splits both x's rows and the weight (FSDP), the
  smaller side is gathered: x (and the summed output), as at decode, or the weight, as XLA's
  product would for long prefills. None where the values' and scales' shards disagree, an int4
  shard would split a packed block of `run` (`ops.pack`), or the kernel does not take a
  device's shard."""
  mesh, rules = kernel.mesh, kernel.rules
  inputs, out = eq.split("->")
  xs, ws = inputs.split(",")
  names = lambda s: () if s is None else (s,) if isinstance(s, str) else tuple(s)
  spec_of = lambda axes: None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
  rows = names(rules.partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)[0])
  values = list(rules.partition_spec(kernel.axes, q.qvalue.shape, mesh))
  if values != list(rules.partition_spec(kernel.axes, q.scale.shape, mesh)):
    return None  # (the scales split otherwise)
  both = set(rows) & {a for s in values for a in names(s)}
  if both:
    out_per_in = (math.prod(n for ch, n in zip(ws, q.scale.shape) if ch in out)
                  / math.prod(n for ch, n in zip(xs, x.shape) if ch in ws))
    x_bytes = x.size * (x.dtype.itemsize  # x and the output (float32 logits)
                        + out_per_in * jnp.dtype(out_dtype or x.dtype).itemsize)
    if x_bytes < q.qvalue.size * q.qvalue.dtype.itemsize + q.scale.size * q.scale.dtype.itemsize:
      rows = tuple(a for a in rows if a not in both)
    else:
      values = [spec_of(tuple(a for a in names(s) if a not in both)) for s in values]
  w_of = dict(zip(ws, values))
  x_spec = P(*[spec_of(rows) if i == 0 else w_of.get(ch) for i, ch in enumerate(xs)])
  out_spec = P(*[w_of[ch] if ch in ws else x_spec[xs.index(ch)] for ch in out])
  summed = tuple(a for ch in ws if ch not in out for a in names(w_of[ch]))
  shard = lambda a, spec: jax.ShapeDtypeStruct(
      tuple(n // math.prod(mesh.shape[m] for m in names(s)) for n, s in zip(a.shape, spec)),
      a.dtype)
  local_q = q.replace(qvalue=shard(q.qvalue, values), scale=shard(q.scale, values))
  if run and values[-1] is not None and local_q.qvalue.shape[-1] % run:
    return None
  if _kernel_layout(eq, shard(x, x_spec), local_q, run) is None:
    return None
  return x_spec, P(*values), out_spec, summed


def _through_kernel(eq: str, x: jax.Array, q: QArray, interpret=False,
                    run: int | None = None, out_dtype=None) -> jax.Array:
  """einsum(eq, x, q) by quantized_matmul (`_kernel_layout` must hold). The flattened packed
  values keep the weight's runs (`ops.pack`), which the kernel is told; in the heads form values
  go in as (K, heads, W), not flattened (which is a copy of them on a TPU). run: that of the
  whole weight `q` is a shard of (None: `q` is whole)."""
  run = run or _run(q)
  k, n, groups, bits, heads, transposed = _kernel_layout(eq, x, q, run)
  if transposed:
    y = _kernel_product(x.reshape(-1, k), q.qvalue, q.scale, bits, run, interpret, out_dtype,
                        True)
    return y.reshape(x.shape[:-1] + (n,))
  c = _contracted(eq)
  out_shape = q.scale.shape[c:]  # a scale per output element
  values, scale = q.qvalue.reshape(k, -1), q.scale.reshape(groups, n)
  if heads is not None:
    values, scale = values.reshape(k, heads, -1), scale.reshape(groups, heads, -1)
  y = _kernel_product(x.reshape(-1, k), values, scale, bits, run, interpret, out_dtype)
  return y.reshape(x.shape[:-c] + out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _kernel_product(x, values, scale, bits: int, run: int | None, interpret, out_dtype,
                    transposed: bool = False):
  """quantized_matmul (transposed: quantized_matmul_t), differentiable: its gradients are XLA's
  product's (the integer values get none)."""
  from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_t
  return (quantized_matmul_t if transposed else quantized_matmul)(
      x, values, scale, bits=bits, run=run, interpret=interpret, out_dtype=out_dtype)


def _kernel_product_fwd(x, values, scale, bits, run, interpret, out_dtype, transposed):
  return (_kernel_product(x, values, scale, bits, run, interpret, out_dtype, transposed),
          (x, values, scale))


def _kernel_product_bwd(bits, run, interpret, out_dtype, transposed, res, g):
  from pallas_kernels.quantized_matmul import (quantized_matmul_reference,
                                               quantized_matmul_t_reference)
  x, values, scale = res
  reference = quantized_matmul_t_reference if transposed else quantized_matmul_reference
  _, vjp = jax.vjp(lambda x, s: reference(x, values, s, bits=bits, run=run, out_dtype=out_dtype),
                   x, scale)
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
