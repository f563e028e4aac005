"""jaxinfer's batch engine against Hugging Face transformers' `generate`, same weights, same run.

  python experiments/bench_vs_transformers.py             # embedded model, batch 8 (CPU)
  python experiments/bench_vs_transformers.py --model=preset:llama3-8b --dtype=bfloat16 \
      --batch_sizes=64,128,256                              # a GPU

Per batch size B: B prompts of --prompt_len random token ids, each decoded greedily for exactly
--new_tokens tokens (EOS off on both sides). The weights are written once as a Hugging Face
directory (random weights for preset:NAME) that both sides load. Each side runs in its own
process (JAX preallocates accelerator memory; torch keeps its own), they alternate --repeats
times, and each process warms up (compiles) before it is timed. Reported per side: generation
tokens/s (B * new_tokens / wall time of generation, compilation excluded); for jaxinfer also
the decode-only tokens/s and that step's achieved bandwidth (weights + the KV the step reads /
step time) against the device's measured copy bandwidth (roofline.py); and how many of the B
completions agree token for token (float32 agrees exactly; bfloat16 drifts where two logits are
within rounding). transformers runs its default dynamic cache unless --hf_cache=static. Results
are appended to experiments/results/bench_vs_transformers.jsonl.

  python experiments/bench_vs_transformers.py --speculative  # speculative decoding, batch 1

--speculative compares speculative decoding instead, at batch 1: --num_prompts prompts, the
middle --prompt_len tokens of each of as many distinct held-out stdlib files (bench_speculative's
prompts), --new_tokens greedy tokens each (EOS off). transformers runs plain `generate`, prompt
lookup (`prompt_lookup_num_tokens=K` for each of --prompt_lookup) and assisted generation with a
copy of the model keeping only its first half of layers (`assistant_model=`), one prompt at a
time; jaxinfer runs `jaxinfer.LLM(model, batch_size=1)` plainly, with ngram drafts of
--num_draft_tokens (speculation "always" and "auto") and with its own first-half-of-layers draft
(layerskip, "always"), all prompts in one call through one slot. Each side is a process of its
own that stays up; after warm-up they take turns for --repeats rounds, every mode once a round.
Reported: each mode's tokens/s and speedup over its own side's plain decoding of the same round
(median, min-max, quartiles), tau (tokens per target forward, bonus included), the absolute ratio
of jaxinfer's ngram tokens/s over transformers' prompt lookup, and how many completions are
identical to transformers' plain decoding in every round.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "'embedded', a model directory, or preset:NAME (random "
                    "weights, e.g. preset:llama3-8b).")
flags.DEFINE_string("dtype", "auto", "auto, float32 or bfloat16 (both sides).")
flags.DEFINE_list("batch_sizes", ["8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per sequence.")
flags.DEFINE_integer("repeats", 3, "Alternating rounds; medians are reported.")
flags.DEFINE_enum("hf_cache", "dynamic", ["dynamic", "static"], "transformers' KV cache.")
flags.DEFINE_integer("chunk_lanes", 8, "jaxinfer: prompts prefilled per engine step.")
flags.DEFINE_bool("speculative", False, "Compare speculative decoding at batch 1 instead (see "
                  "above).")
flags.DEFINE_integer("num_prompts", 32, "--speculative: prompts, from distinct held-out files.")
flags.DEFINE_integer("num_draft_tokens", 4, "--speculative: jaxinfer's ngram draft length.")
flags.DEFINE_list("prompt_lookup", ["4", "10"], "--speculative: transformers' "
                  "prompt_lookup_num_tokens values.")
flags.DEFINE_integer("threads", os.cpu_count(), "torch's intra-op threads (jax uses the cores).")
flags.DEFINE_string("omp_wait_policy", "", "--speculative: OMP_WAIT_POLICY of the "
                    "transformers process ('': unset). On a CPU other jobs keep busy, OpenMP's "
                    "spinning slows its small ops by 10x and more, PASSIVE avoids that; on an "
                    "idle one PASSIVE is about 2x slower.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" /
                                   "bench_vs_transformers.jsonl"), "Results file (appended).")
# internal: one side's measurement, run in a process of its own
flags.DEFINE_enum("side", None, ["save", "jaxinfer", "transformers", "jaxinfer-spec",
                                  "transformers-spec"], "(internal)")
flags.DEFINE_string("workdir", None, "(internal) model directory and prompts.")
flags.DEFINE_integer("batch", None, "(internal) batch size.")
FLAGS = flags.FLAGS


def _prompts(vocab_size: int, b: int) -> list[list[int]]:
  import numpy as np
  rng = np.random.RandomState(b)
  return rng.randint(1, vocab_size, (b, FLAGS.prompt_len)).tolist()


def save_side(workdir: Path) -> None:
  """Writes the weights as a Hugging Face directory with EOS removed (every row decodes the full
  length on both sides)."""
  import jax

  from jaxinfer import checkpoint
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  from jaxinfer.embedded import heldout_file_windows
  dtype = None if FLAGS.dtype == "auto" else FLAGS.dtype
  if FLAGS.model.startswith("preset:"):
    cfg = PRESETS[FLAGS.model.split(":", 1)[1]]
    cfg = dataclasses.replace(cfg, dtype=dtype or cfg.dtype)
    params = M.init_params(cfg, jax.random.key(0))
    tok = None
  else:
    cfg, params, tok = checkpoint.load_model(str(checkpoint.resolve_model_dir(FLAGS.model)),
                                             dtype)
  cfg = dataclasses.replace(cfg, eos_token_ids=())
  checkpoint.save_hf(workdir / "model", cfg, params)
  if FLAGS.speculative:
    if tok is None:  # random weights: the embedded tokenizer's ids
      tok = checkpoint.load_model(str(checkpoint.resolve_model_dir("embedded")))[2]
    windows = heldout_file_windows(tok, FLAGS.num_prompts, FLAGS.prompt_len)
    (workdir / "prompts.json").write_text(json.dumps(windows))
  info = {"vocab_size": cfg.vocab_size, "params": cfg.num_params(), "dtype": cfg.dtype,
          "itemsize": jax.numpy.dtype(cfg.jnp_dtype).itemsize, "num_layers": cfg.num_layers,
          "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim}
  (workdir / "info.json").write_text(json.dumps(info))
  print(json.dumps(info))


def jaxinfer_side(workdir: Path, b: int, info: dict) -> None:
  import jax

  from jaxinfer.requests import Defaults
  from jaxinfer.roofline import measure_ceilings
  from jaxinfer.runner import GenerateJob, run
  prompts = workdir / f"prompts{b}.jsonl"
  prompts.write_text("".join(json.dumps({"id": i, "prompt_ids": p}) + "\n"
                             for i, p in enumerate(_prompts(info["vocab_size"], b))))
  out = workdir / f"jaxinfer{b}.jsonl"
  job = lambda: GenerateJob(prompts=str(prompts), output=str(out), model=str(workdir / "model"),
                            defaults=Defaults(max_new_tokens=FLAGS.new_tokens), batch_size=b,
                            chunk_size=max(128, FLAGS.prompt_len),
                            chunk_lanes=FLAGS.chunk_lanes, progress=False,
                            overwrite=True, mesh="data:1")
  run(job())  # compiles
  m = run(job())
  records = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["id"])
  assert all(r["completion_tokens"] == FLAGS.new_tokens for r in records), "a row ended early"
  weight_bytes = info["params"] * info["itemsize"]
  # a decode step reads every weight and each row's KV (on average the prompt plus half the
  # output)
  kv_bytes = 2 * info["num_layers"] * b * (FLAGS.prompt_len + FLAGS.new_tokens / 2) * \
      info["kv_heads"] * info["head_dim"] * info["itemsize"]
  step_s = b / m["decode_tokens_per_second"]
  ceilings = measure_ceilings(matmul_dtype=jax.numpy.bfloat16 if info["itemsize"] == 2
                              else jax.numpy.float32)
  gbps = (weight_bytes + kv_bytes) / step_s / 1e9
  print(json.dumps({
      "generation_tokens_per_second": m["generation_tokens_per_second"],
      "decode_tokens_per_second": m["decode_tokens_per_second"],
      "decode_step_ms": round(step_s * 1e3, 3), "achieved_gbps": round(gbps, 1),
      "fraction_of_measured_bandwidth": round(gbps / ceilings.bandwidth_gbps, 3),
      "ceilings": ceilings.as_dict(), "compile_seconds": m["compile_seconds"],
      "completions": [r["completion_ids"] for r in records],
      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


def transformers_side(workdir: Path, b: int, info: dict) -> None:
  import torch
  import transformers
  from transformers import AutoModelForCausalLM
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype="auto")
  model = model.to(device).eval()
  ids = torch.tensor(_prompts(info["vocab_size"], b), device=device)
  kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones_like(ids))
  if FLAGS.hf_cache == "static":
    kw["cache_implementation"] = "static"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.inference_mode():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                         **kw)
    sync()
    seconds = time.perf_counter() - t0
  completions = out[:, ids.shape[1]:].tolist()
  assert all(len(c) == FLAGS.new_tokens for c in completions)
  print(json.dumps({
      "generation_tokens_per_second": round(b * FLAGS.new_tokens / seconds, 2),
      "completions": completions, "device": (torch.cuda.get_device_name() if device == "cuda"
                                             else "cpu"),
      "torch": torch.__version__, "transformers": transformers.__version__}))


def _serve_rounds(modes: dict, info: dict) -> None:
  """A side's worker: warms every mode up, says READY with `info`, then runs every mode once per
  line read ("round") and answers RESULT {mode: (seconds, completions, extras)}; the modes run
  in their order, reversed every other round (so drift over a round favours none of them)."""
  for name, run in modes.items():
    print(f"warm-up {name}: {run()[0]:.2f}s", file=sys.stderr, flush=True)
  print("READY " + json.dumps(info), flush=True)
  for i, _ in enumerate(sys.stdin):
    order = list(modes) if i % 2 == 0 else list(reversed(modes))
    results = {name: modes[name]() for name in order}
    print("RESULT " + json.dumps({name: results[name] for name in modes}), flush=True)


def jaxinfer_spec_side(workdir: Path) -> None:
  import jax

  import jaxinfer
  prompts = json.loads((workdir / "prompts.json").read_text())
  sampling = jaxinfer.SamplingParams(max_new_tokens=FLAGS.new_tokens)
  model, dtype = str(workdir / "model"), None if FLAGS.dtype == "auto" else FLAGS.dtype
  opts = dict(batch_size=1, progress=False) | ({"dtype": dtype} if dtype else {})
  k = FLAGS.num_draft_tokens
  llms = {"plain": jaxinfer.LLM(model, **opts),
          f"ngram K={k}, always": jaxinfer.LLM(model, speculative="ngram", num_draft_tokens=k,
                                               speculation="always", **opts),
          f"ngram K={k}, auto": jaxinfer.LLM(model, speculative="ngram", num_draft_tokens=k,
                                             **opts),
          f"layerskip K={k}, always": jaxinfer.LLM(model, speculative="layerskip",
                                                   num_draft_tokens=k, speculation="always",
                                                   **opts)}

  def mode(llm):
    def run():
      t0 = time.perf_counter()
      outs = llm.generate(prompts, sampling)
      m = llm.metrics  # (compilation left out: the auto policy compiles a new tree size)
      return (time.perf_counter() - t0 - m["compile_seconds"], [o.completion_ids for o in outs],
              {"tau": m.get("mean_accepted_tokens") or None,  # None: no batch speculated
               "compile_seconds": m["compile_seconds"],
               "generation_tokens_per_second": m["generation_tokens_per_second"],
               "speculation": m.get("speculation")})
    return run

  runs = {name: mode(llm) for name, llm in llms.items()}
  warmup = dict.fromkeys(runs, 0.0)  # compilation, which the timed rounds leave out
  for name, run in runs.items():  # (and the auto policy's measurements of its modes)
    for _ in range(3):
      warmup[name] += run()[2]["compile_seconds"]
  _serve_rounds(runs, {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "warmup_compile_seconds": {k: round(v, 2) for k, v in warmup.items()}})


def transformers_spec_side(workdir: Path) -> None:
  import copy

  import torch
  import transformers
  from transformers import AutoModelForCausalLM
  torch.set_num_threads(FLAGS.threads)
  transformers.logging.set_verbosity_error()
  prompts = json.loads((workdir / "prompts.json").read_text())
  model = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype="auto").eval()
  half = model.config.num_hidden_layers // 2
  draft = copy.deepcopy(model)  # the first half of the layers, the same norm and head
  draft.model.layers = draft.model.layers[:half]
  draft.config.num_hidden_layers = half
  forwards = [0]  # the target's forward calls (prefill, verifications)
  model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
  n = FLAGS.new_tokens
  kw = dict(do_sample=False, max_new_tokens=n, pad_token_id=0)

  def mode(extra):
    def run():
      forwards[0], outs = 0, []
      t0 = time.perf_counter()
      with torch.inference_mode():
        for p in prompts:
          ids = torch.tensor([p])
          out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw, **extra)
          outs.append(out[0, len(p):].tolist())
      seconds = time.perf_counter() - t0
      assert all(len(c) == n for c in outs), "a completion ended early"
      # tokens per verification forward: every token after the prefill's first one
      return seconds, outs, {"tau": round(len(prompts) * (n - 1) / max(1, forwards[0] -
                                                                        len(prompts)), 4)}
    return run

  runs = {"plain": mode({})}
  runs |= {f"prompt lookup K={k}": mode({"prompt_lookup_num_tokens": int(k)})
           for k in FLAGS.prompt_lookup}
  runs[f"assisted, first {half} of {half * 2} layers"] = mode({"assistant_model": draft})
  _serve_rounds(runs, {"torch": torch.__version__, "transformers": transformers.__version__,
                       "threads": torch.get_num_threads()})


class _Worker:
  """A side's process, kept up between rounds."""

  def __init__(self, side: str, workdir: Path):
    self.side = side
    env = dict(os.environ)
    if side.startswith("transformers") and FLAGS.omp_wait_policy:
      env["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy
    self.proc = subprocess.Popen(_command(side, workdir), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)  # stderr: ours
    self.info = self._read("READY ")

  def _read(self, prefix: str) -> dict:
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return json.loads(line[len(prefix):])
    raise RuntimeError(f"{self.side} failed (its messages are above)")

  def round(self) -> dict:
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    return self._read("RESULT ")

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def speculative_main(workdir: Path) -> None:
  import numpy as np
  t0 = time.perf_counter()
  model = _side("save", workdir)
  workers = [_Worker("jaxinfer-spec", workdir), _Worker("transformers-spec", workdir)]
  rounds = {w.side: [] for w in workers}
  for r in range(FLAGS.repeats):
    for w in workers if r % 2 == 0 else workers[::-1]:  # alternating who goes first
      rounds[w.side].append(w.round())
      print(f"round {r + 1} {w.side}: " + ", ".join(
          f"{k} {v[0]:.2f}s" for k, v in rounds[w.side][-1].items()), file=sys.stderr,
          flush=True)
  for w in workers:
    w.close()
  reference = rounds["transformers-spec"][0]["plain"][1]
  tokens = len(reference) * FLAGS.new_tokens

  def spread(xs) -> dict:
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return {"median": round(float(med), 3), "min": round(float(min(xs)), 3),
            "max": round(float(max(xs)), 3), "iqr": [round(float(q1), 3), round(float(q3), 3)]}

  def side(name: str) -> dict:
    rs, out = rounds[name], {}
    for mode in rs[0]:
      runs = [r[mode] for r in rs]
      same = sum(all(run[1][i] == reference[i] for run in runs) for i in range(len(reference)))
      out[mode] = {"tokens_per_second": round(tokens / float(np.median([x[0] for x in runs])), 1),
                   "speedup_over_plain": spread([r["plain"][0] / r[mode][0] for r in rs]),
                   "identical_to_transformers_plain": f"{same}/{len(reference)}"}
      for key, last in runs[-1][2].items():  # numbers: the median over rounds; words: the last's
        values = [run[2].get(key) for run in runs]
        if all(isinstance(v, (int, float)) for v in values):
          out[mode][key] = round(float(np.median(values)), 4)
        elif last is not None:
          out[mode][key] = last
      compiled = workers_info.get(name, {}).get("warmup_compile_seconds", {})
      if mode in compiled:
        out[mode]["warmup_compile_seconds"] = compiled[mode]
    return out

  workers_info = {w.side: w.info for w in workers}
  ours, theirs = side("jaxinfer-spec"), side("transformers-spec")
  # jaxinfer's tokens/s over transformers' (the same tokens: their time over ours), per round
  ratio = lambda a, b: spread([rt[b][0] / rj[a][0] for rj, rt in zip(
      rounds["jaxinfer-spec"], rounds["transformers-spec"])])
  k = FLAGS.num_draft_tokens
  pairs = {f"jaxinfer ngram K={k} {policy} / transformers prompt lookup K={pl}":
           ratio(f"ngram K={k}, {policy}", f"prompt lookup K={pl}")
           for policy in ("always", "auto") for pl in FLAGS.prompt_lookup}
  pairs["jaxinfer plain / transformers plain"] = ratio("plain", "plain")
  info = workers[0].info | workers[1].info
  row = {"protocol": f"{FLAGS.num_prompts} held-out files, speculative, batch 1",
         "model": FLAGS.model, "params": model["params"], "dtype": model["dtype"], "batch": 1,
         "num_prompts": FLAGS.num_prompts, "prompt_len": FLAGS.prompt_len,
         "new_tokens": FLAGS.new_tokens, "eos": "off", "repeats": FLAGS.repeats,
         "prompt_set": f"the middle {FLAGS.prompt_len}-token window of each of the first "
                       f"{FLAGS.num_prompts} held-out stdlib files (by path) longer than that",
         "mode_order": "each side's modes in order, reversed every other round",
         "jaxinfer_modes": ours, "transformers_modes": theirs, "absolute_ratios": pairs,
         "transformers_assistant": "transformers' defaults (num_assistant_tokens etc.)",
         "device": info["device"], "jax": info["jax"], "torch": info["torch"],
         "transformers": info["transformers"], "threads": info["threads"],
         "omp_wait_policy": FLAGS.omp_wait_policy or None,
         "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat(),
         "run_seconds": round(time.perf_counter() - t0, 1),
         "load_average_1m": round(os.getloadavg()[0], 2)}  # other jobs on a shared CPU
  output.append_jsonl(FLAGS.results, [row])
  print(json.dumps(row, indent=2))


def _command(side: str, workdir: Path, b: int = 0) -> list[str]:
  cmd = [sys.executable, __file__, f"--side={side}", f"--workdir={workdir}", f"--batch={b}"]
  return cmd + [f"--{f}={getattr(FLAGS, f)}" for f in (
      "model", "dtype", "prompt_len", "new_tokens", "hf_cache", "chunk_lanes", "speculative",
      "num_prompts", "num_draft_tokens", "threads")] + [
      f"--prompt_lookup={','.join(FLAGS.prompt_lookup)}"]


def _side(side: str, workdir: Path, b: int = 0) -> dict:
  proc = subprocess.run(_command(side, workdir, b), capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{side} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.side:
    workdir = Path(FLAGS.workdir)
    if FLAGS.side == "save":
      return save_side(workdir)
    if FLAGS.side.endswith("-spec"):
      return (jaxinfer_spec_side if FLAGS.side == "jaxinfer-spec" else transformers_spec_side)(
          workdir)
    info = json.loads((workdir / "info.json").read_text())
    side = jaxinfer_side if FLAGS.side == "jaxinfer" else transformers_side
    return side(workdir, FLAGS.batch, info)
  if FLAGS.speculative:
    with tempfile.TemporaryDirectory() as d:
      return speculative_main(Path(d))
  import numpy as np
  with tempfile.TemporaryDirectory() as d:
    workdir = Path(d)
    model = _side("save", workdir)
    for b in map(int, FLAGS.batch_sizes):
      runs = {"jaxinfer": [], "transformers": []}
      for _ in range(FLAGS.repeats):
        for side in runs:
          runs[side].append(_side(side, workdir, b))
          print(b, side, runs[side][-1]["generation_tokens_per_second"], file=sys.stderr,
                flush=True)
      med = lambda side, key: float(np.median([r[key] for r in runs[side]]))
      ours, theirs = runs["jaxinfer"][-1], runs["transformers"][-1]
      agree = sum(a == t for a, t in zip(ours["completions"], theirs["completions"]))
      row = {
          "model": FLAGS.model, "params": model["params"], "dtype": model["dtype"], "batch": b,
          "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
          "hf_cache": FLAGS.hf_cache, "repeats": FLAGS.repeats,
          "jaxinfer_tokens_per_second": med("jaxinfer", "generation_tokens_per_second"),
          "transformers_tokens_per_second": med("transformers", "generation_tokens_per_second"),
          "jaxinfer_decode_tokens_per_second": med("jaxinfer", "decode_tokens_per_second"),
          "decode_step_ms": med("jaxinfer", "decode_step_ms"),
          "achieved_gbps": med("jaxinfer", "achieved_gbps"),
          "fraction_of_measured_bandwidth": med("jaxinfer", "fraction_of_measured_bandwidth"),
          "ceilings": ours["ceilings"], "compile_seconds": ours["compile_seconds"],
          "identical_completions": f"{agree}/{b}",
          "device": ours["device"], "jax": ours["jax"], "torch": theirs["torch"],
          "transformers": theirs["transformers"], "date": datetime.date.today().isoformat()}
      row["speedup"] = round(row["jaxinfer_tokens_per_second"]
                             / row["transformers_tokens_per_second"], 2)
      output.append_jsonl(FLAGS.results, [row])  # per batch size: a timeout keeps the rest
      print(json.dumps(row, indent=2))


if __name__ == "__main__":
  app.run(main)
