"""The quantized matmul kernel (int8, or int4 packed two per byte, dequantized tile by tile in
VMEM): numerics in jax's TPU interpret mode against the jnp reference, the model's linear layers
through it (their weight layouts flattened, or values XLA lays out K-minor read as they lie),
and proof that it compiles: libtpu's compile-only client builds it at Llama-3-8B shapes for v5e
and v6e with no dequantized weight among the temporaries, as XLA's product of a grouped weight
has, and no copy of the values."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import aot
from jaxinfer import params as P
from jaxinfer import quant
from jaxinfer.quant.linear import WeightKernel, _kernel_layout, _run, _through_kernel, linear
from pallas_kernels.quantized_matmul import (fits, fits_t, quantized_matmul,
                                             quantized_matmul_reference, quantized_matmul_t,
                                             quantized_matmul_t_reference)

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _weight(spec, fmt, dtype=jnp.float32, seed=0):
  w = jax.random.normal(jax.random.key(seed), spec.shape, jnp.float32) / 16
  return quant.quantize(w.astype(dtype), spec, quant.QuantFormat.parse(fmt))


MLP_UP = P.linear((512, 512), ("embed", "mlp"), P.fan_in_init(1), contract=("embed",))


@pytest.mark.parametrize("fmt", ["int4:g32", "int4", "int8", "int8:g64"])
@pytest.mark.parametrize("rows,dtype", [(1, jnp.float32), (40, jnp.bfloat16),
                                        (300, jnp.float32)])
def test_kernel_matches_reference(fmt, rows, dtype):
  """Per-channel and grouped scales, int4 and int8; one row, rows that are not a multiple of 8,
  and more rows than a block (two blocks of 256, the second padded); several K and N blocks."""
  q = _weight(MLP_UP, fmt, dtype)
  bits = 4 if q.qvalue.dtype == jnp.uint8 else 8
  x = jax.random.normal(jax.random.key(1), (rows, 512), jnp.float32).astype(dtype)
  got = quantized_matmul(x, q.qvalue, q.scale, bits=bits, interpret=True, block_n=128)
  want = quantized_matmul_reference(x, q.qvalue, q.scale, bits=bits)
  assert got.shape == (rows, 512) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **TOL[dtype])
  if dtype == jnp.float32:  # the reference is the model's own XLA product
    np.testing.assert_array_equal(np.asarray(want), np.asarray(x @ quant.dequantize(q)))


HEADS = P.linear((512, 4, 128), ("embed", "q_heads", "head_dim"), P.fan_in_init(1),
                 contract=("embed",))


@pytest.mark.parametrize("fmt,shape,rows,dtype", [
    ("int4:g128", (512, 4, 128), 1, jnp.float32), ("int4:g32", (512, 4, 128), 40, jnp.bfloat16),
    ("int8:g256", (512, 2, 64), 300, jnp.float32), ("int4:g1024", (2048, 1, 32), 5, jnp.float32),
    ("int4:g64", (512, 3, 96), 2, jnp.float32), ("int8:g128", (256, 64, 32), 3, jnp.float32),
    ("int8:g32", (256, 64, 128), 300, jnp.float32), ("int8:g512", (512, 2, 256), 5, jnp.bfloat16)])
def test_the_heads_form_matches_reference(fmt, shape, rows, dtype):
  """Values in heads go in as (K, H, W) and come out (M, H, D), read as XLA lays them out. K-minor:
  q, k and v (int4 heads of 128 and 32, int8 heads of 64; one head, as a model:8 shard of
  Llama-3's k; int4 heads of 96, three packed runs of 16 each; 64 heads, in two programs of 32).
  Row-major: int8 heads of 128 and 256 (64 heads, two programs). Groups of 32 lanes to a whole K
  tile, and two tiles under one scale row; rows past a block padded."""
  spec = P.linear(shape, HEADS.axes, P.fan_in_init(1), contract=("embed",))
  q = _weight(spec, fmt, dtype)
  bits = 4 if q.qvalue.dtype == jnp.uint8 else 8
  assert q.qvalue.ndim == 3 and fits(shape[0], shape[1] * shape[2], q.scale.shape[0], bits,
                                     heads=shape[1])
  x = jax.random.normal(jax.random.key(1), (rows, shape[0]), jnp.float32).astype(dtype)
  got = quantized_matmul(x, q.qvalue, q.scale, bits=bits, interpret=True)
  want = quantized_matmul_reference(x, q.qvalue, q.scale, bits=bits)
  assert got.shape == (rows,) + shape[1:] and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **TOL[dtype])
  if dtype == jnp.float32:
    np.testing.assert_array_equal(
        np.asarray(want), np.asarray(jnp.einsum("md,dnh->mnh", x, quant.dequantize(q))))


def test_the_heads_form_of_a_long_axis():
  """One head of more rows than a tile (a split LM head's: 8,016 packed columns a device, in
  runs of 16) is read in tiles of 512 rows, the last partial (its rows past the weight read
  undefined values whose output columns are dropped); int8 too, and float32 out of bfloat16."""
  k, words = 256, 1040
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (3, k))
  for bits, cols in ((4, 2 * words), (8, words)):
    values = jax.random.randint(keys[1], (k, 1, words), 0, 256).astype(jnp.uint8)
    if bits == 8:
      values = values.view(jnp.int8)
    scale = jax.random.uniform(keys[2], (2, 1, cols), minval=0.01, maxval=0.1)
    assert fits(k, cols, 2, bits, run=16, heads=1)
    assert bits == 8 or not fits(k, cols, 2, bits, run=4, heads=1)  # runs of 4 rows: refused
    got = quantized_matmul(x, values, scale, bits=bits, run=16, interpret=True)
    want = quantized_matmul_reference(x, values, scale, bits=bits, run=16)
    assert got.shape == (3, 1, cols)  # (outputs of about 100: float32 rounding of their sums)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)
  # bfloat16 in, float32 out (a split LM head's logits)
  x16, scale16 = x.astype(jnp.bfloat16), scale.astype(jnp.bfloat16)
  got = quantized_matmul(x16, values, scale16, bits=8, run=16, interpret=True,
                         out_dtype=jnp.float32)
  want = quantized_matmul_reference(x16, values, scale16, bits=8, out_dtype=jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)


def test_a_partial_last_tile():
  """Columns no tile width divides take a partial last tile: its lanes past the weight are
  dropped, and the product equals the reference's (int4 in runs of 16: 464 packed columns in
  tiles of 256; int8 in tiles of 512)."""
  spec = P.linear((256, 928), ("embed", "vocab"), P.fan_in_init(1), contract=("embed",))
  x = jax.random.normal(jax.random.key(1), (5, 256))
  for fmt in ("int4:g32", "int8:g64"):
    q = _weight(spec, fmt)
    bits = 4 if q.qvalue.dtype == jnp.uint8 else 8
    assert fits(256, 928, q.scale.shape[0], bits)
    got = quantized_matmul(x, q.qvalue, q.scale, bits=bits, interpret=True)
    want = quantized_matmul_reference(x, q.qvalue, q.scale, bits=bits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # bfloat16 in, float32 out (the LM head's logits): the reference's preferred_element_type
  q = _weight(spec, "int4:g32", jnp.bfloat16)
  x16 = x.astype(jnp.bfloat16)
  got = quantized_matmul(x16, q.qvalue, q.scale, bits=4, interpret=True, out_dtype=jnp.float32)
  want = quantized_matmul_reference(x16, q.qvalue, q.scale, bits=4, out_dtype=jnp.float32)
  assert got.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not fits(512, 200, 1, 4)  # 100 packed columns: narrower than any tile


TIED = lambda v, d: P.linear((v, d), ("vocab", "embed"), P.normal_init(0.02),
                             contract=("embed",), quant="embed")


@pytest.mark.parametrize("fmt,v,d,rows,dtype", [
    ("int4:g128", 1000, 1024, 5, jnp.float32), ("int8:g128", 640, 1024, 40, jnp.bfloat16),
    ("int4", 300, 512, 300, jnp.float32), ("int4:g32", 256, 64, 3, jnp.float32),
    ("int4:g1024", 256, 2048, 3, jnp.float32), ("int4", 300, 1024, 5, jnp.float32)])
def test_the_transposed_form_matches_reference(fmt, v, d, rows, dtype):
  """A tied embedding table (V, D) as the LM head, x @ W.T: its values (packed along D) and
  scales (V, G) read as they lie, in tiles of 512 of its rows (the last partial: 1,000), K
  dequantized in one or several chunks (a scale row over several, or several in one), x's rows
  in blocks of 256 (the last partial: 300); per-channel int4 too (whose unpacking XLA does not
  fuse). The reference is the model's XLA product bit for bit."""
  q = _weight(TIED(v, d), fmt, dtype)
  bits = 4 if q.qvalue.dtype == jnp.uint8 else 8
  x = jax.random.normal(jax.random.key(1), (rows, d), jnp.float32).astype(dtype)
  got = quantized_matmul_t(x, q.qvalue, q.scale, bits=bits, interpret=True,
                           out_dtype=jnp.float32)
  want = quantized_matmul_t_reference(x, q.qvalue, q.scale, bits=bits, out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(want), np.asarray(jnp.einsum(
      "md,vd->mv", x, quant.dequantize(q), preferred_element_type=jnp.float32)))
  assert got.shape == (rows, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])


def test_logits_take_it_for_a_grouped_lm_head(monkeypatch):
  """`model.logits` under a Pallas runtime sends a grouped int4 LM head through the kernel (the
  TPU branch taken here, in interpret mode): float32 logits from bfloat16 hidden states, XLA's
  product's within rounding. Packed runs too short for its tiles keep XLA's product."""
  import importlib
  from types import SimpleNamespace

  from jaxinfer import model as M
  from jaxinfer.runtime import Runtime
  L = importlib.import_module("jaxinfer.quant.linear")  # (the package exports its function)
  taken = []
  real = L._kernel_fn

  def interpreted(eq, x, q, kernel, **kw):
    fn = real(eq, x, q, kernel, interpret=True, **kw)
    taken.append(bool(fn))
    return fn
  monkeypatch.setattr(L, "_kernel_fn", interpreted)
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, tpu, default: tpu(*args))
  spec = P.linear((256, 2304), ("embed", "vocab"), P.fan_in_init(1), contract=("embed",))
  q = _weight(spec, "int4:g32", jnp.bfloat16)
  hidden = jax.random.normal(jax.random.key(1), (2, 3, 256)).astype(jnp.bfloat16)
  got = M.logits(SimpleNamespace(lm_head=q, embed=None), hidden, Runtime(implementation="pallas"))
  want = jnp.einsum("btd,dv->btv", hidden, quant.dequantize(q),
                    preferred_element_type=jnp.float32)
  assert taken == [True] and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  table = _weight(TIED(2304, 256), "int4:g32", jnp.bfloat16)  # tied: the transposed form
  got = M.logits(SimpleNamespace(lm_head=None, embed=table), hidden,
                 Runtime(implementation="pallas"))
  want = jnp.einsum("btd,vd->btv", hidden, quant.dequantize(table),
                    preferred_element_type=jnp.float32)
  assert taken == [True, True]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  assert fits(4096, 16032, 32, 4, run=16) and not fits(4096, 16032, 32, 4, run=8)


LAYERS = {  # name: (spec, equation, input shape), the model's own layouts
    "q": (P.linear((256, 4, 64), ("embed", "q_heads", "head_dim"), P.fan_in_init(1),
                   contract=("embed",)), "btd,dnh->btnh", (2, 3, 256)),
    "o": (P.linear((4, 64, 256), ("q_heads", "head_dim", "embed"), P.fan_in_init(2),
                   contract=("q_heads", "head_dim"), group="head_dim"), "btnh,nhd->btd",
          (2, 3, 4, 64)),
    "down": (P.linear((512, 256), ("mlp", "embed"), P.fan_in_init(1), contract=("mlp",)),
             "btf,fd->btd", (2, 3, 512)),
    "tied": (TIED(640, 256), "btd,vd->btv", (2, 3, 256)),  # an embedding table as LM head
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_linear_layers_through_the_kernel(name):
  """q (int4 packed per head: the kernel told the run), o (two contracted axes,
  groups along head_dim inside each head) and an MLP weight, in groups: through the kernel as on
  a TPU they equal the XLA product within float32 rounding; off a TPU
  `linear(..., WeightKernel())` is the XLA product bit for bit; weights the kernel is not for
  stay on XLA."""
  spec, eq, shape = LAYERS[name]
  x = jax.random.normal(jax.random.key(1), shape)
  for fmt in ("int4:g32", "int8:g32"):
    q = _weight(spec, fmt)
    want = jnp.einsum(eq, x, quant.dequantize(q))
    assert _kernel_layout(eq, x, q, _run(q)) is not None, fmt
    got = jax.jit(lambda x, q: _through_kernel(eq, x, q, interpret=True))(x, q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    here = jax.jit(lambda x, q: linear(eq, x, q, WeightKernel()))(x, q)
    np.testing.assert_array_equal(np.asarray(here), np.asarray(want))
  if name == "q":  # in heads, as it lies (K-minor): int4 heads of 32 bytes, int8 of 64
    assert _kernel_layout(eq, x, q, _run(q)).heads == 4
    x512 = jnp.zeros((2, 3, 512))
    wide = _weight(HEADS, "int8:g32")  # int8 heads of 128: row-major, in heads too
    assert _kernel_layout(eq, x512, wide, None).heads == 4
    assert _kernel_layout(eq, x512, _weight(HEADS, "int4:g32"), 64).heads == 4
    wider = P.linear((512, 2, 256), HEADS.axes, P.fan_in_init(1), contract=("embed",))
    assert _kernel_layout(eq, x512, _weight(wider, "int4:g32"), None).heads is None  # flattened
  # per-channel weights stay on XLA, which fuses their dequantization; so do other formats
  for fmt in ("int4", "int8", "fp8_e4m3", "fp4_e2m1", "int2:g32", "ternary"):
    q = _weight(spec, fmt)
    taken = name == "tied" and fmt == "int4"  # (a table's unpacking XLA does not fuse)
    assert (_kernel_layout(eq, x, q, _run(q)) is not None) == taken, fmt
  # another dtype than the scales': XLA's product promotes it, so it stays there
  q = _weight(spec, "int4:g32")
  assert _kernel_layout(eq, x.astype(jnp.bfloat16), q, _run(q)) is None
  assert not fits(512, 200, 1, 4) and not fits(512, 256, 3, 8)  # no tile fits them


SHARDED = {  # name: (weight spec, equation, mesh, x shape)
    "q": (P.linear((256, 8, 64), ("embed", "q_heads", "head_dim"), P.fan_in_init(1),
                   contract=("embed",)), "btd,dnh->btnh", "model:2", (2, 3, 256)),
    "o": LAYERS["o"][:2] + ("model:2", (2, 3, 4, 64)),
    "down": LAYERS["down"][:2] + ("model:2", (2, 3, 512)),
    "up": (P.linear((512, 512), ("embed", "mlp"), P.fan_in_init(1), contract=("embed",)),
           "btd,df->btf", "data:2,model:2", (2, 3, 512)),
    # 6,144 int4 columns pack in runs of 128; a shard's 3,072 alone would give runs of 64
    "up-wide": (P.linear((128, 6144), ("embed", "mlp"), P.fan_in_init(1), contract=("embed",)),
                "btd,df->btf", "model:2", (2, 3, 128)),
    # an LM head's columns split: 576 int4 packed columns a device, which lie K-minor: read in
    # tiles of 512 rows, the last partial
    "lm_head": (P.linear((128, 2304), ("embed", "vocab"), P.fan_in_init(1), contract=("embed",)),
                "btd,dv->btv", "model:2", (2, 3, 128)),
    # x's rows and the weight's embed over fsdp: x, the smaller, gathered; embed summed
    "up-fsdp": (P.linear((512, 512), ("embed", "mlp"), P.fan_in_init(1), contract=("embed",)),
                "btd,df->btf", "fsdp:2,model:2", (2, 3, 512)),
    # ... unless the weight is the smaller: gathered over fsdp, x's rows stay split
    "down-fsdp": (LAYERS["down"][0], "btf,fd->btd", "fsdp:2", (64, 16, 512)),
    # a tied embedding table as LM head (transposed): its rows over model, or its embed over
    # fsdp (x's rows gathered, the partial logits summed)
    "tied": (TIED(2304, 128), "btd,vd->btv", "model:2", (2, 3, 128)),
    "tied-fsdp": (TIED(2304, 512), "btd,vd->btv", "fsdp:2,model:2", (2, 3, 512)),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_the_kernel_runs_on_each_shard(name):
  """On a mesh that splits the weights (heads, MLP columns, or the contracted MLP rows and heads,
  whose partial products are summed over the model axis; rows of x over the data axis), each
  device's shard goes through the kernel, and the result is the XLA product of the whole weight
  within float32 rounding; where x's rows and the weight are split over one axis (FSDP), the
  smaller is gathered. Each shard is unpacked in the whole weight's runs. An int4 shard that
  would split a packed block, or values and scales split differently, stay on XLA's product."""
  from jaxinfer.quant.linear import _kernel_fn, _sharded
  from jaxinfer.sharding import make_mesh
  spec, eq, mesh, shape = SHARDED[name]
  axes = spec.axes
  kernel = WeightKernel(make_mesh(mesh), axes=axes)
  x = jax.random.normal(jax.random.key(1), shape)
  for fmt in ("int4:g32", "int8:g64"):
    q = _weight(spec, fmt)
    x_spec, *_, summed = _sharded(eq, x, q, kernel, _run(q))
    want = {"o": ("model",), "down": ("model",), "up-fsdp": ("fsdp",),
            "tied-fsdp": ("fsdp",)}.get(name, ())
    assert summed == want and (x_spec[0] == "fsdp") == (name == "down-fsdp"), (x_spec, summed)
    got = jax.jit(_kernel_fn(eq, x, q, kernel, interpret=True))(x, q)
    want = jnp.einsum(eq, x, quant.dequantize(q))
    half = lambda a, axis: jax.lax.slice_in_dim(a, 0, a.shape[axis] // 2, axis=axis)
    if name in ("q", "lm_head"):  # a device's 4 q heads, or 576 int4 LM head columns: K-minor
      axis = 1 if name == "q" else -1
      local = q.replace(qvalue=half(q.qvalue, axis), scale=half(q.scale, axis))
      heads = 4 if name == "q" else 1 if fmt.startswith("int4") else None  # (int8: 1,152 cols)
      assert _kernel_layout(eq, x, local, _run(q)).heads == heads, fmt
    if name.startswith("tied"):
      assert _kernel_fn(eq, x, q, kernel) is not None, fmt
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  if name == "up":  # 512 int4 columns in blocks of 256: four shards of 128 would split them
    q = _weight(spec, "int4:g32")
    assert _sharded(eq, x, q, WeightKernel(make_mesh("model:4"), axes=axes), _run(q)) is None
    assert _sharded(eq, x, _weight(spec, "int8:g32"), WeightKernel(make_mesh("model:4"),
                                                                   axes=axes), None) is not None


def test_gradients_through_the_kernel_are_xlas():
  """Differentiating a model that takes the kernel (a Pallas runtime) works on every platform:
  the gradients to the input and the scales are XLA's product's (within the forward's rounding);
  off a TPU they are XLA's bit for bit."""
  spec, eq, shape = LAYERS["o"]
  q = _weight(spec, "int4:g32")
  x = jax.random.normal(jax.random.key(1), shape)

  def grads(fn):
    loss = lambda x, s: jnp.sum(jnp.sin(fn(x, q.replace(scale=s))))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, q.scale)

  want = grads(lambda x, q: linear(eq, x, q))
  here = grads(lambda x, q: linear(eq, x, q, WeightKernel()))
  kernel = grads(lambda x, q: _through_kernel(eq, x, q, interpret=True))
  for w, h, k in zip(want, here, kernel):
    np.testing.assert_array_equal(np.asarray(h), np.asarray(w))
    np.testing.assert_allclose(np.asarray(k), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_bad_values_are_refused():
  x = jnp.zeros((8, 512))
  scale = jnp.ones((1, 512))
  with pytest.raises(ValueError, match=r"4-bit values .* must be \(512, 256\) uint8"):
    quantized_matmul(x, jnp.zeros((512, 512), jnp.int8), scale, bits=4, interpret=True)
  with pytest.raises(ValueError, match="no TPU tile fits"):
    quantized_matmul(jnp.zeros((8, 512)), jnp.zeros((512, 100), jnp.uint8),
                     jnp.ones((1, 200)), bits=4, interpret=True)
  with pytest.raises(ValueError, match=r"in heads take scales \(G, H, D\); got scale \(4, 512\)"):
    quantized_matmul(x, jnp.zeros((512, 2, 128), jnp.uint8), jnp.ones((4, 512)), bits=4)
  with pytest.raises(ValueError, match="no TPU tile fits a .* in 2 heads"):  # groups of 16
    quantized_matmul(x, jnp.zeros((512, 2, 64), jnp.uint8), jnp.ones((32, 2, 128)), bits=4)
  with pytest.raises(ValueError, match=r"4-bit values .* \(300, 256\) uint8; got scale "
                                       r"\(300, 4\), values \(256, 300\)"):
    quantized_matmul_t(x, jnp.zeros((256, 300), jnp.uint8), jnp.ones((300, 4)), bits=4)
  with pytest.raises(ValueError, match=r"no TPU tile fits an \(300, 512\) table"):
    quantized_matmul_t(x, jnp.zeros((300, 512), jnp.int8), jnp.ones((300, 32)), bits=8)  # g16
  assert fits_t(16384, 1024, 128, 4) and not fits_t(1 << 17, 1024, 1024, 8)  # (VMEM)


@pytest.mark.parametrize("name", ["v5e:2x2", "v6e:2x2"])
def test_every_weight_it_accepts_compiles(tpu_device, no_persistent_cache, name):
  """`fits` is the kernel's contract: group sizes whose tiles are not a multiple of 128 lanes of
  x (8, 24) or whose whole-K tiles would not fit in VMEM (512 on v5e, at 256 prefill rows) get
  other tiles or are refused, and whatever it accepts compiles."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(name))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  accepted = 0
  for (k, n), group, bits in [((4096, 14336), 8, 4), ((3072, 8192), 24, 4), ((4096, 14336), 512, 4),
                               ((4096, 1024), 1024, 4), ((4096, 14336), 2, 8), ((14336, 4096), 1024, 8)]:
    if not fits(k, n, k // group, bits):
      continue
    accepted += 1
    values = sds((k, n // 2), jnp.uint8) if bits == 4 else sds((k, n), jnp.int8)
    jax.jit(lambda x, v, s: quantized_matmul(x, v, s, bits=bits)).lower(
        sds((256, k), jnp.bfloat16), values, sds((k // group, n), jnp.bfloat16)).compile()
  assert accepted >= 4


@pytest.mark.parametrize("name", ["v5e:2x2", "v6e:2x2"])
def test_compiles_for_tpu_without_a_dequantized_weight(tpu_device, no_persistent_cache, name):
  """Llama-3-8B's MLP up (4096 x 14336) and down projections in int4 groups of 128 (decode's 8
  rows; 512 prefill rows, two blocks) and per-channel int8: libtpu compiles the Mosaic kernel,
  and the program's temporaries hold no weight-sized array. XLA's own product of the grouped
  weight holds the bfloat16 weight (or its scales broadcast to its shape): 112 MiB. So does a
  (4096, 16,032) int4 weight in runs of 16 in this two-axis form (a partial last tile; an
  eighth of Llama-3's LM head, which lies K-minor and takes the heads form, below)."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(name))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  cases = [(8, 4096, 14336, 4, 32, None), (512, 14336, 4096, 4, 112, None),
           (8, 4096, 14336, 8, 1, None), (256, 4096, 14336, 8, 64, None),
           (8, 4096, 16032, 4, 32, 16)]
  for rows, k, n, bits, groups, run in cases:
    values = sds((k, n // 2), jnp.uint8) if bits == 4 else sds((k, n), jnp.int8)
    args = (sds((rows, k), jnp.bfloat16), values, sds((groups, n), jnp.bfloat16))
    compiled = jax.jit(lambda x, v, s: quantized_matmul(x, v, s, bits=bits, run=run)).lower(
        *args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20, (rows, k, n, bits)
  xla = jax.jit(lambda x, v, s: quantized_matmul_reference(x, v, s, bits=4)).lower(
      sds((8, 4096), jnp.bfloat16), sds((4096, 7168), jnp.uint8),
      sds((32, 14336), jnp.bfloat16)).compile()
  assert xla.memory_analysis().temp_size_in_bytes >= 4096 * 14336 * 2


@pytest.mark.parametrize("name", ["v5e:2x2", "v6e:2x2"])
def test_values_in_heads_compile_without_a_copy(tpu_device, no_persistent_cache, name):
  """Llama-3-8B's q (32 heads) and k (8; one, as a model:8 shard) in int4 groups of 128, an
  eighth of its int4 LM head (8,016 packed columns), and a 70B-sized q (64 heads) in groups of
  32 (one program of 64 heads ran out of VMEM): XLA lays such values
  out K-minor, so flattening them to the (K, N) form copies the weight in every step; the
  heads form reads them as they lie: no copy of the values, no weight-sized temporary, decode
  and prefill rows. So does int8 q in heads of 128, which lies row-major."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(name))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  copied = lambda hlo: "".join(line for line in hlo.splitlines() if " copy(" in line)
  for rows, heads, words, run, groups in [(8, 32, 64, 64, 32), (8, 1, 64, 64, 32),
                                          (512, 8, 64, 64, 32), (8, 1, 8016, 16, 32),
                                          (8, 64, 64, 64, 128)]:  # (64 heads of g32: 2 x 32)
    d = 2 * words
    args = (sds((rows, 4096), jnp.bfloat16), sds((4096, heads, words), jnp.uint8),
            sds((groups, heads, d), jnp.bfloat16))
    compiled = jax.jit(lambda x, v, s: quantized_matmul(x, v, s, bits=4, run=run)).lower(
        *args).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and " u8[" not in copied(hlo), (rows, heads, words)
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20, (rows, heads, words)
  # int8 heads of 128 lie row-major: read per head, no copy either (32 heads: Llama-3-8B's q)
  compiled = jax.jit(lambda x, v, s: quantized_matmul(x, v, s, bits=8)).lower(
      sds((8, 4096), jnp.bfloat16), sds((4096, 32, 128), jnp.int8),
      sds((32, 32, 128), jnp.bfloat16)).compile()
  assert " s8[" not in copied(compiled.as_text())
  assert compiled.memory_analysis().temp_size_in_bytes < 2**20
  flat = jax.jit(lambda x, v, s: quantized_matmul(x, v, s, bits=4, run=16)).lower(
      sds((8, 4096), jnp.bfloat16), sds((4096, 8016), jnp.uint8),
      sds((32, 16032), jnp.bfloat16)).compile()
  assert "u8[4096,8016]" in copied(flat.as_text())  # the two-axis form: copied K-major


@pytest.mark.parametrize("name", ["v5e:2x2", "v6e:2x2"])
def test_a_tied_table_compiles_without_a_copy(tpu_device, no_persistent_cache, name):
  """Llama-3.2-1B's tied embedding table (128,256 x 2,048) as its LM head, in int4 groups of
  128, per-channel int4 and int8 groups of 128: the transposed form reads the values as they
  lie (row-major, D along the lanes) and the scales, which lie (G, V), as (G, V): no copy, no
  table-sized temporary. XLA's product of the dequantized table holds 1.7 GiB (int4)."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(name))
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  v, d = 128256, 2048
  x = sds((8, d), jnp.bfloat16)
  for bits, groups in ((4, 16), (4, 1), (8, 16)):
    values = sds((v, d // 2), jnp.uint8) if bits == 4 else sds((v, d), jnp.int8)
    compiled = jax.jit(lambda x, w, s: quantized_matmul_t(
        x, w, s, bits=bits, out_dtype=jnp.float32)).lower(
            x, values, sds((v, groups), jnp.bfloat16)).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and " copy(" not in hlo, (bits, groups)
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20, (bits, groups)
  if name == "v5e:2x2":
    xla = jax.jit(lambda x, w, s: quantized_matmul_t_reference(x, w, s, bits=4)).lower(
            x, sds((v, d // 2), jnp.uint8), sds((v, 16), jnp.bfloat16)).compile()
    assert xla.memory_analysis().temp_size_in_bytes >= v * d * 2


@pytest.mark.parametrize("mesh", ["data:4", "model:2"])
def test_the_engine_steps_take_it_for_grouped_weights(tmp_path, no_persistent_cache, mesh):
  """`jaxinfer compile --implementation=pallas --quantize=int4:g32` for a TPU, one device per
  replica or the weights split over two: each of a layer's seven grouped weights (q, k, v, o,
  gate, up, down) and the LM head (`--quantize_include=lm_head`; on one device a model that ties
  it to its embeddings, `--quantize_include=embed`: the transposed form) is one more Mosaic
  kernel in every step than without quantization (per-channel
  weights, which XLA fuses, stay on XLA: tested above), and split int4 weights unpack on each
  device alone, through the kernel or XLA: the steps' collectives move no more than with float
  weights (packed across the whole last axis, gate and up moved their values between devices
  every step)."""
  config = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                model_type="llama", torch_dtype="bfloat16", tie_word_embeddings=mesh == "data:4")
  (tmp_path / "config.json").write_text(json.dumps(config))
  impls = ["pallas"] + (["xla"] if mesh == "model:2" else [])
  include = ("embed",) if config["tie_word_embeddings"] else ("lm_head",)
  steps = {(fmt, impl): aot.run(aot.CompileJob(
      "tpu:v5e:2x2", model=str(tmp_path), mesh=mesh, batch_size=4, kv_pages=64,
      implementation=impl, quantize=fmt, quantize_include=include if fmt else ())).steps
      for fmt in (None, "int4:g32") for impl in impls}
  kernels = {fmt: [s.kernels for s in steps[fmt, "pallas"]] for fmt in (None, "int4:g32")}
  assert kernels["int4:g32"] == [k + 7 * 2 + 1 for k in kernels[None]], kernels
  for impl in impls:
    for plain, int4 in zip(steps[None, impl], steps["int4:g32", impl]):
      assert int4.collective_bytes <= plain.collective_bytes, (impl, plain, int4)
