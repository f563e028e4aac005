"""Paged decode and tree-verification kernels in the form each target compiles: the Mosaic TPU
form's numerics in jax's TPU interpret mode (DMAs and semaphores modelled), its compilation by
libtpu for real TPU topologies at serving shapes, the Triton form's lowering for CUDA, and the
choice of form made by the platform being lowered for, not by this CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.common import gpu_target
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.tree_attention import (pack_ancestors, tree_attention,
                                           tree_attention_reference)

PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8]  # a 10-node tree: T*G = 40 rows, not a power of two


def _pools(k, pool, ps, h, dtype, seed=0, poison=None):
  ks = jax.random.split(jax.random.key(seed), 2)
  kp = jax.random.normal(ks[0], (k, pool, ps, h)).astype(dtype)
  vp = jax.random.normal(ks[1], (k, pool, ps, h)).astype(dtype)
  if poison is not None:  # pages that must never be read
    bad = jnp.asarray(poison)[None, :, None, None]
    return kp, vp, jnp.where(bad, jnp.nan, kp), jnp.where(bad, jnp.nan, vp)
  return kp, vp, kp, vp


def _table(b, m, pool, seed=0):
  return jnp.asarray(np.random.RandomState(seed).permutation(pool)[:b * m].reshape(b, m),
                     jnp.int32)


def _unread(table, ends, ps, pool, first_visible):
  """Pool pages that no sequence reads: beyond its end, or wholly before its window."""
  read = np.zeros(pool, bool)
  for row, end, lo in zip(np.asarray(table), ends, first_visible):
    for j, page in enumerate(row):
      if j * ps < end and (j + 1) * ps > lo:
        read[page] = True
  return ~read


# block_pages=2 makes every sequence span several double-buffered DMA blocks.
@pytest.mark.parametrize("dtype,n,k,ps,window,sinks,splits", [
    (jnp.float32, 8, 2, 16, None, 0, None),
    (jnp.float32, 6, 6, 32, 40, 3, 2),
    (jnp.bfloat16, 12, 4, 16, 50, 0, None),
])
def test_tpu_form_paged_decode_matches_reference(dtype, n, k, ps, window, sinks, splits):
  b, h, m, pool = 3, 128, 8, 40
  table = _table(b, m, pool)
  lengths = np.array([1, 70, m * ps])
  lo = lengths - window if window else np.zeros(b)
  poison = _unread(table, lengths, ps, pool, lo)
  if sinks:
    poison[np.asarray(table)[:, 0]] = False
  q = jax.random.normal(jax.random.key(1), (b, n, h)).astype(dtype)
  kp, vp, kbad, vbad = _pools(k, pool, ps, h, dtype, poison=poison)
  kw = dict(window=window, sinks=sinks)
  out = paged_attention(q, kbad, vbad, jnp.asarray(lengths), table, num_splits=splits,
                        backend="tpu", interpret=True, block_pages=2, **kw)
  ref = paged_attention_reference(q, kp, vp, jnp.asarray(lengths), table, **kw)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol,
                             rtol=tol)


@pytest.mark.parametrize("window,sinks", [(None, 0), (40, 3)])
def test_tpu_form_tree_verification_matches_reference(window, sinks):
  """Ragged trees at batch 3; with a window, pages outside it (but the sinks') are poisoned."""
  b, n, k, h, ps, m, pool = 3, 8, 2, 128, 16, 12, 40
  parents = jnp.asarray([PARENTS, PARENTS[:5] + [0] * 5, [-1] + list(range(9))])
  mask = pack_ancestors(parents)
  t = len(PARENTS)
  prefix = np.array([0, 50, 150])
  table = _table(b, m, pool)
  poison = None
  if window:  # the root sees the earliest prefix position, prefix - window + 1
    poison = _unread(table, prefix + t, ps, pool, prefix - window + 1)
    poison[np.asarray(table)[:, 0]] = False
  q = jax.random.normal(jax.random.key(2), (b, t, n, h))
  kp, vp, kbad, vbad = _pools(k, pool, ps, h, jnp.float32, poison=poison)
  kw = dict(window=window, sinks=sinks)
  ref = tree_attention_reference(q, kp, vp, jnp.asarray(prefix), table, mask, **kw)
  out = tree_attention(q, kbad, vbad, jnp.asarray(prefix), table, mask, backend="tpu",
                       interpret=True, block_pages=2, **kw)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_tpu_form_has_no_races_on_two_cores():
  """jax's race detector over the double-buffered DMAs, with the grid split over two cores."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  from jax.experimental.pallas import tpu as pltpu
  b, n, k, h, ps, m, pool = 2, 8, 2, 128, 16, 8, 20
  table = _table(b, m, pool)
  q = jax.random.normal(jax.random.key(4), (b, n, h))
  kp, vp, _, _ = _pools(k, pool, ps, h, jnp.float32)
  lengths = jnp.array([37, 128])
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  out = paged_attention(q, kp, vp, lengths, table, backend="tpu", interpret=params,
                        block_pages=2)
  np.testing.assert_allclose(out, paged_attention_reference(q, kp, vp, lengths, table),
                             atol=2e-5, rtol=2e-5)
  assert interpret_pallas_call.races is not None
  assert not interpret_pallas_call.races.races_found


# Serving shapes: batch 64, head_dim 128, 8k context, GQA 32/8, a pool of >= 4096 pages.
B, N, K, H, CONTEXT = 64, 32, 8, 128, 8192


def _paged_args(ps, dtype, sharding=None):
  m = CONTEXT // ps
  pool = max(4096, B * m)
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  return (s((B, N, H), dtype), s((K, pool, ps, H), dtype), s((K, pool, ps, H), dtype),
          s((B,), jnp.int32), s((B, m), jnp.int32))


def _tree_args(ps, dtype, t, sharding=None):
  q, kp, vp, ends, table = _paged_args(ps, dtype, sharding)
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  return (s((B, t, N, H), dtype), kp, vp, ends, table, s((B, t, -(-t // 32)), jnp.int32))


def _paged(**kw):
  return jax.jit(lambda q, k, v, lengths, table: paged_attention(q, k, v, lengths, table, **kw))


def _tree(**kw):
  return jax.jit(lambda q, k, v, prefix, table, mask: tree_attention(q, k, v, prefix, table,
                                                                      mask, **kw))


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("ps,dtype", [(16, jnp.bfloat16), (64, jnp.float32)])
def test_libtpu_compiles_both_kernels_at_serving_shapes(tpu_device, no_persistent_cache, topology,
                                                        ps, dtype):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(topology))
  for fn, args in [(_paged(), _paged_args(ps, dtype, sharding)),
                   (_paged(window=1024, sinks=4), _paged_args(ps, dtype, sharding)),
                   (_tree(), _tree_args(ps, dtype, 64, sharding)),
                   (_tree(window=1024, sinks=4), _tree_args(ps, dtype, 64, sharding))]:
    compiled = fn.lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    # The pools stay in HBM: nothing pool-sized is allocated beside the arguments.
    pool_bytes = args[1].size * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes


def test_libtpu_compiles_tiny_model_shapes(tpu_device, no_persistent_cache):
  """The test models' head_dim 16 and odd GQA ratios compile too."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device("v5e:2x2"))
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  for n, k, dtype in [(6, 2, jnp.float32), (7, 7, jnp.bfloat16)]:
    pools = (s((k, 64, 16, 16), dtype),) * 2
    _paged().lower(s((4, n, 16), dtype), *pools, s((4,), jnp.int32), s((4, 8), jnp.int32)).compile()
    _tree(window=32).lower(s((4, 10, n, 16), dtype), *pools, s((4,), jnp.int32),
                           s((4, 8), jnp.int32), s((4, 10, 1), jnp.int32)).compile()


@pytest.mark.parametrize("t", [10, 64])
def test_triton_form_lowers_for_cuda(t):
  """Explicit Triton params (jax 0.10 would otherwise pick Mosaic GPU); rows and mask words
  padded to powers of two (10 nodes x 4 heads = 40 rows)."""
  for fn, args in [(_paged(), _paged_args(16, jnp.bfloat16)),
                   (_tree(window=1024, sinks=4), _tree_args(16, jnp.bfloat16, t))]:
    with gpu_target():
      text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" not in text


def test_the_target_platform_decides_the_form_not_the_host():
  args = _paged_args(16, jnp.float32)
  triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = {p: export.export(_paged(), platforms=(p,))(*args).mlir_module()
              for p in ("tpu", "cpu")}
  with gpu_target():
    exported["cuda"] = export.export(_paged(), platforms=("cuda",), disabled_checks=triton)(
        *args).mlir_module()
  assert "tpu_custom_call" in exported["tpu"] and "triton" not in exported["tpu"]
  assert "triton" in exported["cuda"] and "tpu_custom_call" not in exported["cuda"]
  assert "custom_call" not in exported["cpu"]  # interpreted: plain HLO loops
  with pytest.raises(ValueError, match="kernel backend"):
    paged_attention(jnp.zeros((1, 2, 8)), jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 8)),
                    jnp.array([3]), jnp.zeros((1, 2), jnp.int32), backend="triton")


def _kernel_dots(fn, *args):
  """(M, K, N) of every dot_general inside the Pallas kernels that fn(*args) traces."""
  def sub_jaxprs(value):
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(getattr(v, "jaxpr", None), "eqns"):
        yield v.jaxpr

  def walk(jaxpr, in_kernel):
    for eqn in jaxpr.eqns:
      if in_kernel and eqn.primitive.name == "dot_general":
        (ca,), (cb,) = eqn.params["dimension_numbers"][0]
        a, b = (x.aval.shape for x in eqn.invars)
        yield a[1 - ca], a[ca], b[1 - cb]
      for value in eqn.params.values():
        for sub in sub_jaxprs(value):
          yield from walk(sub, in_kernel or eqn.primitive.name == "pallas_call")

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr, False))


def _triton_dots(ps: int, h: int, block: int) -> dict:
  """The dots of each kernel's compiled Triton form (traced on this host): paged and tree over
  pages of ps keys, head dim h; block-sparse forward and backward with block x block tiles."""
  from pallas_kernels.block_sparse_attention import block_sparse_attention, mask_info, masks
  gpu = dict(backend="gpu", interpret=False)
  s = jax.ShapeDtypeStruct
  b, n, k, m, t = 2, 4, 2, 6, 3 * block
  pools = (s((k, b * m, ps, h), jnp.float32),) * 2
  paged = (s((b, n, h), jnp.float32), *pools, s((b,), jnp.int32), s((b, m), jnp.int32))
  tree = (s((b, 5, n, h), jnp.float32), *pools, s((b,), jnp.int32), s((b, m), jnp.int32),
          s((b, 5, 1), jnp.int32))
  info = mask_info(masks.Causal((t, t)), block, block)
  loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, info, **gpu))
  qkv = (s((1, 4, t, h), jnp.float32),) + (s((1, 2, t, h), jnp.float32),) * 2
  return {"paged": _kernel_dots(lambda *a: paged_attention(*a, **gpu), *paged),
          "tree": _kernel_dots(lambda *a: tree_attention(*a, **gpu), *tree),
          "block-sparse": _kernel_dots(jax.grad(loss, argnums=(0, 1, 2)), *qkv)}


def test_triton_form_dots_are_at_least_16_wide():
  """Triton's dot needs M, N, K >= 16 and jax's lowering does not check (on an H200 a
  (16, 4) x (4, 16) product compiled and came out summed twice): at test-sized shapes (pages of
  4 keys, head dim 8, 8-wide blocks) the compiled Triton forms multiply elementwise instead; from
  16 on they keep Triton's dot (2 per page or block forward, 3 in dQ, 4 in dK/dV)."""
  for name, dots in _triton_dots(ps=4, h=8, block=8).items():
    assert all(min(d) >= 16 for d in dots), f"{name}: Triton dots {dots}"
  wide = _triton_dots(ps=16, h=16, block=16)
  assert {name: len(d) for name, d in wide.items()} == {"paged": 2, "tree": 2,
                                                         "block-sparse": 2 + 3 + 4}, wide
