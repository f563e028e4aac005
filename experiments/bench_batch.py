"""Static batching vs continuous batching in the paged engine, same workload, same run.

  python experiments/bench_batch.py                       # embedded model, 512 prompts

The workload: --num_prompts prompts made of one shared header (about --shared_fraction of all
prompt tokens; real stdlib source, as a system prompt would be) plus a distinct tail of varied
length, each asking for a varied number of new tokens (greedy). Both schedulers run it through
`jaxinfer generate`'s own job code with the same slot count: `--scheduler=static` admits
--batch_size requests at a time and the next ones once all have ended (records before
2026-12-05 ran padded static batches instead, each prompt prefilled whole in a dense cache, no
prefix shared: `static_mode`); reported: generation tokens/s
(wall time of generation, host work included, compilation excluded; compilation reported
separately and in a second ratio), their ratio, prefill tokens saved, slot occupancy. The two
alternate --repeats times in one process (timings on a shared CPU drift by 10-20% between runs);
the median ratio is the headline. Results are appended to experiments/results/bench_batch.jsonl.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from absl import app, flags
from alternating_jobs import identical, median_run, ratios, run_alternating

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "Model (as --model of jaxinfer generate).")
flags.DEFINE_integer("num_prompts", 512, "Prompts in the workload.")
flags.DEFINE_float("shared_fraction", 0.7, "Shared header's share of all prompt tokens.")
flags.DEFINE_integer("mean_tail", 48, "Mean length of each prompt's own tail (tokens).")
flags.DEFINE_integer("max_new_min", 8, "Fewest new tokens asked for.")
flags.DEFINE_integer("max_new_max", 96, "Most new tokens asked for.")
flags.DEFINE_integer("batch_size", 16, "Slots (engine) = batch size (static).")
flags.DEFINE_integer("chunk_size", 32, "Engine prefill lane length.")
flags.DEFINE_integer("chunk_lanes", 4, "Engine prefill lanes per step.")
flags.DEFINE_string("mesh", "data:1", "Mesh for both schedulers.")
flags.DEFINE_integer("repeats", 3, "Alternating static/engine runs; the median ratio is reported.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_batch.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS

KEPT = ("generation_tokens_per_second", "end_to_end_tokens_per_second", "completion_tokens",
        "prefill_tokens_computed", "prefill_tokens_saved", "mean_slot_occupancy", "wall_seconds",
        "compile_seconds", "compilations", "steps", "dispatches")


def workload(tokenizer, vocab_size: int, rng) -> list[dict]:
  """Prompts as token ids: a shared header from real source text, plus varied tails."""
  from jaxinfer import embedded
  text = "".join(embedded.read_text(f) for f in embedded.stdlib_files(embedded.Recipe())[1][:8])
  ids = tokenizer.encode(text) if tokenizer is not None else list(rng.randint(1, vocab_size, 100000))
  tails = rng.randint(max(1, FLAGS.mean_tail // 4), FLAGS.mean_tail * 7 // 4 + 1, FLAGS.num_prompts)
  shared_len = int(round(FLAGS.shared_fraction / (1 - FLAGS.shared_fraction) * tails.mean()))
  header = ids[:shared_len]
  records, pos = [], shared_len
  for i, t in enumerate(tails):
    tail = ids[pos:pos + t]
    pos = (pos + t) % (len(ids) - 200) + shared_len
    records.append({"id": i, "prompt_ids": header + tail,
                    "max_new_tokens": int(rng.randint(FLAGS.max_new_min, FLAGS.max_new_max + 1))})
  return records


def main(argv):
  del argv
  import jax
  import numpy as np

  from jaxinfer import checkpoint

  model_dir = checkpoint.resolve_model_dir(FLAGS.model)
  cfg, _, tok = checkpoint.load_model(str(model_dir))
  records = workload(tok, cfg.vocab_size, np.random.RandomState(0))
  prompt_tokens = sum(len(r["prompt_ids"]) for r in records)
  row = {"model": FLAGS.model, "num_prompts": len(records), "prompt_tokens": prompt_tokens,
         "batch_size": FLAGS.batch_size, "chunk_size": FLAGS.chunk_size,
         "chunk_lanes": FLAGS.chunk_lanes, "device": jax.devices()[0].device_kind,
         "jax": jax.__version__, "date": datetime.date.today().isoformat(),
         "static_mode": "engine waves"}
  settings = {scheduler: dict(batch_size=FLAGS.batch_size, mesh=FLAGS.mesh, scheduler=scheduler,
                              chunk_size=FLAGS.chunk_size, chunk_lanes=FLAGS.chunk_lanes)
              for scheduler in ("static", "continuous")}
  outputs, runs = run_alternating(records, str(model_dir), settings, FLAGS.repeats, KEPT)
  row["identical_completions"] = identical(outputs, "static", "continuous")
  row["shared_prefix_fraction_of_prompt_tokens"] = round(
      len(records) * _common_prefix(records) / prompt_tokens, 3)
  for scheduler, rs in runs.items():
    row[scheduler] = median_run(rs)
  # compilation excluded
  row["speedup_per_repeat"] = ratios(runs, "continuous", "static", "generation_tokens_per_second")
  row["speedup"] = float(np.median(row["speedup_per_repeat"]))
  row["speedup_including_compilation"] = float(np.median(
      ratios(runs, "continuous", "static", "end_to_end_tokens_per_second")))
  print(json.dumps(row, indent=2))
  output.append_jsonl(FLAGS.results, [row])


def _common_prefix(records) -> int:
  first = records[0]["prompt_ids"]
  n = min(len(r["prompt_ids"]) for r in records)
  for i in range(n):
    if any(r["prompt_ids"][i] != first[i] for r in records):
      return i
  return n


if __name__ == "__main__":
  app.run(main)
