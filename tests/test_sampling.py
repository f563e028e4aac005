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
TARGET_PROBS = jax.jit(target_probs)
SAMPLE = jax.jit(sample)


def _dist(**kw):
  sp = SamplingParams.make(1, **{"temperature": 1.0, **kw})
  return np.asarray(TARGET_PROBS(LOGITS, sp))[0]


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
  assert SAMPLE(logits, sp, keys).tolist() == [1, 3]
  # a greedy row stays greedy when its neighbour samples
  mixed = sp.replace(temperature=jnp.array([0.0, 1.0]))
  for seed in range(20):
    keys = jax.random.split(jax.random.key(seed), 2)
    assert int(SAMPLE(logits, mixed, keys)[0]) == 1


def test_a_tiny_temperature_samples_the_argmax():
  """Down to the smallest normal float32 temperatures, a row samples its argmax (at 1e-37 the
  logits / T of 30 and 45 were infinite, their softmax NaN: token 0 was drawn, and the target
  probabilities of speculation were NaN)."""
  logits = jnp.asarray([[3.0, 1.0, 45.0, 44.0]])
  for t in (1e-3, 1e-20, 1e-37, 1.2e-38):
    sp = SamplingParams.make(1, temperature=t)
    assert int(SAMPLE(logits, sp, jax.random.split(jax.random.key(0), 1))[0]) == 2, t
    assert np.array_equal(np.asarray(TARGET_PROBS(logits, sp))[0], [0, 0, 1, 0]), t


def test_samples_follow_the_filtered_distribution():
  n = 20000
  sp = SamplingParams.make(n, temperature=0.8, top_k=4, top_p=0.9, min_p=0.1)
  logits = jnp.broadcast_to(LOGITS, (n, 5))
  keys = jax.random.split(jax.random.key(42), n)
  draws = np.asarray(SAMPLE(logits, sp, keys))
  expected = np.asarray(TARGET_PROBS(LOGITS, SamplingParams.make(1, 0.8, 4, 0.9, 0.1)))[0]
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
  x = np.full((1, 12), -np.inf, np.float32)  # one shape, one compilation; -inf never kept
  x[0, :len(logits)] = logits
  p = np.asarray(TARGET_PROBS(x, SamplingParams.make(1, temperature, top_k, top_p, min_p)))[0]
  assert not p[len(logits):].any()
  p = p[:len(logits)]
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


def _sorted_reference(x, sp):
  """The filters as a stable descending sort states them (top-p 1 keeps everything)."""
  scaled = np.asarray(x, np.float64) / np.where(sp.temperature > 0, sp.temperature, 1)[:, None]
  out = np.zeros_like(scaled)
  for b, row in enumerate(scaled):
    order = np.argsort(-row, kind="stable")
    k = int(sp.top_k[b]) or len(row)
    kept = order[:k][np.isfinite(row[order[:k]])]
    probs = np.exp(row[kept] - row[kept].max())
    probs /= probs.sum()
    if sp.top_p[b] < 1:
      probs = probs[:max(1, int(np.sum(np.cumsum(probs) - probs < sp.top_p[b])))]
    probs = probs[probs >= sp.min_p[b] * probs[0]]
    out[b, kept[:len(probs)]] = probs / probs.sum()
  return out


@pytest.mark.parametrize("ties", [True, False])
def test_target_probs_keep_the_stable_sorted_prefix(ties):
  """Filters found by bisection keep what a stable sort keeps, cut through tied logits too (lower
  token ids first), with -inf logits and every filter combined."""
  rng = np.random.RandomState(3)
  b, v = 48, 200
  x = rng.randint(-3, 3, (b, v)) if ties else rng.randn(b, v) * rng.uniform(0.2, 4, (b, 1))
  x = x.astype(np.float32)
  x[:4, :150] = -np.inf
  sp = SamplingParams(temperature=jnp.asarray(rng.uniform(0.2, 2, b), jnp.float32),
                      top_k=jnp.asarray(rng.randint(0, v + 5, b) * (rng.rand(b) < 0.7), jnp.int32),
                      top_p=jnp.asarray(np.where(rng.rand(b) < 0.3, 1, rng.uniform(0.05, 1, b)),
                                        jnp.float32),
                      min_p=jnp.asarray(np.where(rng.rand(b) < 0.6, 0, rng.uniform(0, 1, b)),
                                        jnp.float32))
  sp = jax.tree.map(np.asarray, sp)
  got = np.asarray(TARGET_PROBS(jnp.asarray(x), sp))
  expected = _sorted_reference(x, sp)
  np.testing.assert_array_equal(got > 0, expected > 0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_top_p_one_keeps_the_whole_tail():
  """top_p 1 disables the filter: tokens whose mass rounds away in float32 stay drawable."""
  x = jnp.concatenate([jnp.zeros((1, 1)), jnp.full((1, 99), -20.0)], axis=-1)
  assert int(np.sum(np.asarray(_dist_of(x, top_p=1.0)) > 0)) == 100


def _dist_of(x, **kw):
  return TARGET_PROBS(x, SamplingParams.make(x.shape[0], **{"temperature": 1.0, **kw}))[0]


def test_filters_sort_nothing():
  """Sampling and the speculative distributions filter by bisection: a TPU sorted the vocabulary
  with the rows on its lanes (~300 MiB of temporaries for 40 rows of Llama-3's vocabulary)."""
  from jaxinfer.sampling import distribution
  logits = jax.ShapeDtypeStruct((8, 5, 128256), jnp.float32)
  sp = SamplingParams.make(8, temperature=1.0)
  keys = jax.ShapeDtypeStruct((8,), jax.random.key(0).dtype)
  for hlo in (jax.jit(distribution).lower(logits, sp).as_text(),
              jax.jit(sample).lower(jax.ShapeDtypeStruct((8, 128256), jnp.float32), sp,
                                    keys).as_text()):
    assert "sort" not in hlo


def test_signed_zeros_tie():
  """-0.0 and 0.0 are one logit (a stable sort ties them): the lower token id is kept."""
  x = jnp.asarray([[-0.0, 0.0, -1.0]])
  np.testing.assert_array_equal(np.asarray(_dist_of(x, top_k=1)), [1, 0, 0])
