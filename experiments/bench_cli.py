"""`jaxinfer generate` end to end, as a user runs it: each mode its own process, the same prompts.

  python experiments/bench_cli.py                       # batch 1: plain, ngram auto, ngram always
  python experiments/bench_cli.py --batch_size=8 --rounds=3

Prompts: bench_speculative's, one --prompt_tokens window (the middle of the file) from each of
--num_prompts distinct held-out standard-library files, --max_new_tokens each (greedy). Each
round runs every mode once, one after the other: plain decoding (no --speculative), then
`--speculative=METHOD --speculation=auto|always`. A mode's time is the wall time of its whole
process (start-up, model load, compilation with the persistent compilation cache as the earlier
runs left it, generation, output); the first round warms that cache and is left out of the
medians. Speedup: plain's wall time over the mode's, per round, then the median. Also each
process's own metrics (compile_seconds, generation tokens/s, the policy's summary). Records are
appended to experiments/results/bench_cli.jsonl, one per mode.
"""

from __future__ import annotations

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

flags.DEFINE_integer("batch_size", 1, "--batch_size of every run.")
flags.DEFINE_integer("num_prompts", 32, "Prompts, each from a distinct held-out file.")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length (tokens of held-out source).")
flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per prompt (greedy).")
flags.DEFINE_string("speculative", "ngram", "--speculative of the speculating modes.")
flags.DEFINE_list("policies", ["auto", "always"], "--speculation of the speculating modes.")
flags.DEFINE_integer("rounds", 5, "Rounds (the first warms the compilation cache: not counted).")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_cli.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS

METRICS = ("compile_seconds", "generation_tokens_per_second", "end_to_end_tokens_per_second",
           "speculation", "speculative_batches", "plain_batches", "mean_accepted_tokens")


def _write_prompts(path: Path) -> None:
  from jaxinfer import checkpoint
  from jaxinfer.embedded import heldout_file_windows
  _, _, tok = checkpoint.load_model(str(checkpoint.resolve_model_dir("embedded")), quiet=True)
  windows = heldout_file_windows(tok, FLAGS.num_prompts, FLAGS.prompt_tokens)
  path.write_text("".join(json.dumps({"id": i, "prompt_ids": [int(t) for t in w],
                                      "max_new_tokens": FLAGS.max_new_tokens}) + "\n"
                          for i, w in enumerate(windows)))


def _run(d: Path, mode: str, flags_: list[str]) -> tuple[float, dict, dict]:
  """(wall seconds, metrics, {id: completion ids}) of one `jaxinfer generate` process."""
  out, metrics = d / f"{mode}.jsonl", d / f"{mode}.metrics.json"
  cmd = [sys.executable, "-m", "jaxinfer", "generate", "--model=embedded",
         f"--prompts={d / 'prompts.jsonl'}", f"--output={out}", f"--metrics_output={metrics}",
         f"--batch_size={FLAGS.batch_size}", "--overwrite", "--progress=false"] + flags_
  t0 = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if done.returncode:
    raise RuntimeError(f"{mode}: exit {done.returncode}\n{done.stderr[-2000:]}")
  records = [json.loads(line) for line in out.read_text().splitlines()]
  return wall, json.loads(metrics.read_text()), {r["id"]: r["completion_ids"] for r in records}


def main(argv):
  del argv
  import jax
  import numpy as np

  modes = {"plain": []} | {f"{FLAGS.speculative} {p}": [f"--speculative={FLAGS.speculative}",
                                                       f"--speculation={p}"]
                           for p in FLAGS.policies}
  runs = {m: [] for m in modes}
  with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp)
    _write_prompts(d / "prompts.jsonl")
    for r in range(FLAGS.rounds):
      for mode, extra in modes.items():
        runs[mode].append(_run(d, mode, extra))
        print(f"  round {r + 1} {mode}: {runs[mode][-1][0]:.2f} s", file=sys.stderr, flush=True)
  counted = slice(1, None) if FLAGS.rounds > 1 else slice(None)
  plain = [w for w, _, _ in runs["plain"][counted]]
  reference = runs["plain"][-1][2]
  rows = []
  for mode, results in runs.items():
    walls = [w for w, _, _ in results[counted]]
    ratios = [p / w for p, w in zip(plain, walls)]
    last = results[-1][1]
    rows.append({
        "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "cpu_threads": os.cpu_count(), "model": "embedded",
        "batch_size": FLAGS.batch_size, "num_prompts": FLAGS.num_prompts,
        "prompt_tokens": FLAGS.prompt_tokens, "max_new_tokens": FLAGS.max_new_tokens,
        "rounds": FLAGS.rounds, "mode": mode,
        "wall_seconds_median": round(float(np.median(walls)), 3),
        "wall_seconds_per_round": [round(w, 3) for w, _, _ in results],
        "speedup_end_to_end": round(float(np.median(ratios)), 3),
        "speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "identical_to_plain": f"{sum(results[-1][2][i] == reference[i] for i in reference)}/"
                              f"{len(reference)}",
        "load_average_1m": round(os.getloadavg()[0], 2)} | {k: last.get(k) for k in METRICS})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  output.append_jsonl(FLAGS.results, rows)


if __name__ == "__main__":
  app.run(main)
