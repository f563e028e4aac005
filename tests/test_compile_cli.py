"""`jaxinfer compile`: the engine's steps compiled for a TPU topology with libtpu's compile-only
client (no TPU here), lowered for CUDA, and configurations that do not fit refused in one line."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys

import jax
import pytest
from hf_models import COMMON

from jaxinfer import aot
from jaxinfer.config import PRESETS
from jaxinfer.engine.engine import pool_pages_for
from jaxinfer.kv_cache import PagedKVCache

TPU = "tpu:v5e:2x2"  # 4 chips of 16 GiB


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxinfer", "compile", *args],
                        capture_output=True, text=True, timeout=300)


def test_tpu_steps_on_a_model_mesh_with_verification():
  job = aot.CompileJob(TPU, model="preset:tiny", mesh="model:2", batch_size=4, max_seq_len=64,
                       speculative="recycling", implementation="pallas")
  report = aot.run(job)
  cfg = PRESETS["tiny"]
  # recycling speculates inside the engine: its trees beside the lanes, and decode-only
  assert [s.name for s in report.steps] == ["prefill", "decode", "verify-prefill", "verify"]
  assert report.hbm_bytes == 16 * 2**30 and report.replicas == 1 and report.mesh == "model:2"
  prefill, decode, verify_prefill, verify = report.steps
  # the engine's default pool, which holds each sequence's tree too (the plain steps were
  # compiled over a pool without them, and the report said that smaller count)
  tree = aot.proposer_for(cfg, job, None)[0].tree_size
  pages = pool_pages_for(job.engine_config, -(-(64 + tree) // 16))
  assert report.settings["kv_pages"] == pages > pool_pages_for(job.engine_config, 64 // 16)
  # 2 KV heads over model:2: each device holds half of every pool
  assert decode.kv_bytes == PagedKVCache.pool_bytes(cfg, pages, 16) // 2
  assert 0 < decode.weights_bytes < cfg.num_params() * 4  # heads, mlp, vocab split
  assert all(s.kernels for s in report.steps)  # Pallas kernels, not interpreted
  for s in (prefill, decode):
    assert s.compile_s > 0 and s.alias_bytes >= s.kv_bytes  # the pools are updated in place
    assert s.total_bytes >= s.weights_bytes + s.kv_bytes
  assert verify.kv_bytes > decode.kv_bytes  # the pool and the rows' tokens on the device
  assert verify_prefill.alias_bytes >= decode.kv_bytes  # the pool updated in place
  assert verify.total_bytes >= verify.argument_bytes
  record = json.loads(json.dumps(report.as_dict(), default=str))
  assert record["fits"] is True and record["peak_bytes"] == max(s.total_bytes
                                                               for s in report.steps)
  assert record["settings"]["kv_pages"] == pages and record["config"]["num_layers"] == 2
  for key in ("lower_s", "compile_s", "weights_bytes", "kv_bytes", "argument_bytes",
              "output_bytes", "alias_bytes", "temp_bytes", "total_bytes", "collective_bytes"):
    assert isinstance(record["steps"][1][key], (int, float)), key
  # heads and MLP split over model:2: each layer's attention output and MLP are summed
  assert decode.collective_bytes >= 2 * cfg.num_layers * 4 * cfg.embed * 4
  table = report.table()
  assert "TPU v5 lite" in table and all(name in table for name in ("prefill", "decode", "verify"))
  assert "comm" in table


def test_fsdp_with_pallas_and_speculation_compiles_and_sums_the_lm_head(tmp_path):
  """--mesh=fsdp:4 under the Pallas kernels with speculation: libtpu's compiler crashed
  (SIGSEGV) on the verification step, whose rows' counters, split as the kernels split rows, were
  sums across devices accumulated in its loops; and FSDP splits the LM head along `embed`, which
  XLA gathered whole every decode step to keep the logits' rows split (Llama-3-8B: 1.00 GiB per
  device per step, 28 MiB now). Run as a user would: a crash is a failed command."""
  out = tmp_path / "report.json"
  res = _cli(f"--target={TPU}", "--model=preset:tiny", "--mesh=fsdp:4", "--batch_size=8",
             "--kv_pages=64", "--implementation=pallas", "--speculative=ngram",
             f"--output={out}")
  assert res.returncode == 0, res.stderr[-2000:]
  steps = {s["name"]: s for s in json.loads(out.read_text())["steps"]}
  assert list(steps) == ["prefill", "decode", "verify-prefill", "verify"]
  cfg = PRESETS["tiny"]
  # the LM head's partial logits summed, never the weight gathered (was 8.6x the weight)
  assert steps["decode"]["collective_bytes"] < cfg.embed * cfg.vocab_size * 4


def test_layer_skip_drafts_with_the_targets_shards():
  """Layer skip's draft weights are the target's own (split over fsdp as they are), counted
  once: the verification steps hold no more weights than plain decoding (a whole copy of half
  the layers, embeddings and LM head on every device before)."""
  job = aot.CompileJob(TPU, model="preset:tiny", mesh="fsdp:4", batch_size=8, kv_pages=64,
                       speculative="layerskip", num_draft_tokens=1)
  prefill, decode, verify_prefill, verify = aot.run(job).steps
  assert verify.weights_bytes == decode.weights_bytes < PRESETS["tiny"].num_params() * 4 / 2
  for step in (verify_prefill, verify):  # the buffers passed twice, counted once
    assert step.argument_bytes < decode.argument_bytes + step.kv_bytes


def test_eagle_compiles_from_its_layers_shapes_and_drafts_through_the_kernels():
  """--speculative=eagle reads no trained weights: its draft layer by shape, whole on each
  device, over the target's own output projection; under pallas on a mesh its one-token draft
  steps run the paged decode kernel (with the target's tree kernel and both models' prompt
  chunks through the tree kernel: 4 kernels in the mixed step, where a draft through XLA's
  attention left 3)."""
  from jaxinfer.aot_steps import engine_tree_steps, params_shapes, proposer_for, whole_on
  from jaxinfer.runtime import Runtime
  job = aot.CompileJob(TPU, model="preset:tiny", mesh="fsdp:2,model:2", batch_size=2,
                       kv_pages=16, implementation="pallas", speculative="eagle",
                       num_draft_tokens=2)
  target, cfg = aot.parse_target(TPU), aot.model_config(job)
  mesh, _ = aot.replica_mesh(aot.target_devices(target), job.mesh, target)
  runtime = Runtime(mesh, implementation="pallas")
  params = params_shapes(cfg, job, mesh, runtime)
  proposer, heads = proposer_for(cfg, job, params)
  heads = jax.tree_util.tree_map(lambda x: whole_on(mesh)(x.shape, x.dtype), heads)
  steps, _, draft_bytes = engine_tree_steps(cfg, job, params, runtime, proposer, heads)
  # the layer, its input projection (2D, D) and norm, whole on each device; no output projection
  assert draft_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(heads))
  assert heads.proj is None and heads.draft.fc.shape == (2 * cfg.embed, cfg.embed)
  step = aot.compile_step("verify-prefill", *steps["verify-prefill"], target)
  assert step.kernels == 4 and step.compile_s > 0


def test_collective_bytes_are_read_from_the_program():
  """What a compiled program's collectives deliver to a device: each result (every part of a
  tuple), asynchronous ones counted once (their -done half), other instructions not at all."""
  hlo = """
  %ag-start = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(bf16[8,128]{1,0} %p)
  %ag-done = bf16[32,128]{1,0} all-gather-done((bf16[8,128]{1,0}, bf16[32,128]{1,0}) %ag-start)
  ROOT %all-reduce = f32[8,1,4096]{2,0,1:T(8,128)} all-reduce(f32[8,1,4096] %x), to_apply=%add
  %a2a = (s8[4,16]{1,0}, s8[4,16]{1,0}) all-to-all(s8[4,16] %a, s8[4,16] %b), dimensions={0}
  %fusion = f32[1024,1024]{1,0} fusion(f32[8] %all-reduce), kind=kLoop
  %cp-done = u4[256]{0} collective-permute-done(u4[256] %cp)
  %ar7 = (f32[8]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, /*index=5*/f32[8]{0},
          f32[8]{0}) all-reduce(f32[8]{0} %a, f32[8]{0} %b), to_apply=%add"""
  assert aot.collective_bytes(hlo) == 32 * 128 * 2 + 8 * 4096 * 4 + 2 * 64 + 128 + 7 * 32


def test_quantized_weights_compile_and_count_their_own_bytes():
  """--quantize: the steps compiled over int8 weights (values and per-channel scales laid out as
  the weights), which take about a quarter of float32's bytes per device, with int8 activations
  (the linear layers' integer matmuls), embeddings and LM head too with --quantize_include; a
  bad format is one line naming the flag."""
  common = dict(model="preset:tiny", dtype="float32", batch_size=2, kv_pages=16)
  int8 = aot.run(aot.CompileJob(TPU, **common, mesh="data:4", quantize="int8:a8",
                                quantize_include=("embed", "lm_head")))
  assert [s.name for s in int8.steps] == ["prefill", "decode"]
  # one device per replica: the whole model on each
  ratio = int8.steps[1].weights_bytes / (PRESETS["tiny"].num_params() * 4)
  assert 0.25 < ratio <= 0.27, ratio  # (the norms stay float32)
  assert "weights int8:a8 with embed, lm_head)" in int8.table()
  assert int8.settings["quantize"] == "int8:a8"
  with pytest.raises(aot.CompileError, match="^--quantize: "):
    aot.run(aot.CompileJob(TPU, **common, quantize="int3"))


def test_hf_directory_needs_only_its_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**COMMON, "model_type": "llama",
                                                    "torch_dtype": "bfloat16"}))
  job = aot.CompileJob(TPU, model=str(tmp_path), mesh="data:2,fsdp:2", batch_size=4)
  report = aot.run(job)
  assert report.config["vocab_size"] == COMMON["vocab_size"]
  assert report.config["dtype"] == "bfloat16"
  assert report.replicas == 2 and report.mesh == "fsdp:2"
  # the default pool: 1.5 x slots x the context's pages, plus one
  assert report.settings["kv_pages"] == int(4 * (COMMON["max_position_embeddings"] // 16) * 1.5) + 1
  assert [s.name for s in report.steps] == ["prefill", "decode"]


def test_a_pool_that_does_not_fit_is_one_line_naming_kv_pages(tmp_path):
  out = tmp_path / "r.json"
  res = _cli(f"--target={TPU}", "--model=preset:tiny", "--mesh=model:2", "--kv_pages=100000000",
             f"--output={out}")
  assert res.returncode == 2 and res.stdout == ""
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  # (refused before compiling: the step's temporaries are not known yet)
  assert lines[0].startswith("error: --kv_pages:") and "lower --kv_pages to fewer than" in lines[0]
  assert not out.exists()


def test_the_kv_pages_advice_fits():
  """Where the compiler refuses a pool, the advice is a page count that compiles, below the
  one asked for (it was counted against the chip's 16 GiB, of which v5e's compiler has 15.75,
  and read from its sizes rounded to 0.01 GiB: it repeated the count refused). A mesh leaving
  devices of the slice unused is said."""
  job = aot.CompileJob("tpu:v5e:2x4", model="preset:tiny", mesh="model:2", batch_size=2,
                       max_seq_len=64, kv_pages=4_150_000)  # 4 KiB a page: 15.83 GiB
  with pytest.raises(aot.CompileError, match=r"^--kv_pages: .* 15\.75 GiB of HBM free; lower "
                     r"--kv_pages to at most (\d+) \(now 4150000\)") as e:
    aot.run(job)
  fit = int(re.search(r"at most (\d+)", str(e.value))[1])
  assert fit < 4_150_000
  report = aot.run(dataclasses.replace(job, kv_pages=fit))
  assert report.as_dict()["fits"]
  assert "mesh model:2 per replica, 1 replica(s) on 2 of the 8 devices;" in report.table()


def test_the_compilers_out_of_memory_words_are_read_in_either_form():
  """libtpu says a step is too big in two ways; both give the bytes needed and usable (the
  second was not read: the advice then removed one page of the thousands too many). Where the
  pool is not what to shrink, the advice is --batch_size (it was a negative page count)."""
  gib = aot.GIB
  assert aot._compiler_oom("RESOURCE_EXHAUSTED: ... 5.0M required for HLO temporaries (16.00G) "
                           "exceeds available HBM (15.75G) ...") == (16 * gib, int(15.75 * gib))
  said = aot._compiler_oom("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: ... Used 15.75G of "
                           "15.75G hbm. Exceeded hbm capacity by 2.23M.")
  assert said == (int(15.75 * gib) + int(2.23 * 2**20) + 1, int(15.75 * gib))
  assert aot._compiler_oom("RESOURCE_EXHAUSTED: out of memory") is None
  report = aot.Report(TPU, "TPU v5 lite", 4, 16 * gib, "model:2", 1, "preset:tiny", {},
                      {"kv_pages": 64, "batch_size": 512})
  mib = 2**20
  usable = int(15.75 * gib)  # 10 pages of 256 MiB too many (and the rounding's 0.01 GiB)
  advice = aot._shrink_advice(report, "prefill", usable + 10 * 256 * mib, mib, 16 * gib,
                              16 * gib, usable)
  assert advice.startswith("--kv_pages: ") and "at most 53 (now 64)" in advice
  advice = aot._shrink_advice(report, "prefill", int(15.75 * gib), mib, mib, mib,
                              int(15.75 * gib))
  assert advice.startswith("--batch_size: ") and "(now 512)" in advice


def test_slices_are_as_jax_on_them_sees_them():
  """A v4 chip's two cores are one megacore device of 32 GiB (libtpu's default: two of 16);
  one-chip slices compile (libtpu's default host of 2x2x1 chips refused them); a v5e slice of 8
  chips is one host, and a mesh leaving devices unused on a slice of several hosts is refused,
  as jaxinfer generate refuses it."""
  v4 = aot.parse_target("tpu:v4:2x2x1")
  devices = aot.target_devices(v4)
  assert len(devices) == 4 and aot.hbm_per_device(v4, devices) == 32 * aot.GIB
  for one in ("tpu:v6e:1x1", "tpu:v5e:1x1", "tpu:v5p:1x1x1"):
    assert len(aot.target_devices(aot.parse_target(one))) == 1
  assert {d.process_index for d in aot.target_devices(aot.parse_target("tpu:v5e:2x4"))} == {0}
  with pytest.raises(aot.CompileError, match="--mesh: .* spans 4 hosts .* must use all 16"):
    aot.run(aot.CompileJob("tpu:v5e:4x4", model="preset:tiny", mesh="model:2"))


def test_weights_that_do_not_fit_ask_for_a_wider_mesh():
  # every device a replica of its own: 15 GiB of bfloat16 weights beside 8 GiB of KV pages on
  # each 16 GiB chip (refused before compiling)
  with pytest.raises(aot.CompileError, match=r"^--mesh: .* weights alone"):
    aot.run(aot.CompileJob(TPU, model="preset:llama3-8b", kv_pages=4096))


def test_cuda_is_lowered_and_reported_without_memory_numbers(tmp_path):
  out = tmp_path / "r.json"
  res = _cli("--target=cuda", "--model=preset:tiny", "--mesh=model:2", "--batch_size=4",
             "--kv_pages=64", "--implementation=pallas", f"--output={out}")
  assert res.returncode == 0, res.stderr
  assert "compiling for cuda needs the GPU" in res.stdout
  record = json.loads(out.read_text())
  assert record["target"] == "cuda" and record["hbm_bytes"] is None and record["fits"] is None
  assert [s["name"] for s in record["steps"]] == ["prefill", "decode"]
  assert all(s["lower_s"] > 0 and s["compile_s"] is None and s["total_bytes"] is None
             and s["kernels"] > 0 for s in record["steps"])  # Triton kernels, not interpreted


@pytest.mark.parametrize("target, message", [
    ("tpu:v9:2x2", "--target: expected tpu:GEN:TOPOLOGY"),
    ("gpu", "--target: expected"),
    ("tpu:v5e", "--target: expected"),
    ("tpu:v6e:2x2x2", "--target: v6e slices are two-dimensional"),
])
def test_unknown_targets(target, message):
  with pytest.raises(aot.CompileError, match=message):
    aot.run(aot.CompileJob(target, model="preset:tiny"))


def test_unknown_topology_is_libtpus_word_in_one_line():
  with pytest.raises(aot.CompileError, match="libtpu does not know this topology") as e:
    aot.run(aot.CompileJob("tpu:v5e:3x7", model="preset:tiny"))
  assert "\n" not in str(e.value)


def test_missing_libtpu_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(aot.CompileError, match=r'pip install -e "\.\[tpu-aot\]"'):
    aot.run(aot.CompileJob(TPU, model="preset:tiny"))


@pytest.mark.parametrize("overrides, message", [
    (dict(model="preset:nope"), "--model: unknown preset"),
    (dict(model="/no/such/dir"), "--model: expected preset:NAME"),
    (dict(speculative="medusa"), "--speculative: compile takes one of"),
    (dict(sparsity="block_topk:8", speculative="ngram"), "--sparsity:"),
    (dict(mesh="model:16"), "--mesh: .* needs 16 devices"),
    (dict(speculative="layerskip", draft_layers="0:8"), "--draft_layers: expected"),
    (dict(speculative="recycling", tree="4,x"), "--tree:"),
    (dict(tree="4,2"), "--tree: applies to speculative decoding"),
    (dict(draft_layers="0"), "--draft_layers: applies to speculative decoding"),
    (dict(speculative="ngram", draft_layers="0"), "--draft_layers: .*layerskip"),
    (dict(quantize="int4:g7"), "--quantize: .* groups of 7 do not divide"),
    (dict(quantize="int8:a8", speculative="ngram"), "--speculative: int8:a8 quantizes"),
    (dict(quantize_include=("lm_head",)), "--quantize_include: needs --quantize"),
    (dict(quantize="int8", quantize_include=("head",)), r"--quantize_include: .*\['head'\]"),
    (dict(model="embedded", quantize="int8", quantize_include=("lm_head",)),
     "--quantize_include: .* ties its LM head"),
    (dict(kv_cache_dtype="int8", page_size=48), "--page_size: the int8 KV cache needs a page size"),
])
def test_flag_errors_name_the_flag(overrides, message, monkeypatch):
  """Refused before any step is compiled (a wrong draft flag was found after minutes of it)."""
  def never(*args, **kwargs):
    raise AssertionError("compiled before the flags were checked")
  monkeypatch.setattr(aot, "compile_step", never)
  job = aot.CompileJob(**{"target": "cuda", "model": "preset:tiny", **overrides})
  with pytest.raises(aot.CompileError, match=message):
    aot.run(job)


def test_a_dynamic_pattern_compiles_its_whole_prompt_lane_for_tpu():
  """Under a dynamic sparsity pattern the engine prefills a prompt whole in one lane: compile
  builds that step at the longest prompt, the block-sparse kernel with the pattern estimated
  inside it, for TPU (blocks under 128 too); blocks the TPU kernel cannot take are refused in
  one line."""
  common = dict(model="preset:tiny", batch_size=2, kv_pages=16, max_seq_len=512,
                implementation="pallas", mesh="data:4")
  report = aot.run(aot.CompileJob(TPU, sparsity="vertical_slash:4,4,64", **common))
  prefill, decode = report.steps
  assert prefill.kernels > decode.kernels > 0 and prefill.compile_s > 0
  with pytest.raises(aot.CompileError, match="--sparsity: .* multiple of 8"):
    aot.run(aot.CompileJob(TPU, sparsity="block_topk:2,4", **common))


def test_a_quantized_checkpoint_compiles_in_its_own_format(tmp_path):
  """A checkpoint's quantization.json decides the format compiled (its weights were counted as
  the float model's); a --quantize naming another format is refused, one line."""
  from jaxinfer import quant
  (tmp_path / "config.json").write_text(json.dumps({**COMMON, "model_type": "llama"}))
  quant.write_metadata(tmp_path, quant.QuantFormat.parse("int4:g16", ("embed",)))
  job = aot.checkpoint_format(aot.CompileJob(TPU, model=str(tmp_path)))
  assert job.quantize == "int4:g16" and job.quantize_include == ("embed",)
  assert aot.checkpoint_format(aot.CompileJob(TPU, model=str(tmp_path), quantize="int4:g16")) == job
  with pytest.raises(aot.CompileError, match="^--quantize: .* is quantized as int4:g16 already"):
    aot.checkpoint_format(aot.CompileJob(TPU, model=str(tmp_path), quantize="int8"))
  with pytest.raises(aot.CompileError, match=r"^--quantize_include: .* with \['embed'\] optional"):
    aot.checkpoint_format(aot.CompileJob(TPU, model=str(tmp_path), quantize_include=("lm_head",)))
  # a tied model's lm_head is its embed: the roles quantize was given are its record's
  (tmp_path / "config.json").write_text(json.dumps({**COMMON, "model_type": "llama",
                                                    "tie_word_embeddings": True}))
  both = aot.CompileJob(TPU, model=str(tmp_path), quantize_include=("embed", "lm_head"))
  assert aot.checkpoint_format(both) == job
  # a directory whose name starts with "embedded" is a directory (it compiled unquantized)
  named = tmp_path / "embedded_int4"
  named.mkdir()
  for f in ("config.json", quant.QUANT_FILE):
    (named / f).write_text((tmp_path / f).read_text())
  assert aot.checkpoint_format(aot.CompileJob(TPU, model=str(named))).quantize == "int4:g16"
  # a record whose groups do not divide the model's axes: named with its file
  quant.write_metadata(named, quant.QuantFormat.parse("int4:g64"))
  with pytest.raises(aot.CompileError, match=r"^--model: .*quantization.json: .*groups of 64"):
    aot.checkpoint_format(aot.CompileJob(TPU, model=str(named)))
