"""Sampling filters against hand-computed distributions, and draws against those distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.sampling import SamplingParams, argmax, sample, target_probs, validate

PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def _dist(**kw):
  sp = SamplingParams.make(1, **{"temperature": 1.0, **kw})
  return np.asarray(target_probs(LOGITS, sp))[0]


def test_argmax_picks_the_same_index_as_jnp_argmax():
  rng = np.random.RandomState(0)
  x = rng.randint(-3, 3, (6, 5, 40)).astype(np.float32)  # many ties: the first maximum wins
  x[0, 0] = -np.inf
  x[0, 1, 7] = x[0, 1, 30] = np.nan  # the first NaN wins, as in jnp.argmax
  x[0, 2, 3] = np.inf
  got = jax.jit(argmax)(jnp.asarray(x))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), -1)))
  assert int(got[0, 1]) == 7 and int(got[0, 2]) == 3 and int(got[0, 0]) == 0


def test_no_filter_is_softmax():
  np.testing.assert_allclose(_dist(), PROBS, rtol=1e-5)


def test_top_k():
  expected = np.array([0, 0.4, 0, 0.3, 0]) / 0.7
  np.testing.assert_allclose(_dist(top_k=2), expected, rtol=1e-5, atol=1e-7)


def test_top_p_keeps_smallest_prefix_reaching_p():
  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> mass before 0.15 is 0.7 < 0.75, before 0.1 is 0.85
  expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
  np.testing.assert_allclose(_dist(top_p=0.75), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_dist(top_p=0.7), np.array([0, 0.4, 0, 0.3, 0]) / 0.7, rtol=1e-5,
                             atol=1e-7)
  # top_p below the top token's mass keeps exactly the top token
  np.testing.assert_allclose(_dist(top_p=0.01), [0, 1, 0, 0, 0], atol=1e-7)


def test_min_p_is_relative_to_the_top_probability():
  # threshold 0.5 * 0.4 = 0.2 keeps 0.4 and 0.3
  np.testing.assert_allclose(_dist(min_p=0.5), np.array([0, 0.4, 0, 0.3, 0]) / 0.7, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(_dist(min_p=0.25), np.array([0, 0.4, 0.1, 0.3, 0.15]) / 0.95,
                             rtol=1e-5, atol=1e-7)


def test_temperature_then_top_k_then_top_p():
  t = 0.5
  sharp = PROBS**(1 / t) / np.sum(PROBS**(1 / t))
  kept = np.argsort(-sharp)[:3]  # top_k=3
  renorm = np.zeros(5)
  renorm[kept] = sharp[kept] / sharp[kept].sum()
  # top_p over the renormalised top-3 set
  order = np.argsort(-renorm)
  cum_before = np.cumsum(renorm[order]) - renorm[order]
  keep = order[cum_before < 0.9]
  expected = np.zeros(5)
  expected[keep] = renorm[keep] / renorm[keep].sum()
  np.testing.assert_allclose(_dist(temperature=t, top_k=3, top_p=0.9), expected, rtol=1e-5,
                             atol=1e-7)


def test_greedy_rows_take_the_argmax_and_rows_are_independent():
  logits = jnp.stack([LOGITS[0], LOGITS[0][::-1]])
  sp = SamplingParams(temperature=jnp.array([0.0, 0.0]), top_k=jnp.zeros(2, jnp.int32),
                      top_p=jnp.ones(2), min_p=jnp.zeros(2))
  keys = jax.random.split(jax.random.key(0), 2)
  assert sample(logits, sp, keys).tolist() == [1, 3]
  # a greedy row stays greedy when its neighbour samples
  mixed = sp.replace(temperature=jnp.array([0.0, 1.0]))
  for seed in range(20):
    keys = jax.random.split(jax.random.key(seed), 2)
    assert int(sample(logits, mixed, keys)[0]) == 1


def test_samples_follow_the_filtered_distribution():
  n = 20000
  sp = SamplingParams.make(n, temperature=0.8, top_k=4, top_p=0.9, min_p=0.1)
  logits = jnp.broadcast_to(LOGITS, (n, 5))
  keys = jax.random.split(jax.random.key(42), n)
  draws = np.asarray(sample(logits, sp, keys))
  expected = np.asarray(target_probs(LOGITS, SamplingParams.make(1, 0.8, 4, 0.9, 0.1)))[0]
  counts = np.bincount(draws, minlength=5)
  assert counts[expected == 0].sum() == 0  # filtered tokens never drawn
  support = expected > 0
  chi2 = np.sum((counts[support] - n * expected[support])**2 / (n * expected[support]))
  assert chi2 < 20.0, (counts, n * expected)  # p < 0.001 for <= 4 degrees of freedom


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-5, 5, width=32, allow_subnormal=False), min_size=2,
                      max_size=12),
       top_k=st.integers(0, 12), top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 1.0),
       temperature=st.floats(0.1, 3.0))
def test_filtered_distribution_properties(logits, top_k, top_p, min_p, temperature):
  logits = np.asarray(logits, np.float32)
  x = jnp.asarray(logits)[None]
  p = np.asarray(target_probs(x, SamplingParams.make(1, temperature, top_k, top_p, min_p)))[0]
  assert abs(p.sum() - 1) < 1e-5
  assert p[logits == logits.max()].sum() > 0  # a most likely token always survives
  support = int((p > 0).sum())
  if top_k:
    assert support <= top_k
  kept, dropped = logits[p > 0], logits[p == 0]
  if len(dropped):
    assert kept.min() >= dropped.max()  # filters keep a top set


def test_validate_messages():
  assert validate(0.0, 0, 1.0, 0.0) == []
  problems = validate(-1.0, -2, 0.0, 1.5)
  assert len(problems) == 4 and "temperature" in problems[0] and "min_p" in problems[3]


def test_target_probs_keep_the_sorted_prefix_among_ties():
  """The kept set, read in the vocabulary's order, is the stable sort's prefix even when a filter
  cuts through tied logits (lower token ids first), with the probabilities the sorted order gives."""
  from jaxinfer.sampling import filtered_sorted
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randint(-2, 2, (6, 64)).astype(np.float32))
  x = x.at[5, :40].set(-jnp.inf)
  sp = SamplingParams(temperature=jnp.array([1.0, 0.7, 1.3, 1.0, 2.0, 1.0]),
                      top_k=jnp.array([5, 0, 17, 0, 3, 0], jnp.int32),
                      top_p=jnp.array([1.0, 0.3, 0.8, 1.0, 1.0, 1.0]),
                      min_p=jnp.array([0.0, 0.0, 0.0, 0.9, 0.0, 0.0]))
  logp, order = filtered_sorted(x, sp)
  rows = jnp.arange(6)[:, None]
  expected = np.asarray(jnp.zeros_like(logp).at[rows, order].set(jnp.exp(logp)))
  got = np.asarray(target_probs(x, sp))
  np.testing.assert_array_equal(got > 0, expected > 0)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
