"""The int8 KV cache: pages of int8 K/V with a float32 scale per token and kv head, read by the
paged decode and tree-verification kernels in every form (interpreted Triton form, TPU interpret
mode, libtpu's compilation, the Triton lowering for CUDA) and by the XLA path; the engine serving
from it (speculating, on a mesh, through the CLI's options), and its bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kv_cache import KVCache, PagedKVCache
from jaxinfer.kv_quant import QuantizedKV, kv_move, kv_read, kv_set
from pallas_kernels.common import gpu_target
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.tree_attention import (pack_ancestors, tree_attention,
                                           tree_attention_reference)

PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8]


def _quantized_pools(k, pool, ps, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  return [QuantizedKV.quantize(jax.random.normal(key, (k, pool, ps, h)) * 3) for key in ks]


def test_quantize_is_per_token_and_head_and_within_half_a_step():
  """One scale per vector, stored in rows of 128 (position n at [k, n // 128, n % 128])."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 40, 32)) * jnp.arange(1, 41)[None, None, :, None]
  q = QuantizedKV.quantize(x)
  assert q.values.dtype == jnp.int8 and q.scales.shape == (2, 2, 128)  # 200 positions: 2 rows
  grid = q.scale_grid()
  assert grid.shape == (2, 5, 40) and q.scales[1, 1, 160 - 128] == grid[1, 4, 0]
  values, scales = kv_read(q, (), jnp.float32)
  assert np.array_equal(scales, grid) and np.array_equal(values, q.values.astype(jnp.float32))
  assert bool(jnp.all(jnp.abs(values * grid[..., None] - x) <= grid[..., None] * 0.5001))
  # each vector alone decides its scale: quantizing a slice gives the same values
  part = QuantizedKV.quantize(x[:, 2:3])
  assert np.array_equal(part.values, q.values[:, 2:3])
  assert np.array_equal(part.scale_grid(), grid[:, 2:3])


def test_a_vectors_largest_element_is_127_not_a_rounding_tie():
  """Scale absmax / 127: a vector's largest element is ±127 whatever its last float bit. (At
  absmax / 127.5 it lay on a tie, ±127.5, and K or V computed by a step of another shape was
  stored one step apart in a tenth of its vectors: int8 speculation then differed from int8
  plain decoding.)"""
  from jaxinfer.kv_quant import quantize_vectors
  x = jax.random.normal(jax.random.key(0), (4096, 64))
  values, scales = quantize_vectors(x)
  assert int(jnp.min(values)) == -127 and bool(jnp.all(jnp.max(jnp.abs(values), -1) == 127))
  for direction in (jnp.inf, -jnp.inf):
    moved = quantize_vectors(jnp.nextafter(x, direction))[0]
    assert float(jnp.mean(jnp.any(moved != values, -1))) < 0.01
  zero = quantize_vectors(jnp.zeros((2, 8)))
  assert not bool(jnp.any(zero[0])) and bool(jnp.all(zero[1] == 1))


def test_writes_quantize_and_moves_copy_values_and_scales():
  buf = QuantizedKV.quantize(jnp.zeros((2, 4, 8, 16)))
  new = jax.random.normal(jax.random.key(2), (2, 3, 16))
  index = (slice(None), jnp.array([1, 1, 4]), jnp.array([0, 5, 0]))  # the last out of range
  buf = kv_set(buf, index, new)
  want = QuantizedKV.quantize(new)
  assert np.array_equal(buf.values[:, 1, 5], want.values[:, 1])
  assert np.array_equal(buf.scale_grid()[:, 1, 0], want.scale_grid()[:, 0])
  assert not np.any(buf.scales[:, 0, 32:])  # the dropped write landed nowhere
  moved = kv_move(buf, (slice(None), jnp.array([1]), jnp.array([5])),
                  (slice(None), jnp.array([3]), jnp.array([2])))
  assert np.array_equal(moved.values[:, 3, 2], buf.values[:, 1, 5])
  assert np.array_equal(moved.scale_grid()[:, 3, 2], buf.scale_grid()[:, 1, 5])
  # two heads a row (a pool of heads of 8 as (1, P, ps, 16)): a scale per kv head, written and
  # moved for both
  two = QuantizedKV.quantize(jnp.zeros((1, 4, 8, 16)), heads_per_row=2)
  assert two.scales.shape == (2, 1, 128) and two.heads_per_row == 2
  row = new[:1].reshape(1, 3, 2, 8).at[:, :, 1].multiply(50).reshape(1, 3, 16)
  two = kv_set(two, index, row)
  alone = QuantizedKV.quantize(row.reshape(1, 3, 2, 8).transpose(2, 0, 1, 3)[:, 0])
  assert np.array_equal(two.values[0, 1, 5], jnp.concatenate(list(alone.values[:, 1])))
  assert np.array_equal(two.scale_grid()[:, 1, 5], alone.scale_grid()[:, 1])
  moved = kv_move(two, (slice(None), jnp.array([1]), jnp.array([5])),
                  (slice(None), jnp.array([3]), jnp.array([2])))
  assert np.array_equal(moved.values[:, 3, 2], two.values[:, 1, 5])
  assert np.array_equal(moved.scale_grid()[:, 3, 2], two.scale_grid()[:, 1, 5])


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_read_int8_pages_with_their_scales(backend):
  """Both kernels, both forms (the TPU form in TPU interpret mode, DMAs of pages and scales
  modelled), sinks and a window, several DMA blocks: equal to attention over the dequantized
  pages."""
  k, pool, ps, h, b, n, m = 2, 36, 16, 16, 3, 6, 8  # 576 positions: a part-filled last row
  kq, vq = _quantized_pools(k, pool, ps, h)
  table = jnp.asarray(np.random.RandomState(0).permutation(pool)[:b * m].reshape(b, m), jnp.int32)
  scales = (kq.scales, vq.scales)
  q = jax.random.normal(jax.random.key(3), (b, n, h))
  lengths = jnp.array([5, 70, 128])
  for kw in ({}, dict(window=40, sinks=3), dict(block_pages=10)):  # 160 keys: two lane chunks
    out = paged_attention(q, kq.values, vq.values, lengths, table, *scales, backend=backend,
                          **({"block_pages": 2} | kw))
    ref = paged_attention_reference(q, kq.values, vq.values, lengths, table, *scales, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  qt = jax.random.normal(jax.random.key(4), (b, len(PARENTS), n, h))
  mask = pack_ancestors(jnp.array([PARENTS] * b))
  prefix = jnp.array([3, 60, 100])
  out = tree_attention(qt, kq.values, vq.values, prefix, table, mask, *scales, window=40,
                       sinks=2, backend=backend, block_pages=2)
  ref = tree_attention_reference(qt, kq.values, vq.values, prefix, table, mask, *scales,
                                 window=40, sinks=2)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_read_pools_of_several_heads_a_row(backend):
  """Pools of c kv heads a row, (K/c, P, ps, c*H) (heads of 64 two to a row, of 32 four), read
  by both kernels in both forms, in float32 and int8 (a scale per token and kv head, as with a
  head a row): equal to each head's attention over its own pages, unpacked here by hand."""
  b, ps, m, g = 2, 16, 6, 3
  table = jnp.asarray(np.random.RandomState(1).permutation(16)[:b * m].reshape(b, m), jnp.int32)
  mask = pack_ancestors(jnp.array([PARENTS] * b))
  for k, h, int8 in ((4, 64, False), (4, 32, False), (2, 64, True)):
    c = 128 // h
    x = jax.random.normal(jax.random.key(h + k), (2, k // c, 16, ps, c * h))
    x = x * jnp.repeat(jnp.arange(1, c + 1), h)  # heads of a row differ in magnitude
    # kv head j*c + i lies in row j, lanes i*h..(i+1)*h
    unpack = lambda r: (np.asarray(r).reshape(k // c, 16, ps, c, h).transpose(0, 3, 1, 2, 4)
                        .reshape(k, 16, ps, h))
    pools, scales, heads = (x[0], x[1]), (), [unpack(x[0]), unpack(x[1])]
    if int8:
      quantized = [QuantizedKV.quantize(p, c) for p in pools]
      for q, alone in zip(quantized, (QuantizedKV.quantize(jnp.asarray(u)) for u in heads)):
        assert np.array_equal(unpack(q.values), alone.values)  # each head by itself
        assert np.array_equal(q.scales, alone.scales)
      pools, scales = [p.values for p in quantized], tuple(p.scales for p in quantized)
      heads = [unpack(p.values).astype(np.float32) * np.asarray(p.scale_grid())[..., None]
               for p in quantized]
    q = jax.random.normal(jax.random.key(7), (b, k * g, h))
    lengths = jnp.array([9, 90])
    out = paged_attention(q, *pools, lengths, table, *scales, backend=backend, block_pages=2)
    ref = paged_attention_reference(q, *map(jnp.asarray, heads), lengths, table)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5, err_msg=f"{k} {h} {int8}")
    qt = jax.random.normal(jax.random.key(8), (b, len(PARENTS), k * g, h))
    prefix = jnp.array([4, 70])
    out = tree_attention(qt, *pools, prefix, table, mask, *scales, window=40, sinks=2,
                         backend=backend, block_pages=2)
    ref = tree_attention_reference(qt, *map(jnp.asarray, heads), prefix, table, mask,
                                   window=40, sinks=2)
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5, err_msg=f"{k} {h} {int8}")
  with pytest.raises(ValueError, match="do not fit pages"):  # 3 heads of 64: not two to a row
    paged_attention(jnp.zeros((1, 3, 64)), pools[0], pools[1], jnp.array([3]), table[:1],
                    *scales)


def test_kernels_name_missing_or_misshapen_scales():
  kq, vq = _quantized_pools(1, 4, 8, 16)
  args = (jnp.zeros((1, 2, 16)), kq.values, vq.values, jnp.array([3]), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="int8 pools need k_scales and v_scales"):
    paged_attention(*args)
  with pytest.raises(ValueError, match="scales must be float32 rows"):
    paged_attention(*args, kq.scales.astype(jnp.bfloat16), vq.scales.astype(jnp.bfloat16))
  kq, vq = _quantized_pools(1, 4, 48, 16)
  with pytest.raises(ValueError, match="page size dividing 128"):
    paged_attention(jnp.zeros((1, 2, 16)), kq.values, vq.values, jnp.array([3]),
                    jnp.zeros((1, 2), jnp.int32), kq.scales, vq.scales)


B, N, K, H, CONTEXT, PS = 64, 32, 8, 128, 8192, 16


def _serving_args(sharding=None, t=None):
  m = CONTEXT // PS
  pool = B * m
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  pages = (s((K, pool, PS, H), jnp.int8),) * 2
  scales = (s((K, pool * PS // 128, 128), jnp.float32),) * 2
  ends, table = s((B,), jnp.int32), s((B, m), jnp.int32)
  if t is None:
    return (s((B, N, H), jnp.bfloat16),) + pages + (ends, table) + scales
  return (s((B, t, N, H), jnp.bfloat16),) + pages + (ends, table,
                                                     s((B, t, -(-t // 32)), jnp.int32)) + scales


def test_libtpu_compiles_int8_kernels_and_the_triton_form_lowers(tpu_device, no_persistent_cache):
  """Serving shapes (batch 64, 8k context, GQA 32/8, head_dim 128, int8 pages): libtpu compiles
  both kernels, takes the scale rows as they are stored (no copy into another layout) and
  allocates nothing pool-sized (no dequantized copy) beside the arguments; the Triton form
  lowers for CUDA."""
  paged = jax.jit(lambda q, k, v, e, t, ks, vs: paged_attention(q, k, v, e, t, ks, vs))
  tree = jax.jit(lambda q, k, v, e, t, mk, ks, vs: tree_attention(q, k, v, e, t, mk, ks, vs,
                                                                   window=1024, sinks=4))
  sharding = jax.sharding.SingleDeviceSharding(tpu_device("v5e:2x2"))
  for fn, args in [(paged, _serving_args(sharding)), (tree, _serving_args(sharding, 16))]:
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    scale_rows = f"f32[{K},{B * CONTEXT // 128},128]"
    assert not [l for l in text.splitlines() if " copy(" in l and scale_rows in l]
    assert compiled.memory_analysis().temp_size_in_bytes < args[1].size  # one int8 pool
  for fn, args in [(paged, _serving_args()), (tree, _serving_args(None, 16))]:
    with gpu_target():
      text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


def test_pool_bytes_count_values_and_scales():
  from jaxinfer.config import PRESETS
  from jaxinfer.sharding import device_bytes
  cfg = PRESETS["tiny"]
  k, v = PagedKVCache.init_pools(cfg, 32, 8, kv_cache_dtype="int8")  # 256 positions: 2 rows
  assert device_bytes((k, v)) == PagedKVCache.pool_bytes(cfg, 32, 8, "int8")
  llama = PRESETS["llama3-8b"]  # bfloat16, head_dim 128
  assert PagedKVCache.pool_bytes(llama, 1, 1, "int8") / PagedKVCache.pool_bytes(llama, 1, 1) \
      == pytest.approx((128 + 4) / 256)
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    KVCache.init(cfg, 1, 8, kv_cache_dtype="int4")


@pytest.fixture(scope="module")
def target(tiny_model_dir):
  from jaxinfer import checkpoint
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  return cfg, params


def _requests():
  from jaxinfer.engine.scheduler import EngineRequest
  rng = np.random.RandomState(0)
  header = [int(x) for x in rng.randint(3, 50, 24)]
  reqs = []
  for i in range(6):
    body = [int(x) for x in rng.randint(3, 50, 5 + 3 * i)]
    reqs.append(EngineRequest(i, (header if i % 2 else []) + body + body[:6],
                              int(rng.randint(8, 25)), np.asarray([0, i], np.uint32)))
  return reqs


def _run(target, proposer=None, runtime=None, **kw):
  from jaxinfer.engine import Engine, EngineConfig
  from jaxinfer.runtime import Runtime
  cfg, params = target
  ecfg = EngineConfig(num_slots=3, chunk_size=16, chunk_lanes=2, page_size=8,
                      kv_cache_dtype="int8")
  eng = Engine(cfg, params, ecfg, max_len=128, runtime=runtime or Runtime(), proposer=proposer,
               **kw)
  out = {}
  st = eng.run(_requests(), lambda r: out.__setitem__(r.uid, r))
  return {u: r.tokens for u, r in out.items()}, st, eng


def test_int8_engine_speculation_equals_its_plain_decoding(target):
  """Greedy speculation over the int8 pool (the accepted path's int8 K/V and scales moved into
  place) gives the same tokens as plain decoding over the int8 pool, through the kernels and
  through XLA (which agree); the pages hold int8 values, and a shared header's pages are still
  read by reference."""
  from jaxinfer.runtime import Runtime
  from jaxinfer.speculative import proposers as P
  ref, _, eng = _run(target, runtime=Runtime(implementation="pallas"))
  assert isinstance(eng.k[0], QuantizedKV) and eng.k[0].values.dtype == jnp.int8
  for proposer, impl in [(P.NGram(num_draft_tokens=3), "pallas"),
                         (P.Lookahead(num_nodes=4, depth=2), "pallas"),
                         (P.NGram(num_draft_tokens=3), "xla")]:
    out, st, _ = _run(target, proposer, Runtime(implementation=impl), speculation="always")
    assert out == ref, (proposer, impl)
    assert st.decode_tokens > st.row_steps > 0 and st.prefill_tokens_saved >= 3 * 8


def test_int8_engine_equals_decoding_one_sequence_over_an_int8_cache(target, tiny_model_dir):
  """The paged engine (prompts in chunks, decode steps) and one sequence decoded alone over a
  contiguous int8 cache (prefilled whole, a token a step) store the same int8 K/V: the same
  greedy tokens (they differed from the second token on, on a rounding tie)."""
  from jaxinfer import model as M
  from jaxinfer.engine import Engine, EngineConfig
  from jaxinfer.engine.scheduler import EngineRequest
  from jaxinfer.kv_cache import KVCache
  from jaxinfer.tokenizer import Tokenizer
  cfg, params = target
  prompts = [Tokenizer.from_dir(tiny_model_dir).encode("def add(a, b):"),
             _requests()[1].prompt_ids]
  eng = Engine(cfg, params, EngineConfig(num_slots=2, page_size=8, chunk_size=16,
                                         kv_cache_dtype="int8"), max_len=64)
  out = {}
  eng.run([EngineRequest(i, p, 6, np.asarray([0, i], np.uint32)) for i, p in enumerate(prompts)],
          lambda r: out.__setitem__(r.uid, r.tokens))
  for i, prompt in enumerate(prompts):
    ids = list(prompt)
    cache = KVCache.init(cfg, 1, 64, kv_cache_dtype="int8")
    h, cache = M.forward(params, jnp.asarray([ids]), jnp.arange(len(ids))[None], cfg, cache,
                         kv_source="cache")
    while len(ids) < len(prompt) + 6:
      ids.append(int(jnp.argmax(M.logits(params, h[0, -1:])[0])))
      h, cache = M.forward(params, jnp.asarray([ids[-1:]]), jnp.asarray([[len(ids) - 1]]), cfg,
                           cache, kv_source="cache")
    assert ids[len(prompt):] == out[i], i


def test_int8_engine_on_a_mesh_equals_one_device(target):
  """Pages and scales split over the kv heads (model:2): the same tokens as one device."""
  from jaxinfer.runtime import Runtime
  from jaxinfer.serving.placement import on_replica
  from jaxinfer.sharding import make_mesh
  ref, _, _ = _run(target)
  mesh = make_mesh("model:2", jax.devices()[:2])
  cfg, params = target
  out, _, eng = _run((cfg, on_replica(params, mesh, [mesh])), runtime=Runtime(mesh))
  assert out == ref
  assert eng.k[0].scales.sharding.spec[0] == "model"


def test_generate_serves_an_int8_cache_and_refuses_what_cannot(tmp_path, tiny_model_dir):
  """The API with kv_cache_dtype="int8" (the CLI's --kv_cache_dtype) serves through the engine;
  an unknown dtype or a page size its scales cannot lie in is one line naming the flag."""
  import jaxinfer
  from jaxinfer.errors import UserError
  llm = jaxinfer.LLM(str(tiny_model_dir), kv_cache_dtype="int8", batch_size=2, mesh="data:1",
                     progress=False)
  out = llm.generate(["def add(a, b):", "class Point:"],
                     jaxinfer.SamplingParams(max_new_tokens=6, min_p=0.0))
  assert [len(r.outputs[0].ids) for r in out] == [6, 6]
  pool = llm._backend.engines[0].k[0]  # the engine's pages hold int8 values
  assert isinstance(pool, QuantizedKV) and pool.values.dtype == jnp.int8
  for kw, match in [(dict(kv_cache_dtype="fp8"), "^kv_cache_dtype: expected one of int8"),
                    (dict(kv_cache_dtype="int8", page_size=48), "dividing 128")]:
    with pytest.raises(UserError, match=match):
      jaxinfer.LLM(str(tiny_model_dir), progress=False, **kw).generate(["x"])


def test_contiguous_int8_cache_decodes_alike_through_the_kernel_and_xla():
  """A contiguous int8 cache (viewed as pages by the decode kernel): prefill then one decode
  step, Pallas against XLA. Not to 1e-5: the kernel's last-bit differences in one layer's
  output can move a rounding step of the next layer's int8 K/V (the kernels alone agree to
  2e-5, above)."""
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  from jaxinfer.runtime import Runtime
  cfg = PRESETS["tiny"]
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 3, 200)
  pos = jnp.broadcast_to(jnp.arange(21), (2, 21))
  outs = []
  for impl in ("xla", "pallas"):
    cache = KVCache.init(cfg, 2, 32, kv_cache_dtype="int8")
    rt = Runtime(implementation=impl)
    _, cache = M.forward(params, tokens[:, :20], pos[:, :20], cfg, cache, kv_source="cache",
                         runtime=rt)
    hidden, _ = M.forward(params, tokens[:, 20:], pos[:, 20:], cfg, cache, kv_source="cache",
                          runtime=rt)
    outs.append(hidden)
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kv_cache_dtype,head_dim", [(None, 128), (None, 64), ("int8", 64)])
def test_the_tpu_steps_keep_every_pool_in_the_kernels_layout(no_persistent_cache, kv_cache_dtype,
                                                             head_dim):
  """The engine's decode step and its draft-tree verification steps compiled by libtpu (several
  kv heads on one device, Pallas kernels): XLA keeps every pool (and the int8 scale rows) in the
  kernels' layout everywhere in the step, so none is copied into another layout at any layer of
  any step; the pools alias their outputs. Heads of 64 lie two to a pool row (a pool of 64
  lanes lay pages-minor and was copied whole into the kernels' layout and back at every step)."""
  import dataclasses

  from jaxinfer import aot, aot_steps
  from jaxinfer.config import PRESETS
  from jaxinfer.runtime import Runtime
  from jaxinfer.sharding import device_bytes
  # heads of 64 as Llama-3.2-1B's (8 kv heads, 1,024 pages): smaller pools of 64 lanes happen
  # to lie row-major
  kv_heads, pages = (2, 64) if head_dim == 128 else (8, 1024)
  job = aot.CompileJob(target="tpu:v5e:2x2", mesh="data:4", batch_size=4, kv_pages=pages,
                       implementation="pallas", kv_cache_dtype=kv_cache_dtype,
                       speculative="ngram")
  cfg = dataclasses.replace(PRESETS["tiny"], head_dim=head_dim, kv_heads=kv_heads,
                            q_heads=2 * kv_heads, max_seq_len=256)
  target = aot.parse_target(job.target)
  mesh, _ = aot.replica_mesh(aot.target_devices(target), job.mesh, target)
  runtime = Runtime(mesh, implementation="pallas")
  params = aot_steps.params_shapes(cfg, job, mesh, runtime)
  steps = {"decode": aot_steps.engine_steps(cfg, job, params, runtime)["decode"]}
  steps |= aot_steps.engine_tree_steps(cfg, job, params, runtime,
                                       *aot_steps.proposer_for(cfg, job, params))[0]
  names = {"int8": "s8", "float32": "f32"}
  for name, (fn, args) in steps.items():
    compiled = fn.lower(*args).compile()
    layouts = {}  # every layout XLA gives a pool (or scale rows) anywhere in the step
    for x in jax.tree_util.tree_leaves(args[1:3]):
      shape = f"{names[jnp.dtype(x.dtype).name]}[{','.join(map(str, x.shape))}]{{"
      default = ",".join(map(str, reversed(range(x.ndim))))
      for line in compiled.as_text().splitlines():
        for found in line.split(shape)[1:]:
          layouts.setdefault(shape, set()).add(found.split(":")[0].split("}")[0] == default)
    assert all(x.shape[-1] == 128 for x in jax.tree_util.tree_leaves(args[1:3]))
    assert layouts and all(v == {True} for v in layouts.values()), (name, layouts)
    assert compiled.memory_analysis().alias_size_in_bytes >= device_bytes(args[1:3]), name
