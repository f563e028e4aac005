"""Decode throughput, achieved bandwidth and compile time at batch 1 and 8.

  python experiments/bench_decode.py                       # embedded model (CPU default)
  python experiments/bench_decode.py --model=preset:llama3-8b --batch_sizes=1   # GPU
  python experiments/bench_decode.py --model=preset:llama3-8b --batch_sizes=1 \
      --quantize=none,int8,int4:g128    # quantized weights against the model's dtype, one run

Achieved bandwidth = bytes a decode step must read (all weights + the KV cache slots the step
attends over) / step time, reported against the device's measured ceiling (roofline.py), all in
the same run. Results are appended to experiments/results/bench_decode.jsonl.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "'embedded', a model directory, or preset:NAME "
                    "(random weights, e.g. preset:llama3-8b).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
flags.DEFINE_integer("new_tokens", 128, "Decode steps measured per batch size.")
flags.DEFINE_string("dtype", "auto", "auto, float32 or bfloat16.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
flags.DEFINE_list("quantize", ["none"], "Weight formats to measure in turn (none: the model's "
                  "dtype; int8, int4:g128, ... as jaxinfer quantize --format); with none "
                  "first, each other row reports its speed against it.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_decode.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS


def load(name: str, dtype: str | None):
  import jax

  from jaxinfer import checkpoint
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  if name.startswith("preset:"):
    cfg = PRESETS[name.split(":", 1)[1]]
    if dtype:
      cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, M.init_params(cfg, jax.random.key(0))
  cfg, params, _ = checkpoint.load_model(name, dtype)
  return cfg, params


def quantized(cfg, params, fmt: str):
  """params with their attention and MLP weights in `fmt` (none: as they are)."""
  if fmt == "none":
    return params
  from jaxinfer import quant
  from jaxinfer.train import qat
  return qat.served(cfg, params, quant.QuantFormat.parse(fmt))


def measure(cfg, params, fmt: str, ceilings) -> list[dict]:
  """One row per batch size: the median decode step over FLAGS.repeats runs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer.generation import Generator, RowRequest, next_pow2
  from jaxinfer.sampling import request_key
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  rows_out = []
  for b in map(int, FLAGS.batch_sizes):
    gen = Generator(cfg, params, steps_per_sync=FLAGS.new_tokens)
    rng = np.random.RandomState(0)
    rows = [RowRequest(rng.randint(0, cfg.vocab_size, FLAGS.prompt_len).tolist(),
                       FLAGS.new_tokens, request_key(0, i)) for i in range(b)]
    gen.generate(rows)  # compile
    compile_s = gen.timings.compile_s
    decode_times = []
    for _ in range(FLAGS.repeats):
      before = gen.timings.decode_s
      out = gen.generate(rows)
      decode_times.append(gen.timings.decode_s - before)
    assert all(len(r.tokens) == FLAGS.new_tokens for r in out)
    step_s = float(np.median(decode_times)) / (FLAGS.new_tokens - 1)
    # The cache is allocated to the power-of-two bucket of prompt + new tokens, and a decode step
    # reads every slot of it (masked or not).
    slots = next_pow2(FLAGS.prompt_len, 16) + next_pow2(FLAGS.new_tokens, 16)
    kv_bytes = 2 * cfg.num_layers * b * slots * cfg.kv_heads * cfg.head_dim * jnp.dtype(
        cfg.jnp_dtype).itemsize
    gbps = (weight_bytes + kv_bytes) / step_s / 1e9
    row = {
        "model": FLAGS.model, "dtype": cfg.dtype, "weights": fmt, "params": cfg.num_params(),
        "batch": b, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
        "decode_tokens_per_second": round(b / step_s, 1),
        "step_ms": round(step_s * 1e3, 3),
        "bytes_per_step": int(weight_bytes + kv_bytes),
        "achieved_gbps": round(gbps, 1),
        "fraction_of_measured_bandwidth": round(gbps / ceilings.bandwidth_gbps, 3),
        "compile_seconds": round(compile_s, 2),
        "ceilings": ceilings.as_dict(),
        "device": ceilings.device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    rows_out.append(row)
    print(f"{fmt} batch {b:>3}: {row['decode_tokens_per_second']:>9.1f} tok/s  step "
          f"{row['step_ms']:.2f} ms  {gbps:.1f} GB/s ({row['fraction_of_measured_bandwidth']:.0%} "
          f"of measured)  compile {compile_s:.1f}s", file=sys.stderr)
  return rows_out


def main(argv):
  del argv
  from jaxinfer.roofline import measure_ceilings

  cfg, params = load(FLAGS.model, None if FLAGS.dtype == "auto" else FLAGS.dtype)
  cfg = dataclasses.replace(cfg, eos_token_ids=())  # every sequence decodes the full length
  ceilings = measure_ceilings(matmul_dtype=cfg.jnp_dtype)
  print(f"device: {ceilings.device_kind} ({ceilings.backend}); measured {ceilings.bandwidth_gbps} "
        f"GB/s, {ceilings.matmul_tflops} TFLOP/s {ceilings.matmul_dtype}", file=sys.stderr)
  base = {}  # batch -> the unquantized step's ms (when "none" was measured first)
  for fmt in FLAGS.quantize:  # each format's rows written when measured (a timeout keeps them)
    rows_out = measure(cfg, quantized(cfg, params, fmt), fmt, ceilings)
    for row in rows_out:
      if fmt == "none":
        base[row["batch"]] = row["step_ms"]
      elif row["batch"] in base:
        row["speedup_vs_unquantized"] = round(base[row["batch"]] / row["step_ms"], 3)
        print(f"{fmt} batch {row['batch']}: {row['speedup_vs_unquantized']:.2f}x the "
              f"unquantized step", file=sys.stderr)
    output.append_jsonl(FLAGS.results, rows_out)


if __name__ == "__main__":
  app.run(main)
