"""The `jaxinfer generate` contract: records, errors per bad line, stop strings, flags."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from jaxinfer.requests import Defaults
from jaxinfer.runner import GenerateJob, UserError, run
from jaxinfer.tokenizer import Tokenizer


def _line(record) -> bytes:
  """A prompts file's line: bytes as they are, text encoded, anything else as JSON."""
  if isinstance(record, bytes):
    return record
  return (record if isinstance(record, str) else json.dumps(record)).encode()


def _write(path, records):
  path.write_bytes(b"".join(_line(r) + b"\n" for r in records))
  return path


def _read(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def _run(tmp_path, model_dir, records, **kw):
  prompts = _write(tmp_path / "prompts.jsonl", records)
  out = tmp_path / "out.jsonl"
  kw.setdefault("overwrite", True)
  kw.setdefault("mesh", "data:1")  # one replica unless a test asks for more
  metrics = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(model_dir),
                            progress=False, **kw))
  return {r["id"]: r for r in _read(out) if "error" not in r}, metrics


BAD_LINES = [
    ("not json", "{oops"),
    ("no prompt", {"id": "a"}),
    ("both prompts", {"id": "b", "prompt": "x", "prompt_ids": [1]}),
    ("ids not ints", {"id": "c", "prompt_ids": ["1", 2]}),
    ("out of vocab", {"id": "d", "prompt_ids": [1, 100000]}),
    ("negative id", {"id": "e", "prompt_ids": [-1]}),
    ("too long", {"id": "f", "prompt_ids": [5] * 600}),
    ("bad temperature", {"id": "g", "prompt": "x", "temperature": -1}),
    ("bad top_p", {"id": "h", "prompt": "x", "top_p": 0}),
    ("bad min_p", {"id": "i", "prompt": "x", "min_p": 2}),
    ("bad max_new", {"id": "j", "prompt": "x", "max_new_tokens": 0}),
    ("string temperature", {"id": "k", "prompt": "x", "temperature": "hot"}),
    ("unknown field", {"id": "l", "prompt": "x", "max_tokens": 5}),
    ("no id", {"prompt": "x"}),
    ("empty prompt ids", {"id": "m", "prompt_ids": []}),
    ("bad stop", {"id": "n", "prompt": "x", "stop": [1]}),
    ("array line", "[1, 2]"),
    ("not utf-8", b'{"id": "u", "prompt": "caf\xe9"}'),
    # JSON can spell what no text holds (the record could not be written back)
    ("unpaired surrogate", '{"id": "v", "prompt_ids": [3], "metadata": {"note": "x\\udc00y"}}'),
    ("unpaired surrogate id", '{"id": "\\ud800", "prompt_ids": [3]}'),
    ("huge top_k", {"id": "w", "prompt": "x", "temperature": 1.0, "top_k": 2**40}),
    # strict JSON: what json.loads alone accepts or raises something other than a decode error on
    ("nan", '{"id": "x", "prompt": "x", "metadata": {"score": NaN}}'),
    ("float overflow", '{"id": "y", "prompt": "x", "metadata": 1e400}'),
    ("long integer", '{"id": "z", "prompt": "x", "metadata": ' + "1" * 5000 + "}"),
    ("bool id", {"id": True, "prompt": "x"}),  # (its record's id: none, not the bad value)
    ("deep nesting",
     '{"id": "zz", "prompt": "x", "metadata": ' + "[" * 100000 + "]" * 100000 + "}"),
]


def test_bad_lines_become_error_records_and_the_rest_complete(tmp_path, tiny_model_dir):
  good = [{"id": "ok1", "prompt": "def add("}, {"id": 7, "prompt_ids": [3, 4, 5]}]
  bom = b"\xef\xbb\xbf" + json.dumps(good[0]).encode()  # (a byte-order mark: not an error)
  records = [bom] + [r for _, r in BAD_LINES] + good[1:] + [{"id": "ok1", "prompt": "x"}]
  by_id, metrics = _run(tmp_path, tiny_model_dir, records, defaults=Defaults(max_new_tokens=4))
  out = _read(tmp_path / "out.jsonl")
  assert len(out) == len(records)  # exactly one record per input line
  errors = [r for r in out if "error" in r]
  assert len(errors) == len(BAD_LINES) + 1  # + the duplicate id
  assert sorted(r["line"] for r in errors) == list(range(2, 2 + len(BAD_LINES))) + [len(records)]
  dup = [r for r in errors if r["line"] == len(records)][0]
  assert "duplicate id" in dup["error"] and dup["id"] == "ok1"
  messages = {name: r["error"] for (name, _), r in zip(BAD_LINES, sorted(
      (r for r in errors if r["line"] < len(records)), key=lambda r: r["line"]))}
  assert "not valid JSON" in messages["not json"]
  assert "not valid UTF-8 (byte 27" in messages["not utf-8"]
  assert "outside the vocabulary" in messages["out of vocab"]
  assert "context" in messages["too long"]
  assert "top_p" in messages["bad top_p"] and "temperature" in messages["bad temperature"]
  assert "unknown field" in messages["unknown field"] and "max_tokens" in messages["unknown field"]
  assert messages["unpaired surrogate"].startswith("metadata['note']: holds an unpaired surrogate")
  assert messages["unpaired surrogate id"].startswith("id: holds an unpaired surrogate")
  assert "top_k must be in [0, 2**31)" in messages["huge top_k"]
  assert messages["nan"] == "not valid JSON: NaN is not a JSON number"
  assert messages["float overflow"] == "not valid JSON: 1e400 is out of a float's range"
  assert messages["long integer"].startswith("not valid JSON: Exceeds the limit")
  assert messages["deep nesting"] == "not valid JSON: nested too deeply"
  assert messages["bool id"].startswith("id: expected a string or integer, got true")
  assert [r["id"] for r in errors if r["error"] == messages["bool id"]] == [None]
  for rid in ("ok1", 7):
    rec = by_id[rid] if rid == 7 else [r for r in out if r.get("id") == "ok1" and "error" not in r][0]
    assert rec["finish_reason"] in ("stop", "length") and rec["completion_ids"]
    assert isinstance(rec["completion"], str) and rec["prompt_tokens"] > 0
  assert metrics["num_failed"] == len(BAD_LINES) + 1 and metrics["num_requests"] == len(records)
  for key in ("tokens_per_second", "prefill_tokens_per_second", "decode_tokens_per_second"):
    assert metrics[key] > 0


def test_resuming_after_a_corrected_line_and_from_another_jobs_output(tmp_path, tiny_model_dir):
  """A bad line corrected and the job run again: the line's error record gives way to its
  completion (one record per line). An --output holding another job's records is refused."""
  lines = [{"id": 1, "prompt": "def add("}, {"id": 2, "prompt": "x", "max_new_tokens": 0}]
  prompts, out = _write(tmp_path / "p.jsonl", lines), tmp_path / "out.jsonl"
  job = lambda: GenerateJob(prompts=str(prompts), output=str(out), model=str(tiny_model_dir),
                            progress=False, mesh="data:1", defaults=Defaults(max_new_tokens=3))
  assert run(job())["num_failed"] == 1
  _write(prompts, lines[:1] + [{"id": 2, "prompt": "x"}])
  metrics = run(job())
  got = _read(out)
  assert metrics["num_skipped_already_done"] == 1 and metrics["num_failed"] == 0
  assert sorted(r["line"] for r in got) == [1, 2] and not any("error" in r for r in got)
  _write(prompts, [{"id": 1, "prompt": "class Point(object):"}, {"id": 2, "prompt": "x"}])
  with pytest.raises(UserError, match="--output: its record for id 1 .* another job's output"):
    run(job())
  _write(prompts, [{"id": 3, "prompt": "def add("}, {"id": 2, "prompt": "x"}])
  with pytest.raises(UserError, match="id 1 matches no request of this --prompts"):
    run(job())
  _write(prompts, lines[:1] + [{"id": 2, "prompt": "x"}])
  with pytest.raises(UserError, match="id 1 ended after 3 tokens .* this job's 5"):
    run(dataclasses.replace(job(), defaults=Defaults(max_new_tokens=5)))
  with pytest.raises(UserError, match="id 1 holds 1 completions, this job asks 2"):
    run(dataclasses.replace(job(), num_samples=2, defaults=Defaults(max_new_tokens=3,
                                                                     temperature=1.0)))
  assert _read(out) == got
  assert run(job())["num_skipped_already_done"] == 2  # the same job still resumes
  # the parts a killed 2-process run left (one torn a few bytes into a record), rerun as one
  # process: merged, nothing run twice (they were ignored, and left behind)
  done = _read(out)
  out.unlink()
  for i, rec in enumerate(done):
    (tmp_path / f"out.jsonl.part-{i}-of-2").write_text(json.dumps(rec) + "\n" + '{"i' * i)
  assert run(job())["num_skipped_already_done"] == 2
  assert sorted(map(json.dumps, _read(out))) == sorted(map(json.dumps, done))
  assert not list(tmp_path.glob("out.jsonl.part-*"))
  # a file that is no output of this command is refused untouched (its last line was cut off
  # as a torn record, and records appended to it)
  for text in ("my notes\nline two\nlast line", '{"id": 1, "line": 1}\n[1, 2]\n',
               '{"id": "q1", "prompt": "a one-line prompts file"}'):
    out.write_text(text)
    with pytest.raises(UserError, match="--output: .* is not a record of jaxinfer generate"):
      run(job())
    assert out.read_text() == text


def test_resuming_after_lines_were_inserted_keeps_one_record_per_line(tmp_path, tiny_model_dir):
  """Lines inserted before others between two runs: the records already written take their
  ids' new lines, and an error record is the current line's (never a stale one beside it)."""
  a, bad, c = ({"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x", "max_new_tokens": 0},
               {"id": "c", "prompt_ids": [5, 6]})
  prompts, out = _write(tmp_path / "p.jsonl", [a, bad, c]), tmp_path / "out.jsonl"
  job = lambda: GenerateJob(prompts=str(prompts), output=str(out), model=str(tiny_model_dir),
                            progress=False, mesh="data:1", defaults=Defaults(max_new_tokens=2))
  run(job())
  first = {r["id"]: r for r in _read(out)}
  _write(prompts, [{"id": "z", "prompt_ids": [7]}, a, bad, c])
  metrics = run(job())
  got = _read(out)
  assert sorted((r["line"], r["id"], "error" in r) for r in got) == [
      (1, "z", False), (2, "a", False), (3, "b", True), (4, "c", False)]
  assert metrics["num_skipped_already_done"] == 2 and metrics["num_completed"] == 1
  assert {r["id"]: r["completion_ids"] for r in got if "error" not in r and r["id"] != "z"} == {
      k: r["completion_ids"] for k, r in first.items() if "error" not in r}
  assert run(job())["num_skipped_already_done"] == 4 and _read(out) == got


def test_stop_strings_truncate_text_and_ids(tmp_path, tiny_model_dir):
  tok = Tokenizer.from_dir(tiny_model_dir)
  base, _ = _run(tmp_path, tiny_model_dir, [{"id": "a", "prompt": "class Point:"}],
                 defaults=Defaults(max_new_tokens=24))
  text = base["a"]["completion"]
  assert len(text) > 6, text
  stop = text[len(text) // 2:len(text) // 2 + 3]
  cut = text.index(stop)
  stopped, _ = _run(tmp_path, tiny_model_dir, [{"id": "a", "prompt": "class Point:", "stop": stop}],
                    defaults=Defaults(max_new_tokens=24), decode_steps=3)
  rec = stopped["a"]
  assert rec["finish_reason"] == "stop"
  assert rec["completion"] == text[:cut]
  ids = rec["completion_ids"]
  assert ids == base["a"]["completion_ids"][:len(ids)]
  assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])


def test_a_completion_reads_on_from_its_prompt(tmp_path):
  """With a SentencePiece-style tokenizer (which drops the space that begins a text), a
  completion's text is what it adds to its prompt's: " cat sat" after "the", the space kept,
  also behind special tokens; stop strings are found in that text."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
  from jaxinfer.api import completion
  from jaxinfer.requests import Request, truncate_at_stop
  hf = HFTokenizer(models.BPE(unk_token="<unk>"))
  hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  hf.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
      vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = Tokenizer.from_dir(tmp_path)
  prompt, ids = tok.encode("the"), tok.encode("the cat sat")[1:]
  assert tok.decode(ids) == "cat sat"  # (alone)
  assert tok.decode(ids, prompt) == " cat sat"
  assert tok.decode(ids, prompt + [tok.token_id("</s>")] * 9) == " cat sat"
  assert tok.decode(prompt + ids) == tok.decode(prompt) + tok.decode(ids, prompt)
  assert truncate_at_stop(ids, (" sat",), tok, prompt) == (ids[:2], " cat", True)
  req = Request(0, 1, prompt, 8, 0.0, 0, 1.0, 0.0, stop=())
  assert completion(ids, False, req, tok).text == " cat sat"
  req = dataclasses.replace(req, stop=(" sat",))
  assert (completion(ids, False, req, tok).text, completion(ids, False, req, tok).ids) == (
      " cat", ids[:2])


def test_per_record_parameters_and_seeds(tmp_path, tiny_model_dir):
  records = [{"id": "greedy", "prompt": "def add(a, b):", "max_new_tokens": 3},
             {"id": "hot", "prompt": "def add(a, b):", "temperature": 1.5, "top_k": 50,
              "max_new_tokens": 12},
             {"id": "hot2", "prompt": "def add(a, b):", "temperature": 1.5, "top_k": 50,
              "max_new_tokens": 12}]
  a, _ = _run(tmp_path, tiny_model_dir, records, seed=1)
  b, _ = _run(tmp_path, tiny_model_dir, records[::-1], seed=1, batch_size=1)
  c, _ = _run(tmp_path, tiny_model_dir, records, seed=2)
  assert len(a["greedy"]["completion_ids"]) <= 3
  for rid in a:  # same seed: same output whatever the batching
    assert a[rid]["completion_ids"] == b[rid]["completion_ids"]
  assert a["hot"]["completion_ids"] != a["hot2"]["completion_ids"]  # keys differ per id
  assert a["hot"]["completion_ids"] != c["hot"]["completion_ids"]  # and per run seed
  assert a["greedy"]["completion_ids"] == c["greedy"]["completion_ids"]


def test_job_validation_names_the_flag(tmp_path, tiny_model_dir):
  prompts = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt": "x"}])
  bad_config = tmp_path / "bad_model"
  bad_config.mkdir()
  (bad_config / "config.json").write_text("{oops")
  (bad_config / "model.safetensors").write_bytes(b"")
  cases = [
      (dict(prompts=str(tmp_path / "missing.jsonl")), "--prompts"),
      (dict(output=str(tmp_path / "no_dir" / "out.jsonl")), "--output"),
      (dict(mesh="data:2,tensor:4"), "--mesh"),
      (dict(mesh="data:64"), "--mesh"),
      (dict(batch_size=0), "--batch_size"),
      (dict(dtype="int8"), "--dtype"),
      (dict(defaults=Defaults(top_p=1.5)), "--top_p"),
      (dict(model=str(tmp_path)), "--model"),
      (dict(speculative="ngram", sparsity="block_topk:2"), "--sparsity"),
      (dict(output=str(prompts)), "--output: .* is the --prompts file"),
      (dict(metrics_output=str(tmp_path / "out.jsonl")), "--metrics_output: .* is the --output"),
      (dict(model=str(bad_config)), r"config.json: not valid JSON \(Expecting property name"),
      (dict(output="/proc/out.jsonl"), "--output: "),  # (a directory no file can be made in)
      (dict(draft_fallback=0.5), "--draft_fallback: applies to speculative decoding"),
      (dict(sparsity="block_topk:2", chunk_lanes=2), "--chunk_lanes: under --sparsity="),
      (dict(speculative="ngram", sparsity="sinks_window:1,3", num_draft_tokens=4),
       "--speculative=ngram"),  # a chain of 5 past the window of 3
      # options the chosen proposer would not read
      (dict(speculative="ngram", draft_layers="0"), "--draft_layers: .*layerskip"),
      (dict(speculative="recycling", num_draft_tokens=7), "--num_draft_tokens: not read"),
      (dict(speculative="ngram", tree="3,2"), "--tree: .*ngram takes no --tree"),
  ]
  for overrides, flag in cases:
    kw = dict(prompts=str(prompts), output=str(tmp_path / "out.jsonl"), model=str(tiny_model_dir),
              progress=False)
    kw.update(overrides)
    with pytest.raises(UserError, match=flag):
      run(GenerateJob(**kw))
    assert not (tmp_path / "out.jsonl").exists()  # failed before any work
  # --overwrite removes the old output only once the job is known to run
  (tmp_path / "out.jsonl").write_text("kept\n")
  with pytest.raises(UserError, match="--kv_pages: "):
    run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "out.jsonl"),
                    model=str(tiny_model_dir), kv_pages=1, overwrite=True, progress=False))
  assert (tmp_path / "out.jsonl").read_text() == "kept\n"
  GenerateJob(prompts=prompts, output=tmp_path / "o.jsonl", model=str(tiny_model_dir)).validate()
  # one run writes an output at a time (a second would write every record again)
  from jaxinfer import output
  with output.exclusive(tmp_path / "out.jsonl"):
    with pytest.raises(UserError, match="--output: another run is writing"):
      run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "out.jsonl"),
                      model=str(tiny_model_dir), progress=False))
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out.jsonl"]


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "jaxinfer", *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=300)


def test_cli_end_to_end_exit_status_and_no_traceback(tmp_path, tiny_model_dir):
  prompts = _write(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "def add("}, "{bad json",
                                          {"id": "long", "prompt_ids": [1] * 1000},
                                          {"id": "b", "prompt": "class A:"},
                                          {"id": "c", "prompt": "import os"}])
  out, metrics = tmp_path / "out.jsonl", tmp_path / "m.json"
  proc = _cli("generate", f"--model={tiny_model_dir}", f"--prompts={prompts}", f"--output={out}",
              f"--metrics_output={metrics}", "--max_new_tokens=5", "--mesh=data:2",
              "--cpu_devices=2", "--noprogress", "--compilation_cache=none")
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  records = _read(out)
  assert len(records) == 5 and sum("error" in r for r in records) == 2
  m = json.loads(metrics.read_text())
  assert m["num_requests"] == 5 and m["num_failed"] == 2 and m["mesh"] == "data:2,fsdp:1,model:1"
  # two replicas compile at once: wall time compiling, not the sum of their threads' times
  assert 0 < m["compile_seconds"] < m["generate_seconds"], m
  assert m["compilations_loaded"] == 0  # (--compilation_cache=none: none kept or loaded)
  # a --cache_dir that is not a directory: one line
  proc = _cli("generate", "--model=embedded:smoke", f"--cache_dir={prompts}",
              f"--prompts={prompts}", f"--output={tmp_path / 'x.jsonl'}")
  assert proc.returncode == 2 and proc.stderr.splitlines() == [
      f"error: --cache_dir: {str(prompts)!r} is not a directory"], proc.stderr


def test_stop_strings_that_cannot_match_are_refused(tmp_path, tiny_model_dir):
  """--stop with a model that has no tokenizer.json names the flag, before any line is read
  (each line's record was the same error); a stop string holding a special token, which the
  text it is looked for in never holds, is refused (it was ignored: generation ran on to its
  budget), once for --stop, per request for a line's own."""
  import shutil
  model = shutil.copytree(tiny_model_dir, tmp_path / "ids_only")
  (model / "tokenizer.json").unlink()
  prompts = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt_ids": [3, 4]}])
  with pytest.raises(UserError, match="^--stop: stop strings need a tokenizer"):
    run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "o.jsonl"), model=str(model),
                    progress=False, defaults=Defaults(stop=("\n",))))
  assert not (tmp_path / "o.jsonl").exists()
  with pytest.raises(UserError, match=re.escape(
      "--stop: '<|endoftext|>\\n' holds the special token '<|endoftext|>'")):
    run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "o.jsonl"),
                    model=str(tiny_model_dir), progress=False,
                    defaults=Defaults(stop=(")", "<|endoftext|>\n"))))
  from jaxinfer.requests import InvalidRequest, make_request
  tok = Tokenizer.from_dir(tiny_model_dir)
  line = {"id": 1, "prompt": "x", "stop": ["<|endoftext|>"]}
  with pytest.raises(InvalidRequest, match=re.escape("stop: '<|endoftext|>' holds the special")):
    make_request(1, line, Defaults(), tok, tok.vocab_size, 64)
  assert make_request(1, line | {"stop": ["<|endoftext"]}, Defaults(), tok, tok.vocab_size,
                      64).stop == ("<|endoftext",)


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, tiny_model_dir):
  """The output's file system refusing a write (here a file-size limit) ends the run with one
  line (it was a traceback of the writer's thread, then of closing the file), the records
  already written kept, and a rerun resumes from them."""
  prompts = _write(tmp_path / "p.jsonl", [{"id": i, "prompt_ids": [3 + i, 4, 5]}
                                          for i in range(40)])
  out = tmp_path / "out.jsonl"
  limited = ["sh", "-c", 'ulimit -f 8 && exec "$@"', "sh"]  # files of 4 or 8 KiB at most
  proc = subprocess.run(limited + [sys.executable, "-m", "jaxinfer", "generate",
                                   f"--model={tiny_model_dir}", f"--prompts={prompts}",
                                   f"--output={out}", "--max_new_tokens=12", "--noprogress",
                                   "--compilation_cache=none", "--mesh=data:1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[-1].startswith(
      f"error: --output: writing {str(out)!r} failed ([Errno 27] File too large)"), proc.stderr
  assert "Traceback" not in proc.stderr
  kept = out.stat().st_size
  assert 0 < kept <= 8192
  metrics = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(tiny_model_dir),
                            progress=False, mesh="data:1", defaults=Defaults(max_new_tokens=12)))
  assert 0 < metrics["num_skipped_already_done"] < 40
  assert sorted(r["id"] for r in _read(out)) == list(range(40))


def test_a_host_without_a_tpu_starts_no_tpu_runtime(tmp_path, tiny_model_dir):
  """libtpu installed (the tpu-aot extra, as here) on a host with no TPU chip: a command, and the
  Python API, compute on the CPU without starting libtpu's runtime, which printed a screen of
  warnings (no metadata server, no TPU workers) first."""
  import importlib.util
  assert importlib.util.find_spec("libtpu"), "the test command installs the tpu-aot extra"
  prompts = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt": "def add("}])
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", f"--model={tiny_model_dir}",
                         f"--prompts={prompts}", f"--output={tmp_path / 'out.jsonl'}",
                         "--max_new_tokens=2", "--noprogress"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0 and "TPU" not in proc.stderr, proc.stderr
  assert _read(tmp_path / "out.jsonl")[0]["completion_ids"]
  api = (f"import jax, jaxinfer; llm = jaxinfer.LLM({str(tiny_model_dir)!r}, dtype='float32'); "
         f"out, = llm.generate(['def add('], jaxinfer.SamplingParams(max_new_tokens=2)); "
         f"print(jax.config.jax_platforms, jax.default_backend(), out.completion_ids == "
         f"{_read(tmp_path / 'out.jsonl')[0]['completion_ids']!r})")
  proc = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0 and "TPU" not in proc.stderr, proc.stderr
  assert proc.stdout.split() == ["cpu", "cpu", "True"], proc.stdout


def test_jax_started_or_told_keeps_its_platforms(monkeypatch):
  """Where JAX's backends have started (or its platforms were chosen), the choice stays JAX's."""
  import jax
  from jaxinfer.platform import skip_an_absent_tpu
  jax.devices()
  monkeypatch.delenv("JAX_PLATFORMS")
  chosen = jax.config.jax_platforms
  try:
    jax.config.update("jax_platforms", None)
    skip_an_absent_tpu.__wrapped__()
    assert jax.config.jax_platforms is None  # (started: left alone)
  finally:
    jax.config.update("jax_platforms", chosen)


def test_compile_seconds_count_one_replicas_compiling(monkeypatch):
  """A call waited for its own thread's compilation and for the most one replica compiled:
  replicas compiling one after another while the others generate are not all waited for (their
  union once took 5.65 s of an 8-replica call's 5.9 s as compiling)."""
  import threading
  from jaxinfer.compilation_cache import CompileClock
  me = threading.get_ident()
  spans = [(0.0, 0.5, me), (0.2, 0.6, me), (1.0, 2.0, 1), (2.0, 3.0, 2), (2.5, 3.2, 2),
           (-5.0, -1.0, 3)]  # (before the call)
  monkeypatch.setattr(CompileClock, "_spans", spans)
  assert CompileClock.critical(since=0.0) == pytest.approx(0.6 + 1.2)


@pytest.mark.parametrize("flag,needle", [
    ("--temperature=-1", "temperature"),
    ("--top_p=0", "top_p"),
    ("--min_p=3", "min_p"),
    ("--mesh=rows:2", "mesh"),
    ("--model=/nonexistent/dir", "--model"),
    ("--batch_size=0", "batch_size"),
    ("--dtype=int4", "dtype"),
    ("--sparsity=sinks_window:4", "sparsity"),
    ("--implementation=cuda", "implementation"),
    ("--max_new_tokens=0", "max_new_tokens"),
    ("--no_such_flag=1", "no_such_flag"),
])
def test_cli_invalid_flags_fail_before_work(tmp_path, tiny_model_dir, flag, needle):
  prompts = _write(tmp_path / "p.jsonl", [{"id": 1, "prompt": "x"}])
  out = tmp_path / "out.jsonl"
  args = ["generate", f"--model={tiny_model_dir}", f"--prompts={prompts}", f"--output={out}", flag]
  proc = _cli(*args)
  assert proc.returncode == 2  # (absl's own checks of a flag's value too)
  assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not out.exists()


def test_cli_usage():
  proc = _cli()
  assert proc.returncode == 2 and "generate" in proc.stdout
  proc = _cli("frobnicate")
  assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_pallas_implementation_matches_xla(tmp_path, tiny_model_dir):
  records = [{"id": i, "prompt": p, "max_new_tokens": 12}
             for i, p in enumerate(["def add(a, b):", "class Point:", "x"])]
  xla, _ = _run(tmp_path, tiny_model_dir, records, batch_size=2)
  pallas, m = _run(tmp_path, tiny_model_dir, records, batch_size=2, implementation="pallas")
  assert m["implementation"] == "pallas"
  for rid in xla:
    assert pallas[rid]["completion_ids"] == xla[rid]["completion_ids"]
  windowed, m = _run(tmp_path, tiny_model_dir, records, implementation="pallas",
                     sparsity="sinks_window:1,3")
  assert m["sparsity"] == "sinks_window:1,3"
  assert any(windowed[r]["completion_ids"] != xla[r]["completion_ids"] for r in xla)


def test_cli_compilation_cache_makes_a_repeated_run_load_its_executables(tmp_path,
                                                                         tiny_model_dir):
  prompts = _write(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in
                                          enumerate(["def add(", "class Point:", "x = 1"])])
  cache = tmp_path / "xla"
  runs = []
  for i in range(2):
    out, metrics = tmp_path / f"out{i}.jsonl", tmp_path / f"m{i}.json"
    # (every computation kept: the tiny model's steps may compile faster than the default
    # minimum worth a file)
    proc = _cli("generate", f"--model={tiny_model_dir}", f"--prompts={prompts}", f"--output={out}",
                f"--metrics_output={metrics}", "--max_new_tokens=6", f"--compilation_cache={cache}",
                "--cpu_devices=1", "--noprogress",
                env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert proc.returncode == 0, proc.stderr
    runs.append((_read(out), json.loads(metrics.read_text())))
    if i == 0:
      entries = sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))
      assert entries, "nothing was written to the compilation cache"
  (first, m0), (second, m1) = runs
  assert first == second  # loaded executables compute the same completions
  # the second run loaded at least as many executables as the engine compiled steps, and wrote
  # no step of the engine anew
  assert m1["compilations"] == m0["compilations"] > 0, (m0, m1)
  assert m1["compilations_loaded"] >= m1["compilations"] > m0["compilations_loaded"], (m0, m1)
  after = {p.name for p in cache.iterdir() if p.name.endswith("-cache")}
  assert set(entries) <= after
  assert not [e for e in after - set(entries) if e.startswith("jit_engine")], after
