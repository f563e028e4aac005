"""Our kernels against jax's own Pallas kernels for the same jobs (installed with jax under
jax/experimental/pallas/ops), on shared inputs, all interpreted on the CPU:

  block_sparse_attention  vs  TPU splash attention (causal; sinks + sliding window), GPU mha
  paged_attention         vs  TPU paged_attention (in TPU interpret mode), GPU paged_attention,
                              GPU decode attention (gqa) over the gathered cache

Upstream kernels take no softmax scale (except mha / gqa): their q is pre-scaled. Splash takes
unbatched (N,T,H) / (K,S,H) inputs and is vmapped over the batch; mha has no GQA, so its k/v
heads are repeated. The last test runs the model with the registry's "splash" implementation.

Not here: jax's TPU ragged_paged_attention. It reshapes a DMA'd VMEM ref
(`async_copy.wait().reshape(...)`), which jax 0.10.2's TPU interpret mode cannot read
("'ReshapeTransform' object has no attribute 'indices'"), and it has no plain-interpret switch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu import paged_attention as tpu_paged
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels.block_sparse_attention import block_sparse_attention, mask_info, masks
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference

TOL = dict(rtol=2e-5, atol=2e-5)


def _qkv(b, n, k, t, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, n, t, h)), jax.random.normal(ks[1], (b, k, t, h)),
          jax.random.normal(ks[2], (b, k, t, h)))


# --- block-sparse prefill -------------------------------------------------------------------

T, BLOCK, SINKS, WINDOW = 256, 128, 4, 96


def _masks(kind):
  """(ours, splash's) for one pattern: key j visible to query i when j <= i and, for "local",
  i - j < WINDOW or j < SINKS."""
  if kind == "causal":
    return masks.Causal((T, T)), splash.CausalMask((T, T))
  local = splash.LocalMask((T, T), (WINDOW - 1, 0), 0)
  sink_columns = np.broadcast_to(np.arange(T) < SINKS, (T, T)).copy()
  sinks = splash.CausalMask((T, T)) & splash.NumpyMask(sink_columns)
  return masks.sinks_and_window((T, T), SINKS, WINDOW), local | sinks


@pytest.mark.parametrize("kind", ["causal", "local"])
def test_block_sparse_matches_splash(kind):
  """Forward and gradients (splash's own backward kernels), GQA 4:2."""
  b, n, k, h = 1, 4, 2, 64
  q, kk, v = _qkv(b, n, k, T, h)
  ours_mask, their_mask = _masks(kind)
  info = mask_info(ours_mask, BLOCK, BLOCK)
  sizes = splash.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                            block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
                            block_q_dq=BLOCK, block_kv_dq=BLOCK)
  kernel = splash.make_splash_mha_single_device(splash.MultiHeadMask([their_mask] * n),
                                                block_sizes=sizes, interpret=True)
  theirs = lambda q, k, v: jax.vmap(kernel)(q * h**-0.5, k, v)
  ours = lambda q, k, v: block_sparse_attention(q, k, v, info)
  np.testing.assert_allclose(ours(q, kk, v), theirs(q, kk, v), **TOL)

  loss = lambda f: jax.grad(lambda *x: jnp.sum(jnp.sin(f(*x))), argnums=(0, 1, 2))
  for a, c in zip(loss(ours)(q, kk, v), loss(theirs)(q, kk, v)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_block_sparse_causal_matches_gpu_flash_attention():
  """jax's Triton flash attention (mha) in plain interpret mode: (B,T,N,H) layout, no GQA."""
  b, n, k, h = 1, 4, 2, 64
  q, kk, v = _qkv(b, n, k, T, h, seed=1)
  ours = block_sparse_attention(q, kk, v, mask_info(masks.Causal((T, T)), BLOCK, BLOCK))
  bthn = lambda x: jnp.repeat(x, n // x.shape[1], axis=1).transpose(0, 2, 1, 3)
  theirs = gpu_attention.mha(bthn(q), bthn(kk), bthn(v), None, sm_scale=h**-0.5, causal=True,
                             interpret=True)
  np.testing.assert_allclose(ours, theirs.transpose(0, 2, 1, 3), **TOL)


# --- paged decode ---------------------------------------------------------------------------

B, N, K, H, PS, PAGES_PER_SEQ = 3, 8, 2, 128, 16, 8  # GQA 4:1


def _paged_case():
  """q (B,N,H), pools (K,P,ps,H) with spare pages, shuffled page tables (B,M), ragged lengths
  ending mid-page and at the table's end. The pools hold bfloat16-representable float32 values:
  jax's TPU kernel casts each loaded page to bfloat16, which is then exact."""
  pool = B * PAGES_PER_SEQ + 5
  ks = jax.random.split(jax.random.key(2), 3)
  bf16_exact = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  q = jax.random.normal(ks[0], (B, N, H))
  kp = bf16_exact(jax.random.normal(ks[1], (K, pool, PS, H)))
  vp = bf16_exact(jax.random.normal(ks[2], (K, pool, PS, H)))
  table = np.random.RandomState(0).permutation(pool)[:B * PAGES_PER_SEQ]
  table = jnp.asarray(table.reshape(B, PAGES_PER_SEQ), jnp.int32)
  lengths = jnp.array([1, 37, PS * PAGES_PER_SEQ], jnp.int32)
  return q, kp, vp, lengths, table


# Our kernel as the platform picks it (CPU: the GPU form interpreted), and its TPU form in jax's
# TPU interpret mode.
OURS_FORMS = {"default": {}, "tpu": {"backend": "tpu", "interpret": True}}


@pytest.mark.parametrize("form", sorted(OURS_FORMS))
def test_paged_matches_tpu_paged_attention(form):
  q, kp, vp, lengths, table = _paged_case()
  ours = paged_attention(q, kp, vp, lengths, table, **OURS_FORMS[form])
  with pltpu.force_tpu_interpret_mode():
    theirs = tpu_paged.paged_attention(q * H**-0.5, kp, vp, lengths, table,
                                       pages_per_compute_block=4)
  np.testing.assert_allclose(ours, theirs, **TOL)
  np.testing.assert_allclose(ours, paged_attention_reference(q, kp, vp, lengths, table), **TOL)


def test_paged_matches_gpu_paged_attention():
  q, kp, vp, lengths, table = _paged_case()
  ours = paged_attention(q, kp, vp, lengths, table)
  theirs = gpu_paged.paged_attention(q * H**-0.5, kp, vp, table, lengths, k_splits=2,
                                     pages_per_compute_block=2, interpret=True)
  np.testing.assert_allclose(ours, theirs, **TOL)


def test_paged_matches_gpu_decode_attention():
  """jax's split-K decode kernel reads a contiguous (B,S,K,H) cache: ours reads the same cache
  as a pool whose sequence b owns pages [b*M, (b+1)*M)."""
  q, kp, vp, lengths, table = _paged_case()
  s = PS * PAGES_PER_SEQ
  cache = lambda pool: pool[:, table].reshape(K, B, s, H).transpose(1, 2, 0, 3)  # (B,S,K,H)
  kc, vc = cache(kp), cache(vp)
  theirs = gpu_decode.gqa(q, kc, vc, kv_seq_len=lengths, k_splits=2, interpret=True)
  as_pool = lambda c: c.transpose(2, 0, 1, 3).reshape(K, B * PAGES_PER_SEQ, PS, H)
  identity = jnp.arange(B * PAGES_PER_SEQ, dtype=jnp.int32).reshape(B, PAGES_PER_SEQ)
  ours = paged_attention(q, as_pool(kc), as_pool(vc), lengths, identity)
  np.testing.assert_allclose(ours, theirs, **TOL)


# --- the registry's "splash" implementation -------------------------------------------------


@pytest.mark.parametrize("sparsity", ["dense", "sinks_window:4,32"])
def test_model_forward_with_splash_equals_xla(sparsity):
  """The tiny model's prefill (two packed segments in row 0) through "splash" (on CPU: splash in
  interpret mode, chosen by the platform being lowered for) equals "xla"; a chunk splash does
  not cover (not a whole number of 128-blocks) falls back to "pallas" and still equals "xla"."""
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  from jaxinfer.runtime import Runtime
  from jaxinfer.sparsity import parse

  cfg, sp = PRESETS["tiny"], parse(sparsity)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(256), (2, 256))
  seg = jnp.asarray(np.repeat([[0, 1], [0, 0]], 128, axis=1))
  run = jax.jit(lambda impl, n: M.forward(params, tokens[:, :n], pos[:, :n], cfg,
                                          segment_ids=seg[:, :n],
                                          runtime=Runtime(implementation=impl, sparsity=sp))[0],
                static_argnums=(0, 1))
  assert "splash" in str(jax.make_jaxpr(run, static_argnums=(0, 1))("splash", 256))  # used
  np.testing.assert_allclose(run("splash", 256), run("xla", 256), **TOL)
  if sparsity == "dense":  # 200 tokens: jaxinfer's own block-sparse kernel instead
    fallback = str(jax.make_jaxpr(run, static_argnums=(0, 1))("splash", 200))
    assert "splash" not in fallback and "block_sparse_attention_fwd" in fallback
    np.testing.assert_allclose(run("splash", 200), run("xla", 200), **TOL)
