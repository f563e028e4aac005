"""Weight quantization: one quantize function for PTQ, serving and QAT, so served logits equal
the QAT forward bit for bit (float32, weight-only); grouping from the declarations; checkpoints;
the quantize command."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import qwix
from conftest import make_tiny_model_dir, own_devices_env

from jaxinfer import model as M
from jaxinfer import quant
from jaxinfer.checkpoint import load_model, load_orbax, save_hf, save_orbax
from jaxinfer.config import PRESETS
from jaxinfer.generation import Generator, RowRequest
from jaxinfer.kv_cache import KVCache
from jaxinfer.train.lm import lm_loss_fn, token_losses

CFG = dataclasses.replace(PRESETS["tiny"], head_dim=32)  # groups of 32 divide every contraction
SPEC = M.Transformer.spec(CFG)
ALL = ("embed", "lm_head", "norm")
FORMATS = [("int8", ALL), ("int4:g32", ()), ("int2:g32", ()), ("ternary", ()), ("fp8_e4m3", ()),
           ("fp8_e5m2", ()), ("fp4_e2m1", ()), ("fp6_e2m3", ()), ("fp6_e3m2:g32", ()),
           ("int8:a8", ()), ("int4:a8", ()), ("int4:g32:a8", ())]
DECODE_STEPS = 64


@pytest.fixture(scope="module")
def params():
  return M.init_params(CFG, jax.random.key(0))


def _fmt(name, include=()):
  return quant.QuantFormat.parse(name, include)


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                  np.asarray(y.astype(jnp.float32)))


@jax.jit
def _greedy_logits(params, prompt):
  """Prefill, then DECODE_STEPS greedy decode steps through the KV cache (generation's path);
  the logits (DECODE_STEPS + 1, B, V)."""
  b, t = prompt.shape
  cache = KVCache.init(CFG, b, t + DECODE_STEPS + 1)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  hidden, cache = M.forward(params, prompt, pos, CFG, cache, kv_source="chunk")
  first = M.logits(params, hidden[:, -1])

  def step(carry, i):
    cache, logits = carry
    tok = jnp.argmax(logits, axis=-1)[:, None]
    hidden, cache = M.forward(params, tok, jnp.full((b, 1), t + i), CFG, cache,
                              kv_source="cache")
    logits = M.logits(params, hidden[:, 0])
    return (cache, logits), logits

  _, rest = jax.lax.scan(step, (cache, first), jnp.arange(DECODE_STEPS))
  return jnp.concatenate([first[None], rest])


PROMPT = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)


def test_sub_byte_values_are_packed_and_weights_shrink(params):
  """int4 and fp4 two values a byte (fp4 as its 4-bit code), int2 and ternary four, fp6 four to
  three bytes (uint8, along the last axis; unpacked exactly where used); quantized weights
  against float32: int8 <= 0.27x, int4 and fp4 <= 0.16x, fp6 <= 0.21x."""
  spec = SPEC.layers[0].mlp.gate
  w = params.layers[0].mlp.gate
  for name, bits in [("int4", 4), ("int2:g32", 2), ("ternary", 2)]:
    q = quant.quantize(w, spec, _fmt(name))
    assert q.qvalue.dtype == jnp.uint8
    assert q.qvalue.shape == w.shape[:-1] + (w.shape[-1] * bits // 8,)
    assert quant.logical_shape(q) == w.shape
    unpacked = quant.ops.unpack(q.qvalue, bits, jnp.int8)
    assert int(unpacked.min()) >= -(1 << (bits - 1)) and int(unpacked.max()) < 1 << (bits - 1)
    np.testing.assert_array_equal(quant.ops.pack(unpacked, bits), q.qvalue)
  six = jax.random.randint(jax.random.key(3), (5, 8), -32, 32)  # 6-bit words: 4 values, 3 bytes
  assert quant.ops.pack(six, 6).shape == (5, 6)
  np.testing.assert_array_equal(quant.ops.unpack(quant.ops.pack(six, 6), 6, jnp.int32), six)
  fp4 = quant.quantize(w, spec, _fmt("fp4_e2m1"))
  assert fp4.qvalue.dtype == jnp.uint8 and quant.logical_shape(fp4) == w.shape
  whole = qwix.quantize(w, jnp.float4_e2m1fn, channelwise_axes=quant.scale_axes(
      spec, _fmt("fp4_e2m1"))[0])  # the same values held a byte each
  np.testing.assert_array_equal(np.asarray(quant.dequantize(fp4)),
                                np.asarray(qwix.dequantize(whole)))
  leaves = lambda q: [x for x in jax.tree_util.tree_leaves(q, is_leaf=quant.is_quantized)
                      if quant.is_quantized(x)]
  for name, bound in [("int8", 0.27), ("int4", 0.16), ("int4:g32", 0.16), ("fp4_e2m1", 0.16),
                      ("fp6_e2m3", 0.21)]:
    q = leaves(quant.quantize_params(params, SPEC, _fmt(name)))
    held = sum(x.qvalue.nbytes + x.scale.nbytes for x in q)
    f32 = sum(np.prod(quant.logical_shape(x)) * 4 for x in q)
    assert held / f32 <= bound, (name, held / f32)


def test_a_long_packed_axis_splits_into_whole_blocks():
  """A last axis of at least 8 runs of 128 words holds a multiple of 8 packed blocks (shorter
  runs where 128 would not give that), so split 2, 4 or 8 ways each device unpacks its shard
  alone: Llama-3's LM head in int4 (128,256 columns; runs of 128 made 501 blocks) unpacks over
  8 devices with no collective in the compiled program. Packing round-trips at every run."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as Spec

  from jaxinfer.sharding import make_mesh
  for words in (64128, 75968, 16000, 7168, 2048, 1032, 520, 64, 6):
    blocks, run = quant.ops.pack_blocks(words)
    assert blocks * run == words and run & (run - 1) == 0 and run <= 128
    assert blocks % 8 == 0 if words >= 1024 and words % 8 == 0 else run == np.gcd(words, 128)
  assert quant.ops.pack_blocks(7168) == (56, 128)  # Llama-3's MLP columns: as before
  for bits, n in ((4, 2064), (2, 4128)):  # 1,032 words: runs of one word
    v = jax.random.randint(jax.random.key(bits), (3, n), -(1 << (bits - 1)), 1 << (bits - 1))
    np.testing.assert_array_equal(quant.ops.unpack(quant.ops.pack(v, bits), bits, jnp.int32), v)
  split = NamedSharding(make_mesh("model:8"), Spec(None, "model"))
  packed = jax.ShapeDtypeStruct((8, PRESETS["llama3-8b"].vocab_size // 2), jnp.uint8,
                                sharding=split)
  text = jax.jit(lambda p: quant.ops.unpack(p, 4, jnp.int8), out_shardings=split).lower(
      packed).compile().as_text()
  assert not re.search(r"all-to-all|all-gather|collective-permute|all-reduce", text)


def test_embedding_rows_are_dequantized_alone(params):
  """A quantized embedding table is looked up from its packed values and scales, only the rows
  taken dequantized: equal to rows of the dequantized table bit for bit, in every packing, and
  no table-sized temporary in the compiled lookup (dequantized whole, Llama-3-8B's int4 table
  was 4.47 GiB of a TPU decode step's temporaries)."""
  tokens = jax.random.randint(jax.random.key(4), (3, 5), 0, CFG.vocab_size)
  for name in ("int4:g32", "int2:g32", "fp6_e2m3", "fp4_e2m1", "int8:a8"):
    q = quant.quantize_params(params, SPEC, _fmt(name, ("embed",))).embed
    np.testing.assert_array_equal(np.asarray(quant.take_rows(q, tokens)),
                                  np.asarray(jnp.take(quant.weight(q), tokens, axis=0)))
  q = quant.quantize(jnp.ones((4096, 1024)), SPEC.embed, _fmt("int4:g32", ("embed",)))
  temp = jax.jit(quant.take_rows).lower(q, tokens).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4096 * 1024, temp


def test_fp6_values_round_as_a_cast_to_the_6_bit_type_would(params):
  """XLA here has no 6-bit float arrays: fp6 values are rounded on the type's grid and packed as
  their codes, four to three bytes (a byte each in an 8-bit float type when the last axis does
  not divide into words). The rounding equals ml_dtypes' cast (to nearest, ties to even) on
  random values, on every tie between neighbouring values, and with the scales qwix would give."""
  rng = np.random.RandomState(0)
  for qtype in (ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn):
    top = float(ml_dtypes.finfo(qtype).max)
    grid = np.unique(np.linspace(-top, top, 1 << 20, dtype=np.float32).astype(qtype)
                     .astype(np.float32))
    assert len(grid) == 63  # (+0 and -0 equal)
    ties = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    x = np.concatenate([rng.uniform(-top, top, 1 << 16).astype(np.float32), ties, grid])
    np.testing.assert_array_equal(np.asarray(quant.ops.round_to_float(jnp.asarray(x), qtype)),
                                  x.astype(qtype).astype(np.float32))
  for qtype in (ml_dtypes.float4_e2m1fn, ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn):
    table = quant.ops._float_table(qtype)  # every value, -0 included, back to its own code
    np.testing.assert_array_equal(quant.ops._float_codes(jnp.asarray(table), qtype),
                                  np.arange(len(table)))
  spec, w = SPEC.layers[0].mlp.gate, params.layers[0].mlp.gate
  for name, qtype in [("fp6_e2m3", ml_dtypes.float6_e2m3fn),
                      ("fp6_e3m2:g32", ml_dtypes.float6_e3m2fn)]:
    fmt = _fmt(name)
    q = quant.quantize(w, spec, fmt)  # four values to three bytes
    assert q.qvalue.dtype == jnp.uint8 and q.qvalue.shape == w.shape[:-1] + (w.shape[-1] * 3 // 4,)
    assert quant.logical_shape(q) == w.shape
    channelwise, tiled = quant.scale_axes(spec, fmt)
    ref = qwix.quantize(w, jnp.float8_e4m3fn, channelwise_axes=channelwise, tiled_axes=tiled,
                        calibration_method=f"absmax,{448 / float(ml_dtypes.finfo(qtype).max)}")
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(ref.scale), rtol=1e-6)
    values = np.asarray(quant.dequantize(q) / q.scale.repeat(w.shape[0] // q.scale.shape[0], 0)
                        .repeat(w.shape[1] // q.scale.shape[1], 1))
    np.testing.assert_allclose(values, values.astype(qtype).astype(np.float32),  # on the grid
                               rtol=1e-6)
    odd = quant.quantize(w[:, :126], dataclasses.replace(spec, shape=(64, 126)),
                         _fmt(name.split(":")[0]))
    assert odd.qvalue.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2)  # no whole words: a byte each
    np.testing.assert_array_equal(np.asarray(quant.dequantize(odd)),
                                  np.asarray(quant.dequantize(quant.quantize(
                                      w, spec, _fmt(name.split(":")[0]))))[:, :126])


@pytest.mark.parametrize("name,include", FORMATS)
def test_served_decode_logits_equal_the_qat_forward(params, name, include):
  fmt = _fmt(name, include)
  served = quant.quantize_params(params, SPEC, fmt)
  assert all(quant.is_quantized(l.attn.o) and quant.is_quantized(l.mlp.down)
             for l in served.layers)
  assert quant.is_quantized(served.embed) == ("embed" in include)
  qat = jax.jit(lambda p: quant.qat_params(p, SPEC, fmt))(params)
  got, want = _greedy_logits(served, PROMPT), _greedy_logits(qat, PROMPT)
  assert got.shape == (DECODE_STEPS + 1, 2, CFG.vocab_size)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  full = _greedy_logits(params, PROMPT)
  assert float(jnp.abs(full - got).max()) > 0  # the format really changed the weights


_DEFAULT_FLAGS_CHECK = """
import dataclasses, jax, jax.numpy as jnp, numpy as np
from jaxinfer import model as M, quant
from jaxinfer.config import PRESETS
cfg = dataclasses.replace(PRESETS["tiny"], head_dim=32)
spec, params = M.Transformer.spec(cfg), M.init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
pos = jnp.broadcast_to(jnp.arange(8), tokens.shape)
fwd = lambda p: M.logits(p, M.forward(p, tokens, pos, cfg)[0])
for name, include in (("int8:a8", ()), ("int8", ("embed", "lm_head", "norm"))):
  fmt = quant.QuantFormat.parse(name, include)
  served = jax.jit(fwd)(quant.quantize_params(params, spec, fmt))
  qat = jax.jit(lambda p: fwd(quant.qat_params(p, spec, fmt)))(params)
  print(name, include, float(jnp.abs(served - qat).max()))
"""


def test_served_equals_the_qat_forward_under_xlas_default_flags():
  """The suite compiles without LLVM's optimisations (tests/conftest.py), and so without the
  fused multiply-adds XLA's CPU backend otherwise forms where a product meets an addition. A QAT
  forward that reached the served value by another expression (y + (y_float - y_float) with int8
  activations; an embedding table dequantized whole, then indexed) equalled serving only there:
  under XLA's defaults one forward's logits moved by 0.05 (int8:a8; 5.7 over 64 decode steps)
  and 1.4e-6 (a quantized table).
  Here, in a process of its own with XLA's default flags: equal."""
  env = {**own_devices_env(), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _DEFAULT_FLAGS_CHECK], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2 and all(line.endswith(" 0.0") for line in lines), proc.stdout


def test_generator_greedy_tokens_equal_qat(params):
  fmt = _fmt("int4:g32")
  served = quant.quantize_params(params, SPEC, fmt)
  qat = jax.jit(lambda p: quant.qat_params(p, SPEC, fmt))(params)
  rows = [RowRequest([5, 6, 7, 8, 9], DECODE_STEPS, jax.random.key(0)),
          RowRequest([3, 1], DECODE_STEPS, jax.random.key(1))]
  out = [[r.tokens for r in Generator(CFG, p, steps_per_sync=DECODE_STEPS).generate(rows)]
         for p in (served, qat)]
  assert out[0] == out[1] and all(len(t) == DECODE_STEPS for t in out[0])


def test_conversion_is_idempotent_and_refuses_another_format(params):
  fmt = _fmt("int4:g32", ("embed",))
  once = quant.quantize_params(params, SPEC, fmt)
  twice = quant.quantize_params(once, SPEC, fmt)
  _assert_same(once, twice)
  assert twice.layers[0].attn.o is once.layers[0].attn.o  # kept, not requantized
  with pytest.raises(ValueError,
                     match=r"embed: already quantized in another format \(int4, scales"):
    quant.quantize_params(once, SPEC, _fmt("int8", ("embed",)))
  with pytest.raises(ValueError, match=r"embed: is quantized, but int4:g32"):
    quant.quantize_params(once, SPEC, fmt.__class__("int4", 32))


@pytest.mark.parametrize("name,include", [("int4:g32", ALL), ("ternary", ()), ("fp4_e2m1", ()),
                                          ("fp6_e3m2:g32", ()), ("int8:a8", ())])
def test_orbax_save_restore_is_bit_exact(tmp_path, params, name, include):
  fmt = _fmt(name, include)
  q = quant.quantize_params(params, SPEC, fmt)
  save_orbax(tmp_path, CFG, q, quant_format=fmt)
  assert json.loads((tmp_path / quant.QUANT_FILE).read_text())["format"] == name
  _, restored = load_orbax(tmp_path)
  _assert_same(q, restored)  # qtype is static, so tree structures equal means qtypes equal
  # restored as another float dtype (--dtype): the floats cast, the packed values as stored
  _, cast = load_orbax(tmp_path, "bfloat16")
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(cast)):
    assert b.dtype == (jnp.bfloat16 if a.dtype == jnp.float32 else a.dtype), (a.dtype, b.dtype)
    np.testing.assert_array_equal(np.asarray(a.astype(b.dtype)), np.asarray(b))


def test_checkpoint_errors(tmp_path, params):
  fmt = _fmt("int8")
  q = quant.quantize_params(params, SPEC, fmt)
  with pytest.raises(ValueError, match="quantized; pass their format"):
    save_orbax(tmp_path, CFG, q)
  with pytest.raises(ValueError, match="do not match quantization format int4:g32"):
    save_orbax(tmp_path, CFG, q, quant_format=_fmt("int4:g32"))
  with pytest.raises(ValueError, match="orbax"):
    save_hf(tmp_path / "hf", CFG, q)
  save_orbax(tmp_path, CFG, q, quant_format=fmt)
  meta = tmp_path / quant.QUANT_FILE
  meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
  want = rf"version 99, but this jaxinfer reads version {quant.QUANT_VERSION}"
  with pytest.raises(ValueError, match=want) as e:
    load_orbax(tmp_path)
  assert "\n" not in str(e.value)
  meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": quant.QUANT_VERSION,
                              "format": 3}))  # (a traceback)
  with pytest.raises(ValueError, match="expected a format name and a list of roles"):
    load_orbax(tmp_path)
  meta.write_text(json.dumps({"version": quant.QUANT_VERSION}))  # (a bare KeyError's 'format')
  with pytest.raises(ValueError, match=r"quantization.json: no \"format\""):
    load_orbax(tmp_path)
  # a format whose groups do not divide this model's axes: named with its file
  meta.write_text(json.dumps({"version": quant.QUANT_VERSION, "format": "int4:g64"}))
  with pytest.raises(ValueError, match=r"quantization.json: .*attn.o: int4:g64: groups of 64"):
    load_orbax(tmp_path)
  save_orbax(tmp_path, CFG, params)  # a full-precision save drops the format record
  assert not meta.exists()
  # a format record that does not describe the arrays, or arrays gone: one line each naming the
  # first array that differs (orbax's tree diff ran to hundreds of lines, or was cut mid-way; a
  # missing array file was a traceback)
  quant.write_metadata(tmp_path, _fmt("int4:g32"))
  with pytest.raises(ValueError, match=r"params/ does not restore as config.json and "
                                       r"quantization.json \(int4:g32\) describe it: "
                                       r"layers\.0\.\S+\.qvalue is not stored$") as e:
    load_orbax(tmp_path)
  assert "\n" not in str(e.value)
  save_orbax(tmp_path, CFG, q, quant_format=fmt)
  quant.write_metadata(tmp_path, _fmt("int4:g32"))  # the same tree, other arrays
  with pytest.raises(ValueError, match=r"describe it: layers\.0\.\S+\.qvalue is stored as "
                                       r"int8\[64, 4, 32\], expected uint8\[64, 4, 16\]$"):
    load_orbax(tmp_path)
  # formats whose arrays have the same shapes and dtypes: params/ keep their own record (a
  # quantization.json left by an earlier save, or edited, served the values wrongly, silently)
  for written, other in (("int4:g32", "fp4_e2m1:g32"), ("fp6_e2m3", "fp6_e3m2")):
    save_orbax(tmp_path, CFG, quant.quantize_params(params, SPEC, _fmt(written)),
               quant_format=_fmt(written))
    quant.write_metadata(tmp_path, _fmt(other))
    with pytest.raises(ValueError, match=rf"describe it: its arrays were written quantized as "
                                         rf"{written} \(include \[\]\), but quantization.json "
                                         rf"names {other} \(include \[\]\)$"):
      load_orbax(tmp_path)
  # params/ written without the record (by hand, or an older jaxinfer): the arrays decide alone
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "params", quant.quantize_params(params, SPEC, _fmt("int4:g32")),
               force=True)
  quant.write_metadata(tmp_path, _fmt("int4:g32"))
  load_orbax(tmp_path)
  save_orbax(tmp_path, CFG, params)
  quant.write_metadata(tmp_path, None)
  shutil.rmtree(tmp_path / "params" / "d")
  with pytest.raises(ValueError, match=r"params/ does not restore as config.json describe") as e:
    load_orbax(tmp_path)
  assert "\n" not in str(e.value)


def test_ste_gradient_is_the_gradient_at_the_dequantized_weights(params):
  fmt = _fmt("int4:g32", ALL)
  batch = jax.random.randint(jax.random.key(2), (2, 17), 0, CFG.vocab_size)
  loss = lambda p: jnp.mean(token_losses(p, batch, CFG))
  g_ste = jax.jit(jax.grad(lambda p: loss(quant.qat_params(p, SPEC, fmt))))(params)
  at = jax.tree_util.tree_map(quant.weight, quant.quantize_params(params, SPEC, fmt),
                              is_leaf=quant.is_quantized)
  g_ref = jax.jit(jax.grad(loss))(at)
  # two programs, whose fusions XLA may order differently: equal to float32 rounding
  assert jax.tree_util.tree_structure(g_ste) == jax.tree_util.tree_structure(g_ref)
  for a, b in zip(_leaves(g_ste), _leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(b).max()))
  assert float(jnp.abs(g_ste.layers[0].attn.o).max()) > 0


def test_training_without_quantization_is_unchanged(params):
  batch = jax.random.randint(jax.random.key(3), (2, 17), 0, CFG.vocab_size)
  assert quant.qat_params(params, SPEC, None) is params
  plain = lambda p: jnp.mean(token_losses(p, batch, CFG))
  off = lambda p: lm_loss_fn(CFG)(p, None, batch, None)[0]
  # the same program as the loss written without any quantization in it
  assert str(jax.make_jaxpr(jax.grad(off))(params)) == str(jax.make_jaxpr(jax.grad(plain))(params))
  assert "round" not in str(jax.make_jaxpr(off)(params))
  on = lm_loss_fn(CFG, _fmt("int4:g32"))(params, None, batch, None)[0]
  assert float(on) != float(off(params))


def test_two_axis_grouping_follows_the_declaration(params):
  """o (N, H, D) contracts heads and head_dim; its groups run along head_dim within one head.
  QAT and PTQ read that from the same declaration, so their logits are equal; grouping along
  heads instead moves them (the test would see a path that grouped differently)."""
  fmt = _fmt("int4:g4")  # divides heads (4) as well as head_dim (32)
  o, spec = params.layers[0].attn.o, SPEC.layers[0].attn.o
  n, h, d = o.shape
  q = quant.quantize(o, spec, fmt)
  assert q.scale.shape == (n, h // 4, d)
  absmax = jnp.abs(o).reshape(n, h // 4, 4, d).max(axis=2)
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(absmax / 7.5))  # qwix's bound

  tokens = PROMPT
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  run = jax.jit(lambda p: M.logits(p, M.forward(p, tokens, pos, CFG)[0]))
  served = run(quant.quantize_params(params, SPEC, fmt))
  qat = run(quant.qat_params(params, SPEC, fmt))
  np.testing.assert_array_equal(np.asarray(served), np.asarray(qat))

  heads_spec = dataclasses.replace(spec, group="q_heads")
  qat_tree = quant.qat_params(params, SPEC, fmt)
  heads = qat_tree.replace(layers=tuple(
      l.replace(attn=l.attn.replace(o=quant.fake_quant(p.attn.o, heads_spec, fmt)))
      for l, p in zip(qat_tree.layers, params.layers)))
  other = run(heads)
  assert float(jnp.abs(other - served).max()) > 1e-3


def test_formats_parse_and_refuse_in_one_line(params):
  for name in ("int8", "int4", "int4:g128", "int2:g32", "ternary", "fp8_e4m3", "fp8_e5m2",
               "fp4_e2m1", "fp6_e2m3", "fp6_e3m2:g32", "int8:a8", "ternary:a8", "int4:g32:a8"):
    assert _fmt(name).name == name
  for bad, needle in [("int3", "unknown"), ("int4:128", "KIND:gN"), ("int4:g1", "at least 2"),
                      ("int8:gx", "KIND:gN"), ("int8:a4", "KIND:a8"), ("int8:a8:a8", "KIND:a8"),
                      ("fp8_e4m3:a8", "integer weights"), ("int4:g\u00b2", "KIND:gN"),
                      ("int4:g\u0661\u0662\u0668", "KIND:gN")]:  # (non-ASCII digits)
    with pytest.raises(ValueError, match=needle) as e:
      _fmt(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="include"):
    _fmt("int8", ("bias",))
  with pytest.raises(ValueError, match=r"layers\[0\].attn.o: int4:g64: groups of 64 do not "
                                       r"divide head_dim \(32\)"):
    quant.quantize_params(params, SPEC, _fmt("int4:g64"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return make_tiny_model_dir(tmp_path_factory.mktemp("quant_model"), head_dim=32)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxinfer", *args], capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("fmt,output,needle", [
    ("int3", "new", "--format: quantization format 'int3': unknown"),
    ("int4:g64", "new", "--format: .* groups of 64 do not divide head_dim"),
    ("int8", "a file", "is a file"), ("int8", "the model", "is the model being read"),
    # (an empty name wrote into the working directory, removing files there; a directory under
    # a file was a traceback)
    ("int8", "empty", "--output: empty"), ("int8", "under a file", "f is a file, so .* cannot")])
def test_cli_errors_are_one_line(tmp_path, model_dir, fmt, output, needle):
  dest = {"new": tmp_path / "q", "a file": tmp_path / "f", "the model": model_dir, "empty": "",
          "under a file": tmp_path / "f" / "q"}[output]
  (tmp_path / "f").write_text("")
  proc = _cli("quantize", f"--model={model_dir}", f"--format={fmt}", f"--output={dest}")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(line) == 1 and re.search(needle, line[0]), line


def test_cli_quantize_then_generate(tmp_path, model_dir):
  from jaxinfer.requests import Defaults
  from jaxinfer.runner import GenerateJob, run
  out = tmp_path / "q"
  proc = _cli("quantize", f"--model={model_dir}", "--format=int4:g32", "--include=embed",
              f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  cfg, restored, tok = load_model(str(out))
  _, full, _ = load_model(str(model_dir))
  _assert_same(restored, quant.quantize_params(full, M.Transformer.spec(cfg),
                                               _fmt("int4:g32", ("embed",))))
  assert tok is not None
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"id": 1, "prompt": "def add("}) + "\n")
  metrics = run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "o.jsonl"),
                            model=str(out), mesh="data:1", progress=False,
                            defaults=Defaults(max_new_tokens=8)))
  record = json.loads((tmp_path / "o.jsonl").read_text())
  assert metrics["num_failed"] == 0 and record["completion_tokens"] > 0
  # training cannot update quantized weights: one line, before any work (it was a traceback
  # from jax.grad, its workdir left behind)
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 100)
  proc = _cli("train", f"--model={out}", f"--data={data}", f"--output={tmp_path / 't'}",
              "--steps=2", "--batch_size=2", "--seq_len=16")
  assert proc.returncode == 2 and "holds quantized weights" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "t.run").exists()
  # convert keeps the format in orbax (it asked for one it had no flag for) and refuses HF
  proc = _cli("convert", f"--model={out}", "--format=orbax", f"--output={tmp_path / 'o'}")
  assert proc.returncode == 0, proc.stderr
  _assert_same(load_model(str(tmp_path / "o"))[1], restored)
  proc = _cli("convert", f"--model={out}", "--format=hf", f"--output={tmp_path / 'h'}")
  assert proc.returncode == 2 and "is quantized (int4:g32)" in proc.stderr, proc.stderr
  # options quantize does not read are unknown to it (its --mesh was taken and ignored)
  proc = _cli("quantize", f"--model={model_dir}", "--format=int8", f"--output={tmp_path / 'm'}",
              "--mesh=fsdp:3")
  assert proc.returncode != 0 and "Unknown command line flag 'mesh'" in proc.stderr


def test_quantized_model_serves_sharded_speculative_and_under_trained_heads(tmp_path, model_dir):
  """A PTQ checkpoint through the Python API: sharded serving equals one device, speculative
  decoding on it equals its plain greedy decoding, and draft heads train on it as a frozen
  base and serve losslessly."""
  import jaxinfer
  out, before, after = jaxinfer.quantize(str(model_dir), str(tmp_path / "q"), "int4:g32")
  assert after < before
  prompts = ["def add(a, b):\n    return a + b\n\ndef add(", "class Point:", [5, 6, 7, 8] * 5]
  greedy = jaxinfer.SamplingParams(max_new_tokens=12)
  ids = lambda llm: [o.completion_ids for o in llm.generate(prompts, greedy)]
  plain = ids(jaxinfer.LLM(str(out), mesh="data:1", progress=False))
  for mesh in ("fsdp:2", "data:2,model:2"):
    assert ids(jaxinfer.LLM(str(out), mesh=mesh, progress=False)) == plain, mesh
  assert ids(jaxinfer.LLM(str(out), speculative="ngram", speculation="always", mesh="data:1",
                          progress=False)) == plain
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 200)
  heads = jaxinfer.train_draft(str(out), str(data), str(tmp_path / "heads"), steps=5,
                               batch_size=4, seq_len=32, num_heads=2, tree_nodes=4,
                               progress=False)
  assert heads.info["mesh"] == "data:8,fsdp:1,model:1"  # (no mesh: every device on `data`)
  medusa = jaxinfer.LLM(str(out), speculative="medusa", draft_heads=str(heads.path),
                        speculation="always", mesh="data:1", progress=False)
  assert ids(medusa) == plain
  assert medusa.metrics["speculative_batches"] > 0 and medusa.metrics["verify_steps"] > 0
  # Medusa-2's adapters would train the quantized weights themselves: refused in one line
  with pytest.raises(jaxinfer.UserError, match="^method=medusa2: .* quantized"):
    jaxinfer.train_draft(str(out), str(data), str(tmp_path / "m2"), method="medusa2", steps=2,
                         batch_size=2, seq_len=16, progress=False)


def test_include_as_a_string_and_a_tied_lm_head(tmp_path):
  """`include` spelled as the flag is ("embed,norm"); a model whose LM head is its embeddings
  has no lm_head to include (it was recorded and nothing quantized; beside embed it is
  dropped)."""
  import jaxinfer
  tied = make_tiny_model_dir(tmp_path / "tied", tie_embeddings=True)
  with pytest.raises(jaxinfer.UserError, match="^include: .* ties its LM head"):
    jaxinfer.quantize(str(tied), str(tmp_path / "q"), "int8", include="lm_head")
  out, before, after = jaxinfer.quantize(str(tied), str(tmp_path / "q"), "int8",
                                         include="embed, norm")
  assert quant.read_metadata(out).include == ("embed", "norm")
  # embed quantizes a tied LM head too: lm_head beside it is not recorded as a role of its own
  out, *_ = jaxinfer.quantize(str(tied), str(tmp_path / "q2"), "int8", include="embed,lm_head")
  assert quant.read_metadata(out).include == ("embed",)
  # a record naming lm_head alone for a tied model: refused where it is read, naming the file
  quant.write_metadata(out, _fmt("int8", ("lm_head",)))
  with pytest.raises(ValueError, match=r"quantization.json: quantization include \['lm_head'\]: "
                                       r"the model ties its LM head"):
    load_orbax(out)
  from jaxinfer import aot
  with pytest.raises(aot.CompileError, match=r"^--model: .*quantization.json: .* ties its LM"):
    aot.checkpoint_format(aot.CompileJob("tpu:v5e:2x2", model=str(out)))


def test_int8_activations_serve_sharded_and_refuse_speculation(tmp_path, model_dir):
  """An :a8 checkpoint serves through the engine on a mesh (here as on one device: past a
  rounding flip it need not, docs/quantization.md); speculation on it is refused in one line
  (rounded activations make verification and decoding disagree)."""
  import jaxinfer
  from jaxinfer.errors import UserError
  out, _, _ = jaxinfer.quantize(str(model_dir), str(tmp_path / "a8"), "int8:a8")
  prompts = ["def add(a, b):", "class Point:"]
  ids = lambda llm: [o.completion_ids for o in llm.generate(
      prompts, jaxinfer.SamplingParams(max_new_tokens=6))]
  assert (ids(jaxinfer.LLM(str(out), mesh="fsdp:2", progress=False))
          == ids(jaxinfer.LLM(str(out), mesh="data:1", progress=False)))
  with pytest.raises(UserError, match="quantizes activations") as e:
    jaxinfer.LLM(str(out), speculative="ngram", progress=False).generate(prompts)
  assert "\n" not in str(e.value)
  data = tmp_path / "data.txt"  # heads trained on it could never be served: refused up front
  data.write_text("def add(a, b):\n    return a + b\n\n" * 100)
  with pytest.raises(UserError, match="quantizes activations .* never be served"):
    jaxinfer.train_draft(str(out), str(data), str(tmp_path / "heads"), steps=2, batch_size=2,
                         seq_len=16, progress=False)
