"""The Python API: jaxinfer.LLM(...).generate(prompts, SamplingParams(...)) — the same requests,
sampling and outputs as the JSONL job, in prompt order or as they finish; repeated calls reuse
what they built; bad input is refused with the option or prompt named."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import jaxinfer
from jaxinfer import SamplingParams, UserError
from jaxinfer.runner import generate_file

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(", [5, 6, 7, 8] * 6, "class Point:",
           "import os\n"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
  # one replica (without --mesh, each of the 8 simulated devices is one, compiling its own steps)
  return jaxinfer.LLM(str(tiny_model_dir), batch_size=2, chunk_size=8, mesh="data:1",
                      progress=False)


def test_generate_equals_the_jsonl_job(llm, tiny_model_dir, tmp_path):
  sp = SamplingParams(max_new_tokens=12)
  outs = llm.generate(PROMPTS, sp)
  assert [o.index for o in outs] == list(range(len(PROMPTS)))
  assert all(o.outputs[0].ids == o.completion_ids and len(o.outputs) == 1 for o in outs)
  assert all(o.stats["completion_tokens"] == len(o.completion_ids) for o in outs)
  assert outs[1].prompt_ids == PROMPTS[1] and outs[1].stats["prompt_tokens"] == 24
  assert all(o.finish_reason in ("stop", "length") and isinstance(o.text, str) for o in outs)
  assert llm.metrics["completion_tokens"] == sum(len(o.completion_ids) for o in outs)
  # the CLI's job (a thin layer over the API) writes the same completions
  src = tmp_path / "p.jsonl"
  src.write_text("".join(json.dumps({"id": i, "prompt" if isinstance(p, str) else "prompt_ids": p})
                         + "\n" for i, p in enumerate(PROMPTS)))
  generate_file(str(src), str(tmp_path / "o.jsonl"), str(tiny_model_dir), batch_size=2,
                chunk_size=8, progress=False, max_new_tokens=12)
  recs = {r["id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
  assert [recs[i]["completion_ids"] for i in range(len(PROMPTS))] == [
      o.completion_ids for o in outs]
  # a second call of the same shapes compiles nothing, and reuses the prompt pages the first
  # left in the engines' pools (the 24-token prompt's first page at least)
  again = llm.generate(PROMPTS, sp)
  assert [o.completion_ids for o in again] == [o.completion_ids for o in outs]
  assert llm.metrics["compilations"] == 0 and llm.metrics["prefill_tokens_saved"] >= 16
  llm.reset_prefix_cache()  # ... unless told to forget them
  assert [o.completion_ids for o in llm.generate(PROMPTS, sp)] == [o.completion_ids for o in outs]
  assert llm.metrics["prefill_tokens_saved"] == 0


def test_a_little_longer_call_keeps_the_engines_and_their_cached_prompts(tiny_model_dir):
  """Engines are built for whole pages: a call a few tokens longer than the last one neither
  rebuilds them (its cached prompt pages lost) nor recomputes the prompt it shares with it."""
  llm = jaxinfer.LLM(str(tiny_model_dir), batch_size=2, chunk_size=8, progress=False)
  sp = SamplingParams(max_new_tokens=4)
  base = [7, 8, 9, 10] * 9  # 36 tokens: 40 in all, the engines' length rounded to 48
  llm.generate([base], sp)
  assert llm._backend.max_len == 48
  engines = llm._backend.engines
  llm.generate([base + [11, 12]], sp)
  assert llm._backend.engines is engines and llm.metrics["prefill_tokens_saved"] >= 32


def test_iterator_samples_and_stop_strings(llm):
  sp = [SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, seed=3, n=3),
        SamplingParams(max_new_tokens=10, stop=":"), SamplingParams(max_new_tokens=4)]
  prompts = PROMPTS[:3]
  ordered = llm.generate(prompts, sp)
  streamed = {o.index: o for o in llm.generate_iter(prompts, sp)}
  assert sorted(streamed) == [0, 1, 2]
  # sampling keys derive from (seed, index, sample): the same outputs however they are collected
  assert all(streamed[i].outputs == ordered[i].outputs for i in range(3))
  samples = [c.ids for c in ordered[0].outputs]
  assert len(samples) == 3 and len({tuple(s) for s in samples}) > 1  # n distinct draws
  cut = ordered[1]
  assert ":" not in cut.text and (cut.finish_reason == "stop" or len(cut.completion_ids) == 10)
  assert len(ordered[2].completion_ids) == 4 and ordered[2].finish_reason == "length"
  # leaving the loop early stops the generation (its thread once ran on to the end, refusing
  # the next call as "running", and aborted the interpreter at exit)
  many = PROMPTS * 6
  for _ in llm.generate_iter(many, SamplingParams(max_new_tokens=40)):
    break
  assert not [t for t in threading.enumerate() if t.name == "jaxinfer-generate"]
  assert [o.outputs for o in llm.generate(prompts, sp)] == [o.outputs for o in ordered]


def test_an_iterator_left_open_stops_at_exit(tiny_model_dir):
  """An iterator kept in a variable, read once, the program then ending: its generation stops
  (it once ran on in a daemon thread inside JAX, and the interpreter aborted at exit)."""
  code = ("import jaxinfer\n"
          f"llm = jaxinfer.LLM({str(tiny_model_dir)!r}, progress=False)\n"
          "it = llm.generate_iter([[5, 6, 7]] * 64, jaxinfer.SamplingParams(max_new_tokens=40))\n"
          "next(it)\n"
          "print('read one')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert (proc.returncode, proc.stdout.strip()) == (0, "read one"), proc.stderr[-2000:]


@pytest.mark.parametrize("to", ["process", "replica"])
def test_an_interrupt_stops_every_replica_before_it_is_raised(to):
  """Ctrl-C while the replicas run: each is told to stop and has stopped when it surfaces, within
  a moment, whichever of the process's threads the kernel handed the SIGINT to (in a process of
  its own, whose main thread is the one interrupted)."""
  send = {"process": "os.kill(os.getpid(), signal.SIGINT)",
          "replica": "signal.pthread_kill(replicas[0], signal.SIGINT)"}[to]
  code = ("import os, signal, threading, time\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # (a background run: SIG_IGN)
          "from jaxinfer.serving.placement import in_threads\n"
          "cancel, replicas, ended = threading.Event(), [], []\n"
          "def replica(i):\n"
          "  replicas.append(threading.get_ident())\n"
          "  cancel.wait(30)\n"
          "  time.sleep(0.2)\n"  # (stopping takes a while)
          "  ended.append(i)\n"
          "def ctrl_c():\n"
          "  while len(replicas) < 2: time.sleep(0.01)\n"
          f"  {send}\n"
          "threading.Thread(target=ctrl_c).start()\n"
          "t0 = time.perf_counter()\n"
          "try:\n"
          "  in_threads(replica, [(0,), (1,)], cancel)\n"
          "except KeyboardInterrupt:\n"
          "  print(cancel.is_set(), sorted(ended), time.perf_counter() - t0 < 10)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.stdout.strip() == "True [0, 1] True", proc.stderr


def test_speculative_llm_equals_plain_greedy(llm, tiny_model_dir):
  spec = jaxinfer.LLM(str(tiny_model_dir), speculative="ngram", num_draft_tokens=3,
                      speculation="always", batch_size=2, mesh="data:1", progress=False)
  sp = SamplingParams(max_new_tokens=16)
  assert [o.completion_ids for o in spec.generate(PROMPTS, sp)] == [
      o.completion_ids for o in llm.generate(PROMPTS, sp)]
  m = spec.metrics  # it speculated, and lookups on the repetitive prompts were accepted
  assert m["speculative"] == "ngram" and m["speculative_batches"] > 0 == m["plain_batches"]
  assert m["verify_steps"] > 0 and m["mean_accepted_tokens"] > 1, m


def test_layer_skip_on_a_mesh_drafts_with_the_targets_own_shards(llm, tiny_model_dir):
  """Layer skip's draft weights are the target's arrays as the replica holds them (split over
  fsdp, nothing copied; they were copied whole onto each device), the draft attends through the
  target's kernels (on the mesh, every argument whole), and its output on the mesh equals plain
  greedy decoding on one device."""
  spec = jaxinfer.LLM(str(tiny_model_dir), speculative="layerskip", num_draft_tokens=3,
                      speculation="always", batch_size=2, mesh="fsdp:2", progress=False,
                      implementation="pallas")
  sp = SamplingParams(max_new_tokens=16)
  assert [o.completion_ids for o in spec.generate(PROMPTS, sp)] == [
      o.completion_ids for o in llm.generate(PROMPTS, sp)]
  assert spec.metrics["speculative_batches"] > 0
  eng = spec._backend.engines[0]
  draft, target = eng.draft_params, eng.params
  assert len(draft.layers) == len(target.layers) // 2
  assert draft.layers[0].mlp.up is target.layers[0].mlp.up
  assert draft.lm_head is target.lm_head
  assert "fsdp" in tuple(draft.layers[0].mlp.up.sharding.spec)
  attention = eng.proposer.draft_runtime
  assert attention.implementation == "pallas" and attention.mesh is eng.runtime.mesh
  # its activations and state whole on each device, the weights' rules kept (the target's own)
  assert not any(n == "batch" or n.startswith("act_") for n, _ in attention.rules.mapping)
  assert dict(attention.rules.mapping)["embed"] == ("fsdp",)


def test_bad_input_is_named(llm, tiny_model_dir):
  with pytest.raises(UserError, match=r"unknown option\(s\) \['batchsize'\]"):
    jaxinfer.LLM(str(tiny_model_dir), batchsize=2)
  with pytest.raises(UserError, match="^speculative: expected one of"):
    jaxinfer.LLM(str(tiny_model_dir), speculative="magic")
  with pytest.raises(UserError, match=r"prompts\[1\]: prompt_ids: token id 99999 is outside"):
    llm.generate(["ok", [1, 99999]])
  with pytest.raises(UserError, match=r"prompts\[1\]: prompt_ids: token id 99999 is outside"):
    llm.generate_iter(["ok", [1, 99999]])  # (by the call, not by the first item asked for)
  with pytest.raises(UserError, match=r"prompts\[0\]: expected text, a list of token ids"):
    llm.generate([3.5])
  with pytest.raises(UserError, match=r"prompts\[0\]\[0\]: expected a token id .* got 1.5"):
    llm.generate([[1.5, 2]])
  with pytest.raises(UserError, match=r"temperature must be >= 0 and a float32"):
    SamplingParams(temperature=1e308)
  with pytest.raises(UserError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(UserError, match="n: must be >= 1"):
    SamplingParams(n=0)
  with pytest.raises(UserError, match=r"sampling_params: 1 for 2 prompts"):
    llm.generate(["a", "b"], [SamplingParams()])
  # wrong types are named too, before any work
  for kw, match in [(dict(model=None), "^model: expected str"),
                    (dict(batch_size="8"), "^batch_size: expected int"),
                    (dict(batch_size=2.5), "^batch_size: expected int"),
                    (dict(mesh=5), "^mesh: expected str")]:
    with pytest.raises(UserError, match=match):
      jaxinfer.LLM(**{"model": str(tiny_model_dir), **kw})
  # options are keywords here: an error names them as such, never as the CLI's flags
  with pytest.raises(UserError, match=r"^tree: applies to speculative decoding; pass "
                                      r"speculative= too$"):
    jaxinfer.LLM(str(tiny_model_dir), tree="2,1")
  with pytest.raises(UserError, match=r"^kv_pages: the longest request needs \d+ KV pages"):
    jaxinfer.LLM(str(tiny_model_dir), kv_pages=1, progress=False).generate("def f")
  with pytest.raises(UserError, match=r"^prompts: 'p.jsonl' is not a readable file"):
    jaxinfer.generate_file("p.jsonl", "o.jsonl", str(tiny_model_dir))  # (the CLI: --prompts)
  # a "--" inside a path (a hub snapshot's directory) is no flag
  hub = "hub/models--org--tiny/snapshots/abc"
  with pytest.raises(UserError, match=f"^model: '{hub}' is not a directory"):
    jaxinfer.LLM(hub)
  # a NumPy number is the number it holds, a path its string (both as SamplingParams take them)
  opts = jaxinfer.ServeOptions.from_keywords(tiny_model_dir, dict(batch_size=np.int64(2),
                                                                  draft_fallback=np.float32(0)))
  opts.validate()
  assert (type(opts.model), type(opts.batch_size), type(opts.draft_fallback)) == (str, int, float)
  for kw, match in [(dict(max_new_tokens="5"), "max_new_tokens: expected an integer"),
                    (dict(n=2.5), "n: expected an integer"), (dict(top_k=True), "top_k"),
                    (dict(temperature=None), "temperature: expected a finite number"),
                    (dict(stop=[5]), "stop: expected"), (dict(stop=""), "stop: expected"),
                    (dict(seed=2**32), r"seed: expected an integer in \[0, 2\*\*32\)")]:
    with pytest.raises(UserError, match=match):
      SamplingParams(**kw)
  with pytest.raises(UserError, match=r"top_k must be in \[0, 2\*\*31\)"):
    SamplingParams(top_k=2**31)
  assert len(llm.generate(np.array(["def f", "x"]), SamplingParams(max_new_tokens=2))) == 2
  one_array = llm.generate(np.array([5, 6, 7]), SamplingParams(max_new_tokens=2))
  assert [o.completion_ids for o in one_array] == [
      o.completion_ids for o in llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))]
  for kw, match in [(dict(num_samples="2"), "^num_samples: expected int"),
                    (dict(seed=1.5), "^seed: expected int"),
                    (dict(defaults={}), r"unknown option\(s\) \['defaults'\]")]:
    with pytest.raises(UserError, match=match):
      jaxinfer.generate_file("p.jsonl", "o.jsonl", str(tiny_model_dir), **kw)
  for prompts, sp, match in [(None, None, "prompts: expected a prompt"),
                             ({"role": "user", "content": "Hi"}, None, "a dict is one message"),
                             ("ab\ud800", None, r"prompts\[0\]: prompt: holds an unpaired"),
                             ([b"def"], None, r"prompts\[0\]: expected text"),
                             (["x"], {"max_new_tokens": 3}, "sampling_params: expected")]:
    with pytest.raises(UserError, match=match):
      llm.generate(prompts, sp)
  static = jaxinfer.LLM(str(tiny_model_dir), scheduler="static", progress=False)
  assert len(static.generate("def f", SamplingParams(max_new_tokens=3, n=2))[0].outputs) == 2


def test_arrival_order_shares_prefixes_only_while_cached(tiny_model_dir):
  """order="prefix" (the default) runs sharers of a header together, so each header is computed
  once; order="arrival" keeps the interleaved input order, and a pool too small to keep both
  headers cached computes them again. The completions are the same either way."""
  headers = [[3 + i % 40 for i in range(48)], [50 + i % 30 for i in range(48)]]
  prompts = [headers[i % 2] + [100 + i, 101 + i] for i in range(6)]
  sp = SamplingParams(max_new_tokens=6)
  runs = {}
  for order in ("prefix", "arrival"):
    llm = jaxinfer.LLM(str(tiny_model_dir), batch_size=1, chunk_size=16, page_size=8,
                       kv_pages=9, order=order, mesh="data:1", progress=False)
    runs[order] = ([o.completion_ids for o in llm.generate(prompts, sp)],
                   llm.metrics["prefill_tokens_saved"])
  assert runs["prefix"][0] == runs["arrival"][0]
  assert runs["prefix"][1] == 4 * 48  # 4 of the 6 reuse their header's 6 full pages
  assert runs["arrival"][1] < runs["prefix"][1]
  with pytest.raises(UserError, match="^order: expected prefix or arrival"):
    jaxinfer.LLM(str(tiny_model_dir), order="fifo")


def test_compilation_cache_keyword_as_the_flag(tiny_model_dir, tmp_path):
  """compilation_cache= means what --compilation_cache means: a directory, 'none', or (by
  default) the directory JAX already has (here the suite's)."""
  import jax
  suite = jax.config.jax_compilation_cache_dir
  try:
    jaxinfer.LLM(str(tiny_model_dir), progress=False)
    assert jax.config.jax_compilation_cache_dir == suite
    jaxinfer.LLM(str(tiny_model_dir), progress=False, compilation_cache=str(tmp_path / "xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert (tmp_path / "xla").is_dir()
    jaxinfer.LLM(str(tiny_model_dir), progress=False, compilation_cache="none")
    assert jax.config.jax_compilation_cache_dir is None
    # off for the process: an LLM that leaves the choice keeps it off (`jaxinfer generate
    # --compilation_cache=none` turns it off, then makes its LLM)
    jaxinfer.LLM(str(tiny_model_dir), progress=False)
    assert jax.config.jax_compilation_cache_dir is None
    with pytest.raises(UserError, match="^prompts: "):  # the job's keyword, as the LLM's
      jaxinfer.generate_file("p.jsonl", "o.jsonl", str(tiny_model_dir),
                             compilation_cache=str(tmp_path / "xla2"))
    assert jax.config.jax_compilation_cache_dir is None  # (a job refused changes nothing)
    # a directory set since (here by hand) is kept
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    jaxinfer.LLM(str(tiny_model_dir), progress=False)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  finally:
    from jaxinfer import compilation_cache
    compilation_cache.enable(suite)


def test_an_unquantized_model_never_imports_the_quantization_library(tiny_model_dir):
  # (qwix's import costs about 0.25 s of every start-up; only quantized weights need it)
  code = ("import sys, jaxinfer\n"
          f"llm = jaxinfer.LLM({str(tiny_model_dir)!r}, batch_size=2, progress=False)\n"
          "assert llm.generate(['def add('], jaxinfer.SamplingParams(max_new_tokens=3))\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'qwix'))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == "[]"
