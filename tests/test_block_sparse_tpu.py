"""Block-sparse attention's Mosaic TPU form: numerics in jax's TPU interpret mode against the jnp
reference (forward and gradients), and proof that it compiles: libtpu's compile-only client
builds forward and backward for v5e and v6e at 8k tokens, and the Triton form still lowers for
CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (block_sparse_attention,
                                                   block_sparse_attention_reference, mask_info,
                                                   masks)
from pallas_kernels.block_sparse_attention.dynamic import block_topk_mask_info
from pallas_kernels.common import gpu_target
from test_block_sparse_attention import GRAD_TOL, TOL, _qkv

TPU = dict(backend="tpu", interpret=True)


def _loss(fn, info, **kw):
  def loss(q, k, v):
    out = fn(q, k, v, info, **kw).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1))
  return loss


def _tpu(q, k, v, info, **kw):
  return block_sparse_attention(q, k, v, info, **kw, **TPU)


def _run(fn, info, q, k, v, **kw):
  """fn's output and the gradients of its _loss, in one jitted computation."""
  grad = jax.grad(_loss(fn, info, **kw), argnums=(0, 1, 2))
  return jax.jit(lambda q, k, v: (fn(q, k, v, info, **kw), grad(q, k, v)))(q, k, v)


def _check(q, k, v, info, dtype=jnp.float32, **kw):
  """The TPU form's output and gradients equal the reference's; returns them."""
  out, grads = _run(_tpu, info, q, k, v, **kw)
  ref, ref_grads = _run(block_sparse_attention_reference, info, q, k, v, **kw)
  assert out.dtype == dtype
  for x, r, tol in zip((out, *grads), (ref, *ref_grads), (TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(r, np.float32),
                               **tol[dtype])
  return out, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_and_never_reads_empty_blocks(dtype):
  """GQA (2 q heads on 1 kv head), T 384 < S 512, sinks + causal window over 128-blocks: EMPTY,
  PARTIAL and FULL blocks, rows of different lengths (padding steps), and a last kv block no
  query needs. That block is NaN: one read would poison the output or the gradients."""
  t, s, bk = 384, 512, 128
  shape = (t, s)
  mask = masks.Causal(shape, 0) & (masks.Sinks(shape, 4) | masks.SlidingWindow(shape, 300, 0))
  classes = mask.classify(128, bk)
  assert {masks.EMPTY, masks.PARTIAL, masks.FULL} <= set(classes.ravel())
  unread = (classes == masks.EMPTY).all(axis=0)
  assert unread.tolist() == [False, False, False, True]
  q, k, v = _qkv(1, 2, 1, t, s, 64, dtype)
  info = mask_info(mask, 128, bk)
  poison = jnp.asarray(np.repeat(unread, bk))[None, None, :, None]
  kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  out, grads = _run(_tpu, info, q, kp, vp)
  ref, ref_grads = _run(block_sparse_attention_reference, info, q, k, v)
  for x, r, tol in zip((out, *grads), (ref, *ref_grads), (TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(r, np.float32),
                               **tol[dtype])


def test_per_head_masks_segment_ids_and_rows_that_see_nothing():
  b, n, kh, t, h = 2, 2, 1, 256, 64
  q, k, v = _qkv(b, n, kh, t, t, h, seed=1)
  blind = np.tril(np.ones((t, t), bool))
  blind[:128] = False  # a whole q block sees nothing (no kv block to walk)
  blind[200] = False  # and one row of a partial block
  mask = masks.MultiHead((masks.Dense(blind), masks.sinks_and_window((t, t), 4, 60)))
  info = mask_info(mask, 128, 128)
  assert info.num_kv[0, 0, 0] == 0
  seg = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 3, size=(b, t)), axis=1))
  out, (dq, _, _) = _check(q, k, v, info, q_segment_ids=seg, kv_segment_ids=seg)
  for rows in (slice(0, 128), slice(200, 201)):
    np.testing.assert_array_equal(np.asarray(out[:, 0, rows]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, 0, rows]), 0.0)


def test_per_batch_and_head_dynamic_mask():
  b, n, kh, t, h = 2, 2, 1, 384, 64
  q, k, v = _qkv(b, n, kh, t, t, h, seed=2)
  info = jax.jit(block_topk_mask_info, static_argnums=(2, 3, 4))(q, k, 128, 1, 0)
  assert info.kv_indices.shape[:2] == (b, n)
  _check(q, k, v, info)


# --- compiled for real targets, from this CPU host -----------------------------------------------

B, N, K, T, H = 1, 4, 2, 8192, 128  # GQA, head dim 128, 8k tokens


@pytest.fixture(scope="module")
def duo_8k():
  """Per-head metadata: causal heads and sinks + window heads."""
  return mask_info(masks.duo_attention((T, T), [True, False, False, True], 128, 1024), 128, 128)


def _step(info, segments: bool):
  """A training step's attention: the loss (forward) and its gradients (backward)."""
  def loss(q, k, v, seg):
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
    return jnp.sum(block_sparse_attention(q, k, v, info, **kw).astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _sds(sharding=None):
  make = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return (make((B, N, T, H), jnp.bfloat16), make((B, K, T, H), jnp.bfloat16),
          make((B, K, T, H), jnp.bfloat16), make((B, T), jnp.int32))


@pytest.mark.parametrize("name,segments", [("v5e:2x2", False), ("v6e:2x2", True)])
def test_compiles_for_tpu(tpu_device, no_persistent_cache, duo_8k, name, segments):
  """Forward and backward through libtpu's compiler (Mosaic's block, alignment and VMEM checks):
  the three Mosaic kernels, and no buffer near the size of a dense (T, S) score matrix."""
  args = _sds(jax.sharding.SingleDeviceSharding(tpu_device(name)))
  compiled = jax.jit(_step(duo_8k, segments)).lower(*args).compile()
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 3
  for kind in ("fwd", "dq", "dkv"):
    assert f"block_sparse_attention_{kind}_tpu" in text
  qkv_bytes = 2 * (B * N * T * H + 2 * B * K * T * H)
  mem = compiled.memory_analysis()
  assert qkv_bytes <= mem.argument_size_in_bytes < 1.1 * qkv_bytes
  assert qkv_bytes <= mem.output_size_in_bytes < 1.1 * qkv_bytes  # the loss, dq, dk, dv
  assert mem.temp_size_in_bytes < T * T // 8


def test_gpu_form_still_lowers_for_cuda(duo_8k):
  with gpu_target():
    lowered = jax.jit(_step(duo_8k, True)).trace(*_sds()).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3 and "tpu_custom_call" not in text


@pytest.mark.parametrize("block", [32, 64])
def test_blocks_under_128_match_and_compile(tpu_device, no_persistent_cache, block):
  """A dynamic pattern's blocks under 128 (`vertical_slash:V,S,64`): the rows of softmax
  statistics are laid out (T / bq, 1, bq), so each block is whole in its last two dims. Output
  and gradients equal the reference's in TPU interpret mode, and libtpu compiles forward and
  backward for v5e."""
  from pallas_kernels.block_sparse_attention.dynamic import vertical_slash_mask_info
  make = jax.jit(vertical_slash_mask_info, static_argnums=(2, 3, 4, 5))
  q, k, v = _qkv(1, 2, 1, 256, 256, 64, seed=4)
  info = make(q, k, block, 4, 2, 32)
  assert int(info.num_kv.min()) < 256 // block  # sparse
  _check(q, k, v, info)

  def loss(q, k, v):
    return jnp.sum(block_sparse_attention(q, k, v, make(q, k, block, 4, 2, 32)))

  sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=jax.sharding
                                           .SingleDeviceSharding(tpu_device("v5e:2x2")))
  t = 2048
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
      sds((1, 4, t, 128)), sds((1, 2, t, 128)), sds((1, 2, t, 128))).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
