"""Block-sparse flash attention: the mask library, its block metadata, and the Pallas kernel
(interpret mode on CPU) against the jnp reference, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference, dense_mask,
                                                   mask_info, masks)
from pallas_kernels.block_sparse_attention.dynamic import (block_topk_mask_info,
                                                           vertical_slash_mask_info)
from pallas_kernels.block_sparse_attention.masks import _classify_dense

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {jnp.float32: dict(atol=1e-4, rtol=1e-4), jnp.bfloat16: dict(atol=1e-1, rtol=1e-1)}


def _qkv(b, n, k, t, s, h, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, n, t, h)).astype(dtype),
          jax.random.normal(ks[1], (b, k, s, h)).astype(dtype),
          jax.random.normal(ks[2], (b, k, s, h)).astype(dtype))


def _structured_masks(t, s):
  rng = np.random.RandomState(t * 1000 + s)
  docs = np.sort(rng.randint(0, 4, size=t)) if t == s else None
  out = [
      masks.Full((t, s)),
      masks.Causal((t, s)),
      masks.Causal((t, s), offset=0),
      masks.SlidingWindow((t, s), 7),
      masks.sinks_and_window((t, s), 3, 9),
      masks.Chunked((t, s), 10) & masks.Causal((t, s)),
      masks.Sinks((t, s), 5) | masks.SlidingWindow((t, s), 4),
      masks.Dense(rng.rand(t, s) < 0.3),
  ]
  if docs is not None:
    out.append(masks.Document(docs) & masks.Causal((t, s)))
  return out


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 70), s=st.integers(1, 70), bq=st.sampled_from([1, 4, 8, 16]),
       bk=st.sampled_from([2, 8, 16, 32]))
def test_metadata_rebuilds_the_dense_mask(t, s, bq, bk):
  for mask in _structured_masks(t, s):
    info = mask_info(mask, bq, bk)
    np.testing.assert_array_equal(info.to_dense()[0, 0], mask.dense(), err_msg=repr(mask)[:80])
    if isinstance(mask, masks.Dense):  # the traceable rebuild (slower: checked once per example)
      np.testing.assert_array_equal(np.asarray(dense_mask(info))[0, 0], mask.dense())
    # only non-empty blocks are listed; the padding repeats the last listed block
    nonempty = mask.classify(bq, bk) != masks.EMPTY
    assert (info.num_kv[0, 0] == nonempty.sum(1)).all()
    assert (info.num_q[0, 0] == nonempty.sum(0)).all()


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 60), s=st.integers(1, 60), bq=st.sampled_from([1, 3, 8, 16]),
       bk=st.sampled_from([1, 5, 8, 16]), window=st.integers(1, 20), sinks=st.integers(0, 12),
       chunk=st.integers(1, 20), offset=st.integers(-10, 30))
def test_analytic_block_classes_are_exact(t, s, bq, bk, window, sinks, chunk, offset):
  shape = (t, s)
  for mask in (masks.Causal(shape, offset), masks.SlidingWindow(shape, window, offset),
               masks.Sinks(shape, sinks), masks.Chunked(shape, chunk, offset),
               masks.Causal(shape, offset) & (masks.Sinks(shape, sinks)
                                              | masks.SlidingWindow(shape, window, offset))):
    nq, nk = -(-t // bq), -(-s // bk)
    exact = _classify_dense(mask, bq, bk, np.ones((nq, nk), bool))
    np.testing.assert_array_equal(mask.classify(bq, bk), exact, err_msg=repr(mask))


def test_partial_blocks_are_deduplicated_and_full_blocks_need_no_mask():
  info = mask_info(masks.Causal((512, 512)), 64, 64)
  assert info.blocks.shape == (1, 64, 64)  # every diagonal block is the same triangle
  assert (info.partial[0, 0][info.kv_indices[0, 0] < np.arange(8)[:, None]] == -1).all()
  assert info.density() == pytest.approx(36 / 64)
  with pytest.raises(ValueError, match="shapes differ"):
    masks.Causal((4, 4)) & masks.Causal((4, 5))


def test_duo_attention_heads_differ():
  mask = masks.duo_attention((64, 64), [True, False, False, True], num_sinks=4, window=8)
  info = mask_info(mask, 16, 16)
  assert info.kv_indices.shape[1] == 4
  dense = info.to_dense()[0]
  np.testing.assert_array_equal(dense[0], np.tril(np.ones((64, 64), bool)))
  np.testing.assert_array_equal(dense[1], masks.sinks_and_window((64, 64), 4, 8).dense())


CASES = [  # (batch, q heads, kv heads, q len, kv len, head dim, block_q, block_kv)
    (1, 2, 2, 64, 64, 16, 16, 16),
    (2, 4, 2, 48, 48, 8, 16, 8),
    (1, 6, 2, 40, 72, 16, 8, 16),
    (2, 4, 1, 33, 33, 32, 16, 16),
]


def _loss(fn, info, **kw):
  def loss(q, k, v):
    out = fn(q, k, v, info, **kw).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1))
  return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_forward_and_backward(case, dtype):
  b, n, kh, t, s, h, bq, bk = case
  q, k, v = _qkv(b, n, kh, t, s, h, dtype)
  rng = np.random.RandomState(t + s)
  for mask in (masks.Causal((t, s)), masks.sinks_and_window((t, s), 4, 11),
               masks.Dense(rng.rand(t, s) < 0.2)):
    info = mask_info(mask, bq, bk)
    out = block_sparse_attention(q, k, v, info)
    ref = block_sparse_attention_reference(q, k, v, info)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               **TOL[dtype])
    grads = jax.grad(_loss(block_sparse_attention, info), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(_loss(block_sparse_attention_reference, info), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                 **GRAD_TOL[dtype])


def test_segment_ids_and_per_head_masks():
  b, n, kh, t, h = 2, 4, 2, 40, 16
  q, k, v = _qkv(b, n, kh, t, t, h)
  seg = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 3, size=(b, t)), axis=1))
  info = mask_info(masks.duo_attention((t, t), [True, False, True, False], 2, 6), 8, 8)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
  out = block_sparse_attention(q, k, v, info, **kw)
  ref = block_sparse_attention_reference(q, k, v, info, **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  grads = jax.grad(_loss(block_sparse_attention, info, **kw), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(_loss(block_sparse_attention_reference, info, **kw), argnums=(0, 1, 2))(
      q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_empty_blocks_are_never_read():
  """Keys/values in blocks the mask leaves empty are NaN: one read would poison the output."""
  t, bk = 64, 16
  q, k, v = _qkv(1, 2, 2, t, t, 8)
  dense = np.tril(np.ones((t, t), bool))
  dense[:, 20:48] = False  # kv blocks 2 (32..47) is needed by no query; block 1 only partly
  info = mask_info(masks.Dense(dense), 16, bk)
  touched = np.zeros(t // bk, bool)
  touched[np.unique(info.kv_indices[0, 0][np.arange(info.max_kv_blocks)[None] <
                                           info.num_kv[0, 0][:, None]])] = True
  assert not touched.all()  # some kv block is never needed
  poison = jnp.asarray(np.repeat(~touched, bk))[None, None, :, None]
  kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  out = block_sparse_attention(q, kp, vp, info)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, block_sparse_attention_reference(q, k, v, info), atol=2e-5)


def test_rows_that_see_nothing_output_zero():
  t = 16
  q, k, v = _qkv(1, 1, 1, t, t, 8)
  dense = np.tril(np.ones((t, t), bool))
  dense[3] = False
  info = mask_info(masks.Dense(dense), 8, 8)
  out = block_sparse_attention(q, k, v, info)
  np.testing.assert_array_equal(np.asarray(out[0, 0, 3]), 0.0)
  np.testing.assert_allclose(out, block_sparse_attention_reference(q, k, v, info), atol=2e-5)


def test_bad_inputs_are_refused():
  q, k, v = _qkv(1, 3, 2, 16, 16, 8)
  info = mask_info(masks.Causal((16, 16)), 8, 8)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    block_sparse_attention(q, k, v, info)
  q, k, v = _qkv(1, 2, 2, 16, 16, 8)
  with pytest.raises(ValueError, match="mask is"):
    block_sparse_attention(q, k, v, mask_info(masks.Causal((8, 16)), 8, 8))


@pytest.mark.parametrize("builder", ["topk", "vertical_slash"])
def test_dynamic_masks_inside_jit(builder):
  b, n, kh, t, h, block = 2, 4, 2, 128, 16, 16
  q, k, v = _qkv(b, n, kh, t, t, h, seed=3)
  make = ((lambda q, k: block_topk_mask_info(q, k, block, top_k=2)) if builder == "topk" else
          (lambda q, k: vertical_slash_mask_info(q, k, block, num_vertical=6, num_slash=4,
                                                 last_q=16)))
  info = jax.jit(make)(q, k)
  dense = np.asarray(dense_mask(info))
  assert dense.shape == (b, n, t, t)  # per batch element and head
  causal = np.tril(np.ones((t, t), bool))
  assert (dense <= causal).all()
  assert all(np.diagonal(dense[i, j]).all() for i in range(b) for j in range(n))
  if builder == "topk":  # first block + diagonal + at most top_k others per q block row
    nb = t // block
    assert (np.asarray(info.num_kv) <= np.minimum(np.arange(nb) + 1, 4)[None, None]).all()
  run = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, make(q, k)))
  out = run(q, k, v)
  np.testing.assert_allclose(out, block_sparse_attention_reference(q, k, v, info), atol=2e-5,
                             rtol=2e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, make(q, k))**2),
                   argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(block_sparse_attention_reference(q, k, v, info)**2),
                 argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(g, r, atol=2e-4, rtol=2e-4)


def test_topk_picks_the_highest_pooled_scores():
  t, block, h = 64, 16, 8
  q = jnp.ones((1, 1, t, h))
  k = np.zeros((1, 1, t, h), np.float32)
  k[0, 0, 16:32] = 5.0  # kv block 1 dominates every pooled score
  info = block_topk_mask_info(q, jnp.asarray(k), block, top_k=1, num_sink_blocks=0,
                              num_local_blocks=1)
  rows = [sorted(set(np.asarray(info.kv_indices)[0, 0, i, :int(info.num_kv[0, 0, i])]))
          for i in range(4)]
  assert rows == [[0], [0, 1], [1, 2], [1, 3]]  # diagonal forced, plus the best other
  # no local block asked for: the diagonal is still kept beside the sink and the best (it was
  # cut off the end of a full row: rows 32-63 did not see themselves)
  info = block_topk_mask_info(q, jnp.asarray(k), block, top_k=1, num_sink_blocks=1,
                              num_local_blocks=0)
  rows = [sorted(set(np.asarray(info.kv_indices)[0, 0, i, :int(info.num_kv[0, 0, i])]))
          for i in range(4)]
  assert rows == [[0], [0, 1], [0, 1, 2], [0, 1, 3]]


@pytest.mark.parametrize("builder", ["topk", "vertical_slash"])
def test_dynamic_masks_of_padded_rows_read_their_real_tokens_only(builder):
  """With `lengths`, a row padded past its length (a prompt in a wider lane) gets the pattern of
  its real tokens over their blocks, whatever the padding holds: the estimate pools and reads
  real tokens only. Without, padding moves it."""
  b, n, kh, t, h, block, real = 2, 4, 2, 128, 16, 16, 72  # 4.5 blocks real
  make = ((lambda q, k, **kw: block_topk_mask_info(q, k, block, top_k=1, **kw))
          if builder == "topk" else
          (lambda q, k, **kw: vertical_slash_mask_info(q, k, block, num_vertical=3, num_slash=2,
                                                       last_q=16, **kw)))
  q, k, _ = _qkv(b, n, kh, t, t, h, seed=5)
  junk, junk_k, _ = _qkv(b, n, kh, t, t, h, seed=6)
  pad = lambda x, y: jnp.where(jnp.arange(t)[None, None, :, None] < real, x, 10 * y)
  lengths = jnp.full((b,), real, jnp.int32)
  masks_of = lambda info: np.asarray(dense_mask(info))[..., :real, :real]
  want = masks_of(make(pad(q, 0 * junk), pad(k, 0 * junk_k), lengths=lengths))
  got = masks_of(make(pad(q, junk), pad(k, junk_k), lengths=lengths))
  np.testing.assert_array_equal(got, want)
  assert got.sum() < b * n * np.tril(np.ones((real, real))).sum()  # (sparse)
  moved = masks_of(make(pad(q, junk), pad(k, junk_k)))
  assert (moved != want).any()
