"""Global prefix sharing (BatchLLM) against LRU prefix caching, same engine, same run.

  python experiments/bench_prefix_order.py                 # embedded model, 16 headers x 8

The workload: --headers distinct headers (real stdlib source, as system prompts or few-shot
examples would be), each shared by --per_header requests with a distinct tail of varied length,
arriving interleaved in random order. The continuous engine runs it twice through
`jaxinfer generate`'s own job code, with the same slots and KV pool:
  - order=prefix: the whole input sorted by prompt, so each header's sharers run together and
    its pages are computed once (BatchLLM's global prefix identification and scheduling);
  - order=arrival: input order; a header is reused only while the pool's LRU prefix cache still
    holds its pages (vLLM's automatic prefix caching).
Reported: generation tokens/s (compilation excluded), prompt tokens computed and saved, and
their ratios; the two alternate --repeats times in one process and the median ratio is the
headline. Results are appended to experiments/results/bench_prefix_order.jsonl.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
from absl import app, flags
from alternating_jobs import identical, median_run, ratios, run_alternating

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "Model (as --model of jaxinfer generate).")
flags.DEFINE_integer("headers", 16, "Distinct shared headers.")
flags.DEFINE_integer("per_header", 8, "Requests sharing each header.")
flags.DEFINE_integer("header_tokens", 256, "Tokens per header.")
flags.DEFINE_integer("mean_tail", 32, "Mean length of each prompt's own tail (tokens).")
flags.DEFINE_integer("max_new_min", 8, "Fewest new tokens asked for.")
flags.DEFINE_integer("max_new_max", 48, "Most new tokens asked for.")
flags.DEFINE_integer("batch_size", 8, "Engine slots.")
flags.DEFINE_integer("kv_pages", None, "KV pool pages (default: the engine's, 1.5 x slots x the "
                     "longest request).")
flags.DEFINE_integer("repeats", 3, "Alternating prefix/arrival runs; the median ratio is "
                     "reported.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_prefix_order.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS

ORDERS = ("prefix", "arrival")
KEPT = ("generation_tokens_per_second", "end_to_end_tokens_per_second", "completion_tokens",
        "prefill_tokens_computed", "prefill_tokens_saved", "kv_pages_used_peak", "kv_pages_pool",
        "wall_seconds", "compile_seconds")


def workload(tokenizer, vocab_size: int, rng) -> list[dict]:
  """--headers headers of real source, --per_header requests each, shuffled."""
  from jaxinfer import embedded
  text = "".join(embedded.read_text(f) for f in embedded.stdlib_files(embedded.Recipe())[1][:24])
  ids = tokenizer.encode(text) if tokenizer is not None else list(rng.randint(1, vocab_size,
                                                                              200000))
  h, n = FLAGS.header_tokens, FLAGS.headers * FLAGS.per_header
  headers = [ids[i * h:(i + 1) * h] for i in range(FLAGS.headers)]
  pool = ids[FLAGS.headers * h:]
  tails = rng.randint(max(1, FLAGS.mean_tail // 2), FLAGS.mean_tail * 3 // 2 + 1, n)
  owner = rng.permutation(np.repeat(np.arange(FLAGS.headers), FLAGS.per_header))
  records, pos = [], 0
  for i, (t, o) in enumerate(zip(tails, owner)):
    records.append({"id": i, "prompt_ids": headers[o] + pool[pos:pos + t],
                    "max_new_tokens": int(rng.randint(FLAGS.max_new_min, FLAGS.max_new_max + 1))})
    pos = (pos + t) % (len(pool) - 200)
  return records


def main(argv):
  del argv
  import jax

  from jaxinfer import checkpoint

  model_dir = checkpoint.resolve_model_dir(FLAGS.model)
  cfg, _, tok = checkpoint.load_model(str(model_dir))
  records = workload(tok, cfg.vocab_size, np.random.RandomState(0))
  row = {"model": FLAGS.model, "headers": FLAGS.headers, "per_header": FLAGS.per_header,
         "header_tokens": FLAGS.header_tokens, "num_prompts": len(records),
         "prompt_tokens": sum(len(r["prompt_ids"]) for r in records),
         "batch_size": FLAGS.batch_size, "kv_pages": FLAGS.kv_pages, "repeats": FLAGS.repeats,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": datetime.date.today().isoformat()}
  settings = {order: dict(batch_size=FLAGS.batch_size, mesh="data:1", order=order,
                          kv_pages=FLAGS.kv_pages) for order in ORDERS}
  outputs, runs = run_alternating(records, str(model_dir), settings, FLAGS.repeats, KEPT)
  row["identical_completions"] = identical(outputs, "prefix", "arrival")
  for order, rs in runs.items():
    row[order] = median_run(rs)
  row["speedup_per_repeat"] = ratios(runs, "prefix", "arrival", "generation_tokens_per_second")
  row["speedup"] = float(np.median(row["speedup_per_repeat"]))
  row["prefill_computed_ratio"] = round(row["arrival"]["prefill_tokens_computed"]
                                        / row["prefix"]["prefill_tokens_computed"], 2)
  print(json.dumps(row, indent=2))
  output.append_jsonl(FLAGS.results, [row])


if __name__ == "__main__":
  app.run(main)
