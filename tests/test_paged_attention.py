"""Paged decode attention (Pallas, interpret mode on CPU) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.paged_attention import paged_attention, paged_attention_reference


def _inputs(b, n, k, h, pool, ps, max_pages, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, n, h)).astype(dtype)
  kp = jax.random.normal(ks[1], (k, pool, ps, h)).astype(dtype)
  vp = jax.random.normal(ks[2], (k, pool, ps, h)).astype(dtype)
  table = jnp.asarray(rng.permutation(pool)[:b * max_pages].reshape(b, max_pages), jnp.int32)
  return q, kp, vp, table


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), k=st.sampled_from([1, 2]),
       ps=st.sampled_from([2, 4, 8]), max_pages=st.integers(1, 6), splits=st.integers(1, 4),
       window=st.sampled_from([None, 1, 5]), sinks=st.sampled_from([0, 3]),
       seed=st.integers(0, 1000))
def test_matches_reference(b, groups, k, ps, max_pages, splits, window, sinks, seed):
  n, h = k * groups, 16
  q, kp, vp, table = _inputs(b, n, k, h, b * max_pages + 3, ps, max_pages, seed=seed)
  lengths = jnp.asarray(np.random.RandomState(seed).randint(1, max_pages * ps + 1, size=b))
  kw = dict(window=window, sinks=sinks if window else 0)
  out = paged_attention(q, kp, vp, lengths, table, num_splits=splits, **kw)
  ref = paged_attention_reference(q, kp, vp, lengths, table, **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_bfloat16_and_padded_rows():
  q, kp, vp, table = _inputs(2, 8, 2, 32, 12, 8, 6, jnp.bfloat16)
  lengths = jnp.array([5, 48])
  ref = paged_attention_reference(q, kp, vp, lengths, table)
  for min_rows in (1, 16):  # 16 rows is what the GPU (Triton) path pads G = 4 up to
    out = paged_attention(q, kp, vp, lengths, table, num_splits=3, min_rows=min_rows)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2,
                               rtol=3e-2)


def test_pages_outside_the_sequence_or_window_are_never_read():
  b, n, k, h, ps, max_pages = 2, 4, 2, 8, 4, 8
  q, kp, vp, table = _inputs(b, n, k, h, 40, ps, max_pages)
  lengths = jnp.array([10, 30])
  window, sinks = 6, 2
  read = np.zeros(40, bool)
  for i, length in enumerate(np.asarray(lengths)):
    needed = [p for p in range(max_pages) if p * ps < length and
              ((p + 1) * ps > length - window or p * ps < sinks)]
    read[np.asarray(table)[i, needed]] = True
  poison = jnp.asarray(~read)[None, :, None, None]
  out = paged_attention(q, jnp.where(poison, jnp.nan, kp), jnp.where(poison, jnp.nan, vp), lengths,
                        table, window=window, sinks=sinks, num_splits=3)
  assert bool(jnp.all(jnp.isfinite(out)))
  ref = paged_attention_reference(q, kp, vp, lengths, table, window=window, sinks=sinks)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_bad_shapes_are_refused():
  q, kp, vp, table = _inputs(2, 3, 2, 8, 8, 4, 2)
  with pytest.raises(ValueError, match="do not fit"):
    paged_attention(q, kp, vp, jnp.array([1, 2]), table)
  q, kp, vp, table = _inputs(2, 4, 2, 8, 8, 4, 2)
  with pytest.raises(ValueError, match="batch"):
    paged_attention(q, kp, vp, jnp.array([1, 2, 3]), table)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_a_page_id_past_the_pool_reads_its_last_page(backend):
  """A page table's id past the pool (a row that is not live: no write may land there) reads
  the pool's last page, as XLA's gather clamps, instead of memory past the pool."""
  q, kp, vp, table = _inputs(2, 4, 2, 16, 6, 8, 3)
  table = table.at[1, 1:].set(6)
  lengths = jnp.array([20, 24])
  out = paged_attention(q, kp, vp, lengths, table, backend=backend, interpret=True)
  ref = paged_attention_reference(q, kp, vp, lengths, table.at[1, 1:].set(5))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_stale_slots_past_a_sequence_never_reach_its_output():
  """Slots past a row's written end (a reused page's tail, where an earlier request's values
  lie, NaN or inf among them) and pages no row owns are read by no path: the references, both
  kernel forms and the model's XLA and Pallas paths give the clean pools' output."""
  from jaxinfer import attention
  from jaxinfer.kv_cache import LayerKV, TreeLayerKV
  from jaxinfer.sharding import DEFAULT_RULES
  from pallas_kernels.tree_attention import (pack_ancestors, tree_attention,
                                             tree_attention_reference)
  b, n, k, h, ps, m, pool, t = 2, 4, 2, 128, 16, 4, 10, 3
  q, kp, vp, table = _inputs(b, n, k, h, pool, ps, m, seed=3)
  qt = jax.random.normal(jax.random.key(9), (b, t, n, h))
  lengths, prefix = jnp.array([21, 50]), jnp.array([18, 47])  # a tree's end: prefix + t
  tree = pack_ancestors(jnp.array([[-1, 0, 0], [-1, 0, 1]]))
  stale = np.ones((pool, ps), bool)
  for row, end in zip(np.asarray(table), np.asarray(lengths)):
    stale.reshape(-1)[(row[:, None] * ps + np.arange(ps)).reshape(-1)[:end]] = False
  bad = lambda x: jnp.where(jnp.asarray(stale)[None, :, :, None], jnp.nan, x)
  kbad, vbad = bad(kp), bad(vp)
  kw = dict(atol=2e-5, rtol=2e-5)
  ref = paged_attention_reference(q, kp, vp, lengths, table)
  tref = tree_attention_reference(qt, kp, vp, prefix, table, tree)
  for backend in ("gpu", "tpu"):
    run = dict(backend=backend, interpret=True)
    np.testing.assert_allclose(paged_attention(q, kbad, vbad, lengths, table, **run), ref, **kw)
    np.testing.assert_allclose(tree_attention(qt, kbad, vbad, prefix, table, tree, **run), tref,
                               **kw)
  np.testing.assert_allclose(paged_attention_reference(q, kbad, vbad, lengths, table), ref, **kw)
  np.testing.assert_allclose(tree_attention_reference(qt, kbad, vbad, prefix, table, tree), tref,
                             **kw)
  ctx = dict(window=None, sinks=0, mesh=None, rules=DEFAULT_RULES)
  for impl in ("xla", "pallas"):
    cache = attention.get(impl).cache(q[:, None], LayerKV(kbad, vbad, table),
                                      (lengths - 1)[:, None], **ctx)
    np.testing.assert_allclose(cache[:, 0], ref, **kw)
    positions = prefix[:, None] + jnp.arange(t)
    verify = attention.get(impl).tree(qt, TreeLayerKV(kbad, vbad, table, prefix, tree),
                                      positions, **ctx)
    np.testing.assert_allclose(verify, tref, **kw)
