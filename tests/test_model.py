"""The model's own invariants: cached decoding equals a full forward pass, masks, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import model as M
from jaxinfer import params as P
from jaxinfer.attention import attention_mask, attention_reference
from jaxinfer.config import PRESETS, ModelConfig, RopeScaling
from jaxinfer.kv_cache import KVCache, PagedKVCache
from jaxinfer.runtime import Runtime
from jaxinfer.sparsity import parse as parse_sparsity

TINY = PRESETS["tiny"]


def _full_logits(params, cfg, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = M.forward(params, tokens, positions, cfg)
  return M.logits(params, hidden)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("kv_heads,window,sparsity", [
    (1, None, "dense"), (2, None, "dense"), (4, None, "dense"), (2, 5, "dense"),
    (2, None, "sinks_window:2,4")])
def test_prefill_then_decode_equals_full_forward(kv_heads, window, sparsity, implementation):
  cfg = dataclasses.replace(TINY, kv_heads=kv_heads, sliding_window=window)
  sp = parse_sparsity(sparsity)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  full = M.logits(params, M.forward(params, tokens, positions, cfg,
                                    runtime=Runtime(sparsity=sp))[0])

  kw = dict(runtime=Runtime(implementation=implementation, sparsity=sp))
  cache = KVCache.init(cfg, 2, 16)
  prefix = 7
  pos = jnp.broadcast_to(jnp.arange(prefix), (2, prefix))
  hidden, cache = M.forward(params, tokens[:, :prefix], pos, cfg, cache, kv_source="chunk", **kw)
  step_logits = [M.logits(params, hidden)]
  for t in range(prefix, 12):
    pos = jnp.full((2, 1), t)
    hidden, cache = M.forward(params, tokens[:, t:t + 1], pos, cfg, cache, kv_source="cache",
                              **kw)
    step_logits.append(M.logits(params, hidden))
  cached = jnp.concatenate(step_logits, axis=1)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", ["dense", "sinks_window:4,32", "block_topk:1,32",
                                      "vertical_slash:4,4,32"])
def test_pallas_prefill_equals_xla_for_every_sparsity(sparsity):
  sp = parse_sparsity(sparsity)
  params = M.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, TINY.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(256), (2, 256))
  seg = jnp.asarray(np.repeat([[0, 1], [0, 0]], 128, axis=1))
  xla = M.forward(params, tokens, pos, TINY, runtime=Runtime(sparsity=sp), segment_ids=seg)[0]
  pallas = M.forward(params, tokens, pos, TINY, segment_ids=seg,
                     runtime=Runtime(implementation="pallas", sparsity=sp))[0]
  np.testing.assert_allclose(pallas, xla, rtol=2e-5, atol=2e-5)
  if sparsity != "dense":  # the pattern really changes the result
    dense = M.forward(params, tokens, pos, TINY, segment_ids=seg)[0]
    assert float(jnp.abs(dense - xla).max()) > 1e-3


def test_pallas_training_gradients_equal_xla():
  from jaxinfer.train.lm import token_losses
  params = M.init_params(TINY, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (2, 33), 0, TINY.vocab_size)
  loss = lambda impl: jax.value_and_grad(lambda p: jnp.mean(token_losses(
      p, batch, TINY, Runtime(implementation=impl))))
  (lx, gx), (lp, gp) = loss("xla")(params), loss("pallas")(params)
  np.testing.assert_allclose(lp, lx, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_continued_prefill_chunks_equal_one_prefill():
  params = M.init_params(TINY, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, TINY.vocab_size)
  full = _full_logits(params, TINY, tokens)
  cache = KVCache.init(TINY, 1, 16)
  outs = []
  for lo, hi in ((0, 4), (4, 10)):
    pos = jnp.arange(lo, hi)[None]
    hidden, cache = M.forward(params, tokens[:, lo:hi], pos, TINY, cache, kv_source="cache")
    outs.append(M.logits(params, hidden))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_attention_mask_semantics():
  q_pos = jnp.array([[0, 3, 6]])
  k_pos = jnp.arange(8)[None]
  m = np.asarray(attention_mask(q_pos, k_pos, window=3))[0]
  assert m[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
  assert m[1].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
  assert m[2].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
  seg = jnp.array([[0, 0, 1]])
  m = np.asarray(attention_mask(q_pos, jnp.array([[0, 3, 6]]), None, seg, seg))[0]
  assert m.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_attention_reference_gqa_equals_repeated_heads():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 5, 6, 8))
  k = jax.random.normal(k2, (2, 5, 2, 8))
  v = jax.random.normal(k3, (2, 5, 2, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  out = attention_reference(q, k, v, pos, pos)
  mha = attention_reference(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), pos, pos)
  np.testing.assert_allclose(out, mha, rtol=1e-6, atol=1e-6)
  # explicit softmax for one head
  s = jnp.einsum("th,sh->ts", q[0, :, 4], k[0, :, 1]) / np.sqrt(8)
  s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -jnp.inf)
  np.testing.assert_allclose(out[0, :, 4], jax.nn.softmax(s) @ v[0, :, 1], rtol=1e-5, atol=1e-6)


def test_bfloat16_forward_close_to_float32():
  params = M.init_params(TINY, jax.random.key(0))
  cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
  full32 = _full_logits(params, TINY, tokens)
  full16 = _full_logits(params16, cfg16, tokens)
  assert full16.dtype == jnp.float32  # logits are always float32
  p32, p16 = jax.nn.softmax(full32), jax.nn.softmax(full16)
  assert float(jnp.abs(p32 - p16).max()) < 0.05


def test_spec_declares_every_leaf_once():
  cfg = dataclasses.replace(TINY, qkv_bias=True, o_bias=True, qk_norm=True, tie_embeddings=True)
  spec = M.Transformer.spec(cfg)
  params = M.init_params(cfg, jax.random.key(0))
  P.check_against_spec(params, spec)
  assert params.lm_head is None and params.layers[0].attn.q_norm.shape == (cfg.head_dim,)
  assert len(jax.tree_util.tree_leaves(params)) == 2 + cfg.num_layers * 15
  # layers are independent arrays, not one weight tied across layers
  assert not np.allclose(params.layers[0].attn.q, params.layers[1].attn.q)
  with pytest.raises(ValueError, match=r"attn.*q.*expected \(64, 4, 16\)"):
    bad = params.replace(layers=(params.layers[0].replace(
        attn=params.layers[0].attn.replace(q=jnp.zeros((64, 4, 8)))),) + params.layers[1:])
    P.check_against_spec(bad, spec)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    dataclasses.replace(TINY, q_heads=6, kv_heads=4)
  with pytest.raises(ValueError, match="dtype"):
    dataclasses.replace(TINY, dtype="float8")


def test_llama3_rope_scaling_changes_only_low_frequencies():
  from jaxinfer.rope import inverse_frequencies
  base = ModelConfig(vocab_size=8, embed=64, num_layers=1, q_heads=1, kv_heads=1, head_dim=64,
                     mlp=8, rope_theta=500000.0)
  scaled = dataclasses.replace(base, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64))
  f0, f1 = inverse_frequencies(base), inverse_frequencies(scaled)
  wavelen = 2 * np.pi / f0
  np.testing.assert_array_equal(f1[wavelen < 16], f0[wavelen < 16])  # high frequencies kept
  np.testing.assert_allclose(f1[wavelen > 64], f0[wavelen > 64] / 8, rtol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_paged_cache_with_shuffled_and_shared_pages(implementation):
  """Rows read and write through page tables; two rows share their first page by reference."""
  cfg = dataclasses.replace(TINY, kv_heads=2)
  params = M.init_params(cfg, jax.random.key(0))
  ps, m, pool_pages = 4, 4, 12
  prefix = jax.random.randint(jax.random.key(1), (4,), 0, cfg.vocab_size)
  tails = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
  tokens = jnp.concatenate([jnp.broadcast_to(prefix, (2, 4)), tails], axis=1)  # (2, 12)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  full = M.logits(params, M.forward(params, tokens, positions, cfg)[0])

  table = jnp.array([[7, 2, 9, 0], [7, 5, 11, 3]], jnp.int32)  # page 7 is shared
  k, v = PagedKVCache.init_pools(cfg, pool_pages, ps)
  cache = PagedKVCache(k, v, table[:1])
  kw = dict(kv_source="cache", runtime=Runtime(implementation=implementation))
  # row 0 computes the shared prefix page ...
  _, cache = M.forward(params, tokens[:1, :4], positions[:1, :4], cfg, cache, **kw)
  # ... then both rows continue from position 4 (row 1 never computes its first page)
  cache = PagedKVCache(cache.k, cache.v, table)
  outs = []
  for t in range(4, 12):
    hidden, cache = M.forward(params, tokens[:, t:t + 1], positions[:, t:t + 1], cfg, cache, **kw)
    outs.append(M.logits(params, hidden))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,window", [(16, None), (64, None), (16, 40)])
def test_chunks_over_pages_equal_a_full_forward(head_dim, window):
  """Prompt chunks of 32 over shuffled pages through the kernels (blocks of 16 tokens a chain in
  the tree kernel: 8 query heads a kv head; of 8 with heads of 64 two to a pool row), one row's
  second chunk half padding, a window: the logits of every real token equal a full forward's."""
  cfg = dataclasses.replace(TINY, q_heads=16, kv_heads=2, head_dim=head_dim,
                            sliding_window=window)
  params = M.init_params(cfg, jax.random.key(0))
  ps, m = 8, 8
  tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
  full = M.logits(params, M.forward(params, tokens, positions, cfg)[0])
  table = jnp.asarray(np.random.RandomState(0).permutation(20)[:2 * m].reshape(2, m), jnp.int32)
  k, v = PagedKVCache.init_pools(cfg, 20, ps)
  assert k[0].shape[-1] == 128 if head_dim == 64 else k[0].shape[-1] == 16
  cache = PagedKVCache(k, v, table)
  kw = dict(kv_source="cache", runtime=Runtime(implementation="pallas"))
  hidden, cache = M.forward(params, tokens[:, :32], positions[:, :32], cfg, cache, **kw)
  first = M.logits(params, hidden)
  pad = positions[:, 32:].at[1, 8:].set(m * ps)  # row 1 ends at 40: the rest is padding
  hidden, cache = M.forward(params, tokens[:, 32:], pad, cfg, cache, **kw)
  second = M.logits(params, hidden)
  np.testing.assert_allclose(first, full[:, :32], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(second[0], full[0, 32:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(second[1, :8], full[1, 32:40], rtol=1e-5, atol=1e-5)
  # two tokens a row, the first padding in row 0 (a draft's feed with nothing pending)
  pos = jnp.array([[m * ps, 40], [40, 41]])
  hidden, _ = M.forward(params, jnp.stack([tokens[0, 39:41], tokens[1, 40:42]]), pos, cfg,
                        cache, **kw)
  fed = M.logits(params, hidden)
  full = M.logits(params, M.forward(params, tokens[:, :42], positions[:, :42], cfg)[0])
  np.testing.assert_allclose(fed[0, 1], full[0, 40], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fed[1], full[1, 40:42], rtol=1e-5, atol=1e-5)
