"""The continuous-batching engine: pages, prefix sharing, equality with independent generation,
determinism, resume after SIGKILL, and a two-process run."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import own_devices_env
from jaxinfer.engine.pages import PagePool, page_keys
from jaxinfer.runner import GenerateJob, UserError, run

# -- the page pool --------------------------------------------------------------------------


def test_page_pool_refcounts_prefix_cache_and_eviction():
  pool = PagePool(4, page_size=2)
  keys = page_keys([1, 2, 3, 4, 5], 2, 2)
  assert keys == page_keys([1, 2, 3, 4, 9], 2, 2)  # same full pages, same keys
  assert keys[0] != page_keys([1, 7], 2, 1)[0]
  ahead = page_keys([1, 2, 3, 4, 5], 2, 2, lookahead=1)  # each page with the token after it
  assert ahead[0] == page_keys([1, 2, 3, 4, 9], 2, 2, lookahead=1)[0] != keys[0]
  assert ahead[1] != page_keys([1, 2, 3, 4, 9], 2, 2, lookahead=1)[1]
  whole = page_keys([1, 2, 3, 4, 5], 2, 3, whole=True)  # prefilled at once: by all its tokens
  assert len(whole) == 3 and whole == page_keys([1, 2, 3, 4, 5], 2, 3, whole=True)
  assert whole[0] != page_keys([1, 2, 3, 4, 9], 2, 3, whole=True)[0] and whole[0] != keys[0]
  a = pool.alloc(3)
  pool.register(keys[0], a[0])
  assert pool.lookup(keys[0]) == a[0] and pool.refcount[a[0]] == 2
  assert pool.alloc(2) is None and pool.available == 1  # all-or-nothing
  pool.ready[a[0]] = True
  pool.release(a)  # a[0] still referenced once
  pool.release([a[0]])  # now unreferenced but cached: kept for reuse
  assert pool.in_use == 0 and pool.available == 4
  assert pool.lookup(keys[0]) == a[0]  # revived from the cache
  pool.release([a[0]])
  got = pool.alloc(4)  # needs every page: the cached one is evicted last
  assert sorted(got) == [0, 1, 2, 3] and got[-1] == a[0]
  assert pool.lookup(keys[0]) is None
  with pytest.raises(RuntimeError, match="released more often"):
    pool.release([got[0], got[0]])


def test_scheduler_packs_prompts_into_lanes_ahead_of_free_slots():
  """A step's lanes are filled from as many prompts as they hold; a prompt prefilled in a step
  (all but its last token) takes a free slot in that same step, its decode row feeding the last
  token; prompts are prefilled ahead only while none waits for the next free slot; a sequence
  sharing prefix pages prefills after them once they are written, in the same step."""
  from jaxinfer.engine.scheduler import EngineRequest, Scheduler
  pool = PagePool(64, page_size=8)
  sched = Scheduler(num_slots=2, lanes=3, chunk=16, page_size=8, max_pages=4, pool=pool,
                    eos_ids=(0,), decode_steps=4)
  prompts = [[10 + i] * 10 for i in range(5)] + [[14] * 10 + [3, 4]]  # the last shares a page
  for i, p in enumerate(prompts):
    sched.add(EngineRequest(i, p, 5, np.zeros(2, np.uint32)))

  def run(plan):
    sched.commit(plan, np.ones((plan.num_steps, 2), np.int32))
    return plan

  first = run(sched.plan())  # three prompts in three lanes; two take the slots at once
  assert first.num_prefill == 3 * 9 and first.chunk_table.shape == (3, 4)
  assert len({tuple(row) for row in first.chunk_table}) == 3
  assert first.sampled.all() and not first.from_device[:2].any()
  assert list(first.tokens[:2]) == [10, 11] and list(first.positions[:2]) == [9, 9]
  second = run(sched.plan())  # a prefilled prompt waits: decode only, until a slot frees
  assert second.num_prefill == 0 and second.num_steps == 4 and second.from_device.all()
  third = run(sched.plan())  # the waiting one and one prefilled now take the two free slots
  assert [s.req.uid for s in sched.slots] == [2, 3] and list(third.tokens[:2]) == [12, 13]
  lanes = third.tokens[2:].reshape(3, 16)
  assert lanes[:, :9].tolist() == [[13] * 9, [14] * 9, [14, 14, 3] + [0] * 6]
  assert list(third.positions[2 + 32:2 + 35]) == [8, 9, 10]  # after the shared page
  assert sched.prefill_tokens_saved == 8
  assert sched.prefill_tokens_computed == 27 + 2 + 21 + 2  # lanes and first decode rows
  assert sched.lane_tokens == 27 + 21


def test_scheduler_gives_a_prompt_that_fills_every_lane_one_long_lane():
  """A prompt that alone fills the step's G lanes of Q runs as one lane of G*Q (its page table
  read once, not G times); its remainder goes back to packed lanes."""
  from jaxinfer.engine.scheduler import EngineRequest, Scheduler
  sched = Scheduler(num_slots=2, lanes=2, chunk=16, page_size=8, max_pages=8,
                    pool=PagePool(64, page_size=8), eos_ids=(0,), decode_steps=4)
  sched.add(EngineRequest(0, list(range(1, 51)), 4, np.zeros(2, np.uint32)))
  sched.add(EngineRequest(1, [60] * 6, 4, np.zeros(2, np.uint32)))
  first = sched.plan()
  assert first.chunk_table.shape == (1, 8) and first.num_prefill == 32
  assert list(first.tokens[2:]) == list(range(1, 33))
  assert list(first.positions[2:]) == list(range(32))
  sched.commit(first, np.ones((1, 2), np.int32))
  second = sched.plan()  # 17 tokens left: packed lanes of 16 and 1
  assert second.chunk_table.shape == (2, 8) and second.num_prefill == 17
  assert second.sampled[0] and second.tokens[0] == 50  # the long prompt's last token decodes


# -- the job, end to end on a tiny model ---------------------------------------------------

SYSTEM = "You are a helpful assistant. Answer briefly and precisely. " * 2


def _workload():
  rng = np.random.RandomState(0)
  records = []
  for i in range(14):
    rec = {"id": f"r{i}", "prompt": (SYSTEM if i % 4 else "") + f"question {i}: " + "x" * (i % 5),
           "max_new_tokens": int(rng.randint(2, 20))}
    if i % 5 == 1:
      rec.update(temperature=0.9, top_k=40)
    if i % 6 == 2:
      rec.update(temperature=0.7, top_p=0.9, min_p=0.05)
    if i == 3:
      rec["stop"] = ["e"]
    records.append(rec)
  records.append({"id": "ids", "prompt_ids": [5, 6, 7, 8] * 9, "max_new_tokens": 9})
  return records


def _job(tmp_path, model_dir, records, name, **kw):
  prompts = tmp_path / f"{name}.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / f"{name}.out.jsonl"
  kw.setdefault("mesh", "data:1")  # one replica unless a test asks for more
  metrics = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(model_dir),
                            progress=False, overwrite=True, **kw))
  return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}, metrics


def _independent(tmp_path, model_dir, records) -> dict:
  """{id: (completion ids, text, finish reason)} of each record decoded alone by the reference
  `Generator` (an implementation of its own: a dense cache, the prompt prefilled whole), read and
  cut at its stop strings as the job does."""
  from jaxinfer import checkpoint
  from jaxinfer.api import completion
  from jaxinfer.generation import Generator, RowRequest
  from jaxinfer.sampling import sample_key
  from jaxinfer.runner import read_requests
  cfg, params, tokenizer = checkpoint.load_model(str(model_dir))
  prompts = tmp_path / "independent.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  job = GenerateJob(prompts=str(prompts), output=str(tmp_path / "unused.jsonl"),
                    model=str(model_dir))
  reqs, errors, _ = read_requests(job, tokenizer, cfg.vocab_size, cfg.max_seq_len)
  assert not errors
  gen, out = Generator(cfg, params), {}
  for r in reqs:
    res = gen.generate([RowRequest(r.prompt_ids, r.max_new_tokens, sample_key(r.seed, r.id),
                                   r.temperature, r.top_k, r.top_p, r.min_p)])[0]
    c = completion(res.tokens, res.finished_by_eos, r, tokenizer)
    out[r.id] = (c.ids, c.text, c.finish_reason)
  return out


def test_engine_equals_independent_generation(tmp_path, tiny_model_dir):
  """Greedy and sampled records (stop strings, a shared header) through the engine equal each
  decoded alone by the reference Generator, token for token; so do static waves'."""
  records = _workload()
  ref = _independent(tmp_path, tiny_model_dir, records)
  out, m = _job(tmp_path, tiny_model_dir, records, "engine", batch_size=4, chunk_size=16,
                chunk_lanes=2, page_size=8)
  static, _ = _job(tmp_path, tiny_model_dir, records, "static", scheduler="static", batch_size=3)
  assert set(out) == set(ref) == set(static)
  for rid in ref:
    assert (out[rid]["completion_ids"], out[rid]["completion"], out[rid]["finish_reason"]) == \
        ref[rid], rid
    assert static[rid]["completion_ids"] == out[rid]["completion_ids"], rid
  assert m["prefill_tokens_saved"] > 0  # the shared system prompt was computed once
  assert m["prefill_tokens_computed"] + m["prefill_tokens_saved"] == m["prompt_tokens"]
  assert m["recompilations"] == 0  # only the fixed step shapes were compiled
  assert m["dispatches"] < m["steps"]  # decode-only stretches ran several steps per dispatch
  assert 0 < m["mean_slot_occupancy"] <= 1 and m["kv_pages_used_peak"] <= m["kv_pages_pool"]


def test_tokens_decoded_past_a_stop_are_counted(tiny_model_dir):
  """A sequence stopped by the host (a stop string) inside a multi-step decode keeps its slot
  until the run ends; what is decoded for it meanwhile is discarded and counted: every decoded
  token (the first of each from its decode row's step over the prompt's last token) is delivered
  or counted as discarded."""
  from jaxinfer import checkpoint
  from jaxinfer.engine import Engine, EngineConfig
  from jaxinfer.engine.scheduler import EngineRequest
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  eng = Engine(cfg, params, EngineConfig(num_slots=3, chunk_size=16, page_size=8), max_len=48)
  reqs = [EngineRequest(i, list(range(1, 6 + 3 * i)), 20, np.zeros(2, np.uint32))
          for i in range(5)]
  results = []
  st = eng.run(reqs, results.append, lambda uid, toks: uid % 2 == 1 and len(toks) == 5)
  assert sorted(len(r.tokens) for r in results if r.stopped) == [5, 5]
  assert st.decode_tokens_discarded > 0
  assert (sum(len(r.tokens) for r in results) + st.decode_tokens_discarded
          == st.decode_tokens)
  # a run refused for a bad request (too long, no prompt, a uid twice: that crashed a speculating
  # engine) has touched nothing: the prompt pages cached by the runs before are still shared
  def again():  # prompt tokens it read from the cache (the engine's counters add up its runs)
    saved = eng.stats.prefill_tokens_saved
    return eng.run(reqs[4:], results.append).prefill_tokens_saved - saved

  assert again() == 16
  for bad, match in [(EngineRequest(9, list(range(1, 30)), 20, np.zeros(2, np.uint32)),
                      r"29 prompt \+ 20 new tokens exceed .* max_len \(48\)"),
                     (EngineRequest(9, [], 20, np.zeros(2, np.uint32)), "needs a prompt"),
                     (reqs[0], "request 0: another request of this run has that uid")]:
    with pytest.raises(ValueError, match=match):
      eng.run([reqs[0], bad], results.append)
  assert again() == 16


def test_outputs_do_not_depend_on_slots_chunks_pages_steps_or_replicas(tmp_path,
                                                                       tiny_model_dir):
  records = _workload()
  base, _ = _job(tmp_path, tiny_model_dir, records, "a", batch_size=4, chunk_size=16)
  variants = [dict(batch_size=1, chunk_size=8, page_size=4, decode_steps=1),
              dict(batch_size=5, decode_steps=3),
              dict(batch_size=7, chunk_size=32, chunk_lanes=3, page_size=16, kv_pages=300),
              dict(batch_size=3, mesh="data:2"),  # two replicas, each its own engine
              # one engine over two devices, its kernels run per shard
              dict(batch_size=4, mesh="fsdp:2", implementation="pallas")]
  for i, kw in enumerate(variants):
    other, _ = _job(tmp_path, tiny_model_dir, records, f"v{i}", **kw)
    for rid in base:
      assert other[rid]["completion_ids"] == base[rid]["completion_ids"], (kw, rid)


def test_heads_two_to_a_pool_row_decode_as_independent_generation(tmp_path):
  """Heads of 64 lie two to a page-pool row (K/2, P, ps, 128); greedy records through the engine,
  XLA's attention and the kernels (verifying n-gram drafts, per shard over model:2), equal each
  decoded alone by the reference Generator, whose dense cache keeps one head a row; an int8 pool
  so laid out speculates as it decodes plainly."""
  import jax

  from jaxinfer.config import PRESETS
  from jaxinfer.kv_cache import PagedKVCache, pool_heads_per_row
  from tests.conftest import make_tiny_model_dir
  cfg = dataclasses.replace(PRESETS["tiny"], q_heads=8, kv_heads=4, head_dim=64)
  assert PagedKVCache.pool_shape(cfg, 8, 4) == (2, 8, 4, 128)
  assert pool_heads_per_row(cfg, jax.make_mesh((2,), ("model",))) == 2
  assert pool_heads_per_row(cfg, jax.make_mesh((4,), ("model",))) == 1  # a head a device
  assert pool_heads_per_row(dataclasses.replace(cfg, head_dim=128)) == 1
  model = make_tiny_model_dir(tmp_path / "m", q_heads=8, kv_heads=4, head_dim=64)
  records = [r for r in _workload() if "temperature" not in r]
  ref = _independent(tmp_path, model, records)
  for i, kw in enumerate([{}, dict(implementation="pallas", speculative="ngram"),
                          dict(implementation="pallas", mesh="model:2")]):
    out, _ = _job(tmp_path, model, records, f"v{i}", batch_size=4, chunk_size=16, page_size=8,
                  **kw)
    for rid in ref:
      assert out[rid]["completion_ids"] == ref[rid][0], (kw, rid)
  # an int8 pool of two heads a row (a scale per token and kv head): verified drafts, their
  # accepted K/V and scales moved into place, decode as plainly decoding it does
  int8 = dict(batch_size=4, chunk_size=16, page_size=8, kv_cache_dtype="int8",
              implementation="pallas")
  plain, _ = _job(tmp_path, model, records, "int8", **int8)
  spec, m = _job(tmp_path, model, records, "int8-ngram", speculative="ngram",
                 speculation="always", **int8)
  assert m["verify_steps"] > 0 and m["mean_accepted_tokens"] > 1
  assert {r: spec[r]["completion_ids"] for r in ref} == {r: plain[r]["completion_ids"] for r in ref}


def test_num_samples_share_the_prompt(tmp_path, tiny_model_dir):
  records = [{"id": "p", "prompt": SYSTEM + "tell me", "temperature": 1.0, "max_new_tokens": 12},
             {"id": "g", "prompt": SYSTEM + "greedy", "max_new_tokens": 6}]
  one, _ = _job(tmp_path, tiny_model_dir, records, "one")
  many, m = _job(tmp_path, tiny_model_dir, records, "many", num_samples=4, page_size=8,
                mesh="data:1")  # one replica: every sample shares the prompt pages
  samples = many["p"]["samples"]
  assert len(samples) == 4 and len({tuple(s["completion_ids"]) for s in samples}) > 1
  assert samples[0]["completion_ids"] == one["p"]["completion_ids"]  # sample 0 = 1-sample run
  assert all(s["completion_ids"] == one["g"]["completion_ids"] for s in many["g"]["samples"])
  prompt_pages = (many["p"]["prompt_tokens"] - 1) // 8
  assert m["prefill_tokens_saved"] >= 2 * 3 * prompt_pages * 8  # 3 sharers x 2 prompts


def test_a_pool_too_small_names_the_flag(tmp_path, tiny_model_dir):
  with pytest.raises(UserError, match=r"--kv_pages: the longest request needs \d+ KV pages"):
    _job(tmp_path, tiny_model_dir, [{"id": 1, "prompt": "x" * 40, "max_new_tokens": 40}], "small",
         kv_pages=2, page_size=4)
  assert not (tmp_path / "small.out.jsonl").exists()  # refused before the output is opened


def test_memory_beyond_the_device_names_the_flags(tmp_path, tiny_model_dir, monkeypatch):
  """On a device that reports its memory (not CPU), a KV pool (with a draft model, its pages
  in the proposer's state) that cannot fit beside the weights is refused before anything runs,
  with the memory it needs and the flags that size it."""
  from jaxinfer.serving import placement
  monkeypatch.setattr(placement, "bytes_limit", lambda mesh: 4096)  # a 4 KiB device
  one = [{"id": 1, "prompt": "x" * 20, "max_new_tokens": 20}]
  with pytest.raises(UserError, match=r"--kv_pages: the KV pool \(\d+ pages of 16 tokens, "
                     r"[\d.]+ GiB\) plus weights need [\d.]+ GiB per device, more than its "
                     r"0.00 GiB; lower --kv_pages or --batch_size"):
    _job(tmp_path, tiny_model_dir, one, "big")
  with pytest.raises(UserError, match=r"--kv_pages: the KV pool \(\d+ pages of 16 tokens, with "
                     r"the proposer's state, [\d.]+ GiB\)"):  # the draft's pages in it
    _job(tmp_path, tiny_model_dir, one, "big-draft", speculative="layerskip")
  assert not any((tmp_path / f"{n}.out.jsonl").exists() for n in ("big", "big-draft"))
  monkeypatch.setattr(placement, "bytes_limit", lambda mesh: 2**34)  # 16 GiB: it fits
  assert _job(tmp_path, tiny_model_dir, one, "fits", speculative="layerskip")[1][
      "num_completed"] == 1


def test_rerun_resumes_and_skips_completed(tmp_path, tiny_model_dir):
  records = _workload()
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records) + "{bad\n")
  out = tmp_path / "o.jsonl"
  job = GenerateJob(prompts=str(prompts), output=str(out), model=str(tiny_model_dir),
                    progress=False, mesh="data:1")
  run(job)
  full = out.read_text().splitlines()
  # simulate a crash: keep the first 5 records and a torn half line
  out.write_text("\n".join(full[:5]) + "\n" + full[5][:17])
  m = run(job)
  kept_errors = sum("error" in json.loads(l) for l in full[:5])
  assert m["num_skipped_already_done"] == 5
  assert m["num_completed"] == len(full) - 1 - (5 - kept_errors)  # the valid ones not kept
  again = out.read_text().splitlines()
  assert len(again) == len(full)
  assert sorted(map(json.loads, again), key=lambda r: r["line"]) == \
      sorted(map(json.loads, full), key=lambda r: r["line"])
  m = run(job)  # nothing left
  assert m["num_completed"] == 0 and len(out.read_text().splitlines()) == len(full)


def test_record_writer_groups_records_from_threads_and_reports_a_failing_disk(tmp_path):
  import threading

  from jaxinfer.output import RecordWriter
  path = tmp_path / "o.jsonl"
  writer = RecordWriter(path)
  def worker(t):
    for i in range(50):
      writer.write([{"id": f"{t}-{i}", "text": "é" * i}])
  threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  writer.write([{"id": "last"}])
  writer.flush()  # on disk now, before close
  lines = path.read_text(encoding="utf-8").splitlines()
  assert len(lines) == 201 and json.loads(lines[-1]) == {"id": "last"}
  writer.close()
  got = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]
  assert sorted(r["id"] for r in got) == sorted([f"{t}-{i}" for t in range(4) for i in range(50)]
                                                + ["last"])
  assert all(r["text"] == "é" * int(r["id"].split("-")[1]) for r in got if "text" in r)
  with pytest.raises(ValueError, match="after close"):
    writer.write([{"id": 0}])
  if os.path.exists("/dev/full"):  # every write fails with ENOSPC
    full = RecordWriter("/dev/full")
    full.write([{"id": 0}])
    with pytest.raises(OSError, match="failed"):
      full.flush()
    with pytest.raises(OSError):
      full.write([{"id": 1}])
    with pytest.raises(OSError):
      full.close()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# `jaxinfer generate ARGS`, with SIGINT raising KeyboardInterrupt as at a terminal (a test
# worker may ignore SIGINT, which its children would inherit)
GENERATE = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = ['jaxinfer', 'generate', *sys.argv[1:]]; "
            "runpy.run_module('jaxinfer', run_name='__main__')")


def _cli(args, **kw):
  return subprocess.Popen([sys.executable, "-c", GENERATE, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def test_ctrl_c_or_sigkill_then_rerun_gives_every_id_once(tmp_path, tiny_model_dir):
  records = [{"id": i, "prompt": SYSTEM + f"n{i}", "max_new_tokens": 24} for i in range(60)]
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  ref_out, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
  common = [f"--model={tiny_model_dir}", f"--prompts={prompts}", "--batch_size=2", "--mesh=data:1",
            "--noprogress"]
  ref = _cli(common + [f"--output={ref_out}"])
  assert ref.wait(timeout=600) == 0, ref.stderr.read()
  lines = lambda: len(out.read_bytes().splitlines()) if out.exists() else 0

  def stop_once_written(n, sig):
    """Runs the job into `out`, sends `sig` once it holds n records; (status, stderr)."""
    proc = _cli(common + [f"--output={out}"])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and lines() < n:
      time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be stopped"
    proc.send_signal(sig)
    return proc.wait(timeout=60), proc.stderr.read()

  code, err = stop_once_written(10, signal.SIGINT)  # Ctrl-C: one line, status 130
  assert code == 130 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1].startswith("interrupted; what was written is kept"), err
  first = lines()
  assert 10 <= first < 60
  stop_once_written(first + 10, signal.SIGKILL)  # a crash
  assert first + 10 <= lines() < 60
  resumed = _cli(common + [f"--output={out}"])
  assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
  got = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted(r["id"] for r in got) == list(range(60))  # every id exactly once
  want = {r["id"]: r for r in map(json.loads, ref_out.read_text().splitlines())}
  assert all(r == want[r["id"]] for r in got)


def test_ctrl_c_while_starting_ends_with_one_line(tmp_path, tiny_model_dir):
  """Ctrl-C while JAX and the command import (a second or two): status 130 and one line, never a
  traceback through the imports or an interrupt a library callback swallowed (the run would then
  go on to the end)."""
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"id": i, "prompt": f"n{i}", "max_new_tokens": 64}) + "\n"
                             for i in range(40)))
  for delay in (0.3, 0.6, 0.9):
    proc = _cli([f"--model={tiny_model_dir}", f"--prompts={prompts}",
                 f"--output={tmp_path / 'out.jsonl'}", "--batch_size=2", "--noprogress"])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code == 130 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err


@pytest.mark.parametrize("ignored,exits,want", [(False, "sys.exit(1)", 130), (False, "", 130),
                                                (True, "", 0)])
def test_an_interrupt_a_callback_swallowed_still_ends_the_command(ignored, exits, want):
  """A Ctrl-C that a library's callback swallowed ends the command with 130 once it returns or
  exits; a process started with SIGINT ignored (a launcher's choice) keeps ignoring it."""
  code = (f"import os, signal, sys, time\n"
          f"if {ignored}: signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
          f"else: signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          f"from jaxinfer.cli import _interruptible\n"
          f"def main(argv):\n"
          f"  try:\n"
          f"    os.kill(os.getpid(), signal.SIGINT); time.sleep(2)\n"
          f"  except KeyboardInterrupt:\n"
          f"    pass  # (swallowed)\n"
          f"  {exits or 'pass'}\n"
          f"_interruptible(main, [])\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == want, proc.stderr
  assert ("interrupted" in proc.stderr) == (want == 130), proc.stderr


_GENERATE_FILE = """
import sys, jax, jaxinfer
port, i, prompts, out, model, mesh, metrics = sys.argv[1:]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(i))
try:
  jaxinfer.generate_file(prompts, out, model=model, mesh=mesh, metrics_output=metrics,
                         progress=False)
except jaxinfer.UserError as e:
  sys.exit(str(e))
"""


@pytest.mark.parametrize("speculative,mesh,launcher", [
    ("none", "fsdp:4", "cli"), ("ngram", "data:2,model:2", "cli"), ("none", "data:4", "python")])
def test_two_processes_write_one_output(tmp_path, tiny_model_dir, speculative, mesh, launcher):
  """Two processes of two devices each on loopback, --mesh spanning all four: each process
  drives its replicas (fsdp:4: one replica over both processes, driven by both in step, its
  attention in the Pallas kernels, which split rows over fsdp: the tokens they sampled were once
  left split, unreadable by either process) with their share of the input; speculative decoding
  too (forced on, so sampled records are the same samples as a one-process run's);
  `jaxinfer.generate_file` in processes that started jax.distributed themselves writes its part
  as the CLI does (it once wrote the output whole from each, losing records), and resumes after
  lines were inserted with every record on its id's new line."""
  records = _workload() + ["{not json"]
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                             for r in records))
  spec = {} if speculative == "none" else dict(speculative=speculative, speculation="always")
  if mesh == "fsdp:4":
    spec["implementation"] = "pallas"
  single, _ = _job(tmp_path, tiny_model_dir, _workload(), "single", **spec)
  out = tmp_path / "two.jsonl"
  resumed = []
  if mesh == "fsdp:4":  # as a killed run leaves it: process 1's part with 4 records, torn
    resumed = [json.loads(l) for l in (tmp_path / "single.out.jsonl").read_text().splitlines()][:4]
    (tmp_path / "two.jsonl.part-1-of-2").write_text(
        "".join(json.dumps(r) + "\n" for r in resumed) + '{"id": "r9", "li')
  procs = _two_processes(tmp_path, tiny_model_dir, prompts, out, mesh, launcher, spec)
  assert [p.returncode for p in procs] == ([1, 1] if launcher == "cli" else [0, 0]), [
      p.stderr.read() for p in procs]
  # merged and cleaned up
  assert not list(tmp_path.glob("two.jsonl.part-*")), [p.stderr.read()[-3000:] for p in procs]
  got = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(got) == len(records)
  errors = [r for r in got if "error" in r]
  assert len(errors) == 1 and errors[0]["line"] == len(records)
  by_id = {r["id"]: r for r in got if "error" not in r}
  assert set(by_id) == set(single)
  for rid, rec in single.items():
    assert by_id[rid]["completion_ids"] == rec["completion_ids"]
  metrics = json.loads((tmp_path / "m.json").read_text())
  assert metrics["processes"] == 2 and metrics["records_in_output"] == len(records)
  assert metrics.get("speculative", "none") == speculative
  assert metrics["replicas"] == {"data:4": 2, "fsdp:4": 1}.get(mesh, 1)  # process 0's
  assert metrics["num_skipped_already_done"] == len(resumed)  # each record once (above)
  if launcher != "python":
    return
  # lines inserted before the others, and the bad line corrected into a request: the records
  # written take their ids' new lines, the stale error goes (they kept their old lines, and
  # the error stood beside the corrected line's completion)
  records = [{"id": "new", "prompt_ids": [7, 8], "max_new_tokens": 2}] + records[:-1] + [
      {"id": "fixed", "prompt_ids": [5], "max_new_tokens": 2}]
  prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
  procs = _two_processes(tmp_path, tiny_model_dir, prompts, out, mesh, launcher, spec)
  assert [p.returncode for p in procs] == [0, 0], [p.stderr.read() for p in procs]
  again = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted((r["line"], r["id"]) for r in again) == [
      (i + 1, r["id"]) for i, r in enumerate(records)] and not any("error" in r for r in again)
  assert {r["id"]: r for r in again if r["id"] in single} == {
      rid: {**by_id[rid], "line": by_id[rid]["line"] + 1} for rid in single}


def _two_processes(tmp_path, model_dir, prompts, out, mesh, launcher, spec):
  """Two processes of two devices each on loopback running one job, waited for."""
  port = _free_port()
  env = own_devices_env()
  if launcher == "python":
    procs = [subprocess.Popen([sys.executable, "-c", _GENERATE_FILE, str(port), str(i),
                               str(prompts), str(out), str(model_dir), mesh,
                               str(tmp_path / "m.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  else:
    procs = [_cli([f"--model={model_dir}", f"--prompts={prompts}", f"--output={out}",
                   "--noprogress", "--cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", f"--mesh={mesh}",
                   f"--metrics_output={tmp_path / 'm.json'}"]
                  + [f"--{k}={v}" for k, v in spec.items()], env=env) for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:  # (one process failing can leave the other waiting for it: none outlives the test)
    for p in procs:
      if p.poll() is None:
        p.kill()
  return procs


@pytest.mark.parametrize("fault", ["different_prompts", "missing_model"])
def test_a_process_that_cannot_run_its_share_ends_the_run(tmp_path, tiny_model_dir, fault):
  """Every process of a run is ready to run the same job before any writes, or each ends with
  one line and nothing is written: processes given different prompts (each splits the requests
  among all replicas alike: they once wrote a mix of both files, lines repeated), or one whose
  --model is missing on its host (the other once waited for it until jax.distributed aborted
  both, five minutes later, with no message of jaxinfer's)."""
  port, out = _free_port(), tmp_path / "o.jsonl"
  env = own_devices_env()
  procs = []
  for i in range(2):
    prompts = tmp_path / f"p{i}.jsonl"
    lines = 3 + i if fault == "different_prompts" else 3
    prompts.write_text("".join(json.dumps({"id": j, "prompt": "x", "max_new_tokens": 2}) + "\n"
                               for j in range(lines)))
    model = tmp_path / "absent" if fault == "missing_model" and i == 1 else tiny_model_dir
    procs.append(_cli([f"--model={model}", f"--prompts={prompts}", f"--output={out}",
                       "--noprogress", "--cpu_devices=1", f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}"], env=env))
  try:
    codes = [p.wait(timeout=150) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errors = [p.stderr.read() for p in procs]
  assert codes == [2, 2], errors
  last = [e.strip().splitlines()[-1] for e in errors]
  if fault == "different_prompts":
    assert all("processes of this run read different input" in e for e in last), errors
  else:
    assert last[1].startswith("error: --model") and str(tmp_path / "absent") in last[1], errors
    assert last[0].startswith("error: process 1 of this run failed"), errors
  assert not any("Traceback" in e for e in errors), errors
  assert not out.exists() and not list(tmp_path.glob("o.jsonl.part-*"))


def test_what_every_process_of_a_run_must_share(tmp_path):
  """The check across processes covers the prompts' bytes and every option that splits or
  words the records (processes given different --order once each dropped the other's share of
  the records, and exited 0); caches, progress and paths to the model may differ."""
  from jaxinfer.runner import _job_digest
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"id": 1, "prompt": "x"}\n')
  base = GenerateJob(prompts=str(prompts), output="o.jsonl")
  digest = lambda **kw: _job_digest(dataclasses.replace(base, **kw))
  for kw in (dict(order="arrival"), dict(max_seq_len=64), dict(batch_size=4), dict(seed=1),
             dict(overwrite=True), dict(speculative="ngram")):
    assert digest(**kw) != _job_digest(base), kw
  for kw in (dict(cache_dir="/elsewhere"), dict(progress=False), dict(model="/copy/of/it")):
    assert digest(**kw) == _job_digest(base), kw
  before = _job_digest(base)
  prompts.write_text('{"id": 2, "prompt": "x"}\n')
  assert _job_digest(base) != before


def test_distributed_takes_no_explicit_processes(tmp_path, tiny_model_dir):
  """--distributed (the processes from the environment) with --coordinator_address given too
  was told "coordinator_address should be defined", the address dropped; a --process_id with
  no address (a process of a run launched without it) once ran the whole input alone."""
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"id": 1, "prompt": "x"}\n')
  job = GenerateJob(prompts=str(prompts), output=str(tmp_path / "o.jsonl"),
                    model=str(tiny_model_dir))
  with pytest.raises(UserError, match="^--distributed: takes the run's processes from the env"):
    run(job, distributed=True, coordinator_address="127.0.0.1:1234", num_processes=1,
        process_id=0)
  with pytest.raises(UserError, match="^--process_id: a multi-process run needs --coordinator"):
    run(job, process_id=1)
  assert not (tmp_path / "o.jsonl").exists()


def test_a_multi_process_mesh_spans_every_process(monkeypatch):
  """--mesh in a run of several processes covers all their devices (a mesh of other size is
  refused, named)."""
  import jax
  from jaxinfer.serving.placement import replicas
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(UserError, match="spans all 4 of their devices"):
    replicas("data:2")
