"""Tree-verification attention (Pallas, interpret mode on CPU) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.tree_attention import (ancestor_matrix, pack_ancestors, tree_attention,
                                           tree_attention_reference, unpack_ancestors)


def _random_parents(rng, b, t):
  """Breadth-first-ish random trees: node j's parent is some earlier node."""
  parents = np.full((b, t), -1, np.int32)
  for j in range(1, t):
    parents[:, j] = rng.randint(0, j, size=b)
  return parents


def _inputs(rng, b, t, n, k, h, ps, max_pages, dtype=jnp.float32):
  pool = b * max_pages + 2
  keys = jax.random.split(jax.random.key(int(rng.randint(1 << 30))), 3)
  q = jax.random.normal(keys[0], (b, t, n, h)).astype(dtype)
  kp = jax.random.normal(keys[1], (k, pool, ps, h)).astype(dtype)
  vp = jax.random.normal(keys[2], (k, pool, ps, h)).astype(dtype)
  table = jnp.asarray(rng.permutation(pool)[:b * max_pages].reshape(b, max_pages), jnp.int32)
  prefix = jnp.asarray(rng.randint(0, max_pages * ps - t + 1, size=b), jnp.int32)
  return q, kp, vp, table, prefix


def test_ancestor_masks():
  parents = np.array([-1, 0, 0, 1, 1, 2, 3])
  anc = np.asarray(ancestor_matrix(jnp.asarray(parents)))
  assert anc[6].nonzero()[0].tolist() == [0, 1, 3, 6]
  assert anc[5].nonzero()[0].tolist() == [0, 2, 5]
  assert anc[0].nonzero()[0].tolist() == [0]
  big = _random_parents(np.random.RandomState(0), 2, 70)  # three mask words
  words = pack_ancestors(jnp.asarray(big))
  assert words.shape == (2, 70, 3) and words.dtype == jnp.int32
  np.testing.assert_array_equal(unpack_ancestors(words, 70), ancestor_matrix(jnp.asarray(big)))


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), t=st.sampled_from([1, 2, 5, 9, 33]), groups=st.sampled_from([1, 2]),
       k=st.sampled_from([1, 2]), ps=st.sampled_from([4, 8]), splits=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_matches_reference(b, t, groups, k, ps, splits, seed):
  rng = np.random.RandomState(seed)
  max_pages = -(-(t + 10) // ps) + 1
  q, kp, vp, table, prefix = _inputs(rng, b, t, k * groups, k, 16, ps, max_pages)
  mask = pack_ancestors(jnp.asarray(_random_parents(rng, b, t)))
  out = tree_attention(q, kp, vp, prefix, table, mask, num_splits=splits)
  ref = tree_attention_reference(q, kp, vp, prefix, table, mask)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_a_chain_is_causal_decode():
  """Chain token i sees the prefix and chain tokens 0..i: paged decode at length L + i + 1."""
  rng = np.random.RandomState(3)
  b, t, n, k, h, ps, m = 2, 4, 4, 2, 16, 4, 6
  q, kp, vp, table, prefix = _inputs(rng, b, t, n, k, h, ps, m)
  chain = jnp.asarray(np.arange(-1, t - 1)[None].repeat(b, 0))
  out = tree_attention(q, kp, vp, prefix, table, pack_ancestors(chain), num_splits=2)
  for i in range(t):
    ref = paged_attention_reference(q[:, i], kp, vp, prefix + i + 1, table)
    np.testing.assert_allclose(out[:, i], ref, atol=2e-5, rtol=2e-5)


def test_bfloat16_padded_rows_and_unread_pages():
  rng = np.random.RandomState(5)
  b, t, n, k, h, ps, m = 2, 5, 4, 2, 32, 8, 6
  q, kp, vp, table, _ = _inputs(rng, b, t, n, k, h, ps, m)
  prefix = jnp.array([3, 20])
  mask = pack_ancestors(jnp.asarray(_random_parents(rng, b, t)))
  read = np.zeros(kp.shape[1], bool)
  for i, length in enumerate(np.asarray(prefix) + t):
    read[np.asarray(table)[i, :-(-int(length) // ps)]] = True
  poison = jnp.asarray(~read)[None, :, None, None]
  ref = tree_attention_reference(q, kp, vp, prefix, table, mask)
  kp, vp = jnp.where(poison, jnp.nan, kp), jnp.where(poison, jnp.nan, vp)
  for min_rows in (1, 16):
    out = tree_attention(q, kp, vp, prefix, table, mask, num_splits=3, min_rows=min_rows)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, kp, vp))
  out = tree_attention(qb, kb, vb, prefix, table, mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2, rtol=3e-2)


def test_bad_shapes_are_refused():
  rng = np.random.RandomState(0)
  q, kp, vp, table, prefix = _inputs(rng, 2, 3, 2, 1, 8, 4, 3)
  with pytest.raises(ValueError, match="tree_mask must be"):
    tree_attention(q, kp, vp, prefix, table, jnp.zeros((2, 3, 2), jnp.int32))
  with pytest.raises(ValueError, match="do not match batch"):
    tree_attention(q, kp, vp, prefix[:1], table, jnp.zeros((2, 3, 1), jnp.int32))


@pytest.mark.parametrize("window,splits", [(5, 1), (9, 3), (20, 2)])
def test_sliding_window(window, splits):
  """With a sliding window, chain token i (position L + i) is causal decode at length L + i + 1
  over the window (the paged kernel's reference, independent of the tree code); random trees
  match the tree reference, whose prefix keys each token sees end at its own depth's window."""
  rng = np.random.RandomState(window)
  b, t, n, k, h, ps, m = 3, 5, 4, 2, 16, 4, 9
  q, kp, vp, table, _ = _inputs(rng, b, t, n, k, h, ps, m)
  prefix = jnp.array([0, 13, 30])  # no prefix, a window inside it, pages skipped before it
  chain = jnp.asarray(np.arange(-1, t - 1)[None].repeat(b, 0))
  out = tree_attention(q, kp, vp, prefix, table, pack_ancestors(chain), window=window,
                       num_splits=splits)
  for i in range(t):
    ref = paged_attention_reference(q[:, i], kp, vp, prefix + i + 1, table, window=window)
    np.testing.assert_allclose(out[:, i], ref, atol=2e-5, rtol=2e-5)
  mask = pack_ancestors(jnp.asarray(_random_parents(rng, b, t)))
  out = tree_attention(q, kp, vp, prefix, table, mask, window=window, num_splits=splits)
  ref = tree_attention_reference(q, kp, vp, prefix, table, mask, window=window)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  full = tree_attention_reference(q, kp, vp, prefix, table, mask)
  assert not np.allclose(ref[2], full[2])  # the window hid something
  with pytest.raises(ValueError, match="smaller than the tree"):
    tree_attention(q, kp, vp, prefix, table, mask, window=t - 1)


@pytest.mark.parametrize("sinks,window,splits", [(1, 6, 1), (4, 5, 2), (6, 9, 3)])
def test_sinks_and_window(sinks, window, splits):
  """StreamingLLM's sinks beside the window: a chain is causal decode over sinks + window (the
  paged kernel's reference), random trees match the tree reference, and pages holding neither
  a sink nor a windowed key are never read (NaN there changes nothing)."""
  rng = np.random.RandomState(sinks * 10 + window)
  b, t, n, k, h, ps, m = 3, 5, 4, 2, 16, 4, 12
  q, kp, vp, table, _ = _inputs(rng, b, t, n, k, h, ps, m)
  prefix = jnp.array([2, 17, 40])  # sinks overlapping the tree, inside the window, far before it
  chain = jnp.asarray(np.arange(-1, t - 1)[None].repeat(b, 0))
  out = tree_attention(q, kp, vp, prefix, table, pack_ancestors(chain), window=window,
                       sinks=sinks, num_splits=splits)
  for i in range(t):
    ref = paged_attention_reference(q[:, i], kp, vp, prefix + i + 1, table, window=window,
                                    sinks=sinks)
    np.testing.assert_allclose(out[:, i], ref, atol=2e-5, rtol=2e-5)
  mask = pack_ancestors(jnp.asarray(_random_parents(rng, b, t)))
  ref = tree_attention_reference(q, kp, vp, prefix, table, mask, window=window, sinks=sinks)
  windowed = tree_attention_reference(q, kp, vp, prefix, table, mask, window=window)
  assert not np.allclose(ref[2], windowed[2])  # the sinks were seen
  read = np.zeros(kp.shape[1], bool)  # the pages of sinks, of the earliest window, of the tree
  for i, length in enumerate(np.asarray(prefix)):
    lo = max(int(length) - window + 1, 0) // ps
    read[np.asarray(table)[i, :-(-sinks // ps)]] = True
    read[np.asarray(table)[i, lo:-(-(int(length) + t) // ps)]] = True
  poison = jnp.asarray(~read)[None, :, None, None]
  kp, vp = jnp.where(poison, jnp.nan, kp), jnp.where(poison, jnp.nan, vp)
  out = tree_attention(q, kp, vp, prefix, table, mask, window=window, sinks=sinks,
                       num_splits=splits)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="need a sliding window"):
    tree_attention(q, kp, vp, prefix, table, mask, sinks=2)


def test_the_reference_takes_bfloat16_at_serving_head_size():
  """The oracle in bfloat16 (head_dim 128, pages of 64): it failed on XLA:CPU ("Unsupported
  element type for DotThunk: BF16 x BF16 = F32"); it equals the float32 reference to bfloat16's
  rounding."""
  b, t, n, k, h, ps, m = 2, 9, 4, 2, 128, 64, 3
  keys = jax.random.split(jax.random.key(0), 3)
  kp, vp = (jax.random.normal(x, (k, b * m + 2, ps, h)) for x in keys[:2])
  q = jax.random.normal(keys[2], (b, t, n, h))
  table = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
  mask = pack_ancestors(jnp.asarray([list(range(-1, t - 1))] * b))
  prefix = jnp.array([5, 120])
  bf = lambda x: x.astype(jnp.bfloat16)
  half = tree_attention_reference(bf(q), bf(kp), bf(vp), prefix, table, mask)
  full = tree_attention_reference(q, kp, vp, prefix, table, mask)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=5e-2, rtol=5e-2)
