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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
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
flags.DEFINE_string("results", str(Path(__file__).parent / "results" /
                                   "bench_vs_transformers.jsonl"), "Results file (appended).")
# internal: one side's measurement, run in a process of its own
flags.DEFINE_enum("side", None, ["save", "jaxinfer", "transformers"], "(internal)")
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
  dtype = None if FLAGS.dtype == "auto" else FLAGS.dtype
  if FLAGS.model.startswith("preset:"):
    cfg = PRESETS[FLAGS.model.split(":", 1)[1]]
    cfg = dataclasses.replace(cfg, dtype=dtype or cfg.dtype)
    params = M.init_params(cfg, jax.random.key(0))
  else:
    cfg, params, _ = checkpoint.load_model(str(checkpoint.resolve_model_dir(FLAGS.model)), dtype)
  cfg = dataclasses.replace(cfg, eos_token_ids=())
  checkpoint.save_hf(workdir / "model", cfg, params)
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


def _side(side: str, workdir: Path, b: int = 0) -> dict:
  cmd = [sys.executable, __file__, f"--side={side}", f"--workdir={workdir}", f"--batch={b}"]
  cmd += [f"--{f}={getattr(FLAGS, f)}" for f in ("model", "dtype", "prompt_len", "new_tokens",
                                                  "hf_cache", "chunk_lanes")]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{side} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.side:
    workdir = Path(FLAGS.workdir)
    if FLAGS.side == "save":
      return save_side(workdir)
    info = json.loads((workdir / "info.json").read_text())
    side = jaxinfer_side if FLAGS.side == "jaxinfer" else transformers_side
    return side(workdir, FLAGS.batch, info)
    return
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
