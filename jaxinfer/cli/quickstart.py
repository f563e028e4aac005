"""jaxinfer quickstart: build the embedded model if missing, then batch-generate over the
bundled prompts and print throughput and sample completions."""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

from absl import flags

from jaxinfer.cli import fail, no_positional_args

flags.DEFINE_string("output_dir", "jaxinfer_quickstart", "Where completions and metrics go.")
flags.DEFINE_string("cache_dir", None, "Embedded model cache (default $JAXINFER_CACHE or "
                    "~/.cache/jaxinfer).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Sequences generated together.", lower_bound=1)
flags.DEFINE_integer("show", 3, "Completions to print.", lower_bound=0)
flags.DEFINE_enum("recipe", "default", ["default", "smoke"], "Embedded model recipe; smoke builds "
                  "a throwaway model in seconds (for testing the pipeline).")
FLAGS = flags.FLAGS


def prompts_path() -> Path:
  return Path(str(resources.files("jaxinfer") / "data" / "quickstart_prompts.jsonl"))


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  from jaxinfer import embedded
  from jaxinfer.runner import GenerateJob, UserError, run
  from jaxinfer.requests import Defaults

  t0 = time.perf_counter()
  out_dir = Path(FLAGS.output_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    fail(f"--output_dir: cannot create {out_dir}: {e.strerror}")
  recipe = embedded.RECIPES[FLAGS.recipe]
  cached = embedded.is_built(FLAGS.cache_dir, recipe)
  print(f"== embedded model ({'cached' if cached else 'building: a few minutes on 2 CPU cores'})",
        flush=True)
  model_dir = embedded.ensure(FLAGS.cache_dir, recipe)
  report = json.loads((model_dir / "report.json").read_text())
  print(f"   {model_dir}")
  print(f"   {report['parameters'] / 1e6:.1f}M parameters, trained on the Python "
        f"{report['python']} standard library; held-out loss "
        f"{report['heldout_loss_nats_per_token']:.3f} nats/token "
        f"({report['heldout_bits_per_char']:.3f} bits/char, perplexity "
        f"{report['heldout_perplexity']})")

  print("== batch generation over the bundled prompts", flush=True)
  job = GenerateJob(prompts=str(prompts_path()), output=str(out_dir / "completions.jsonl"),
                    model=str(model_dir), defaults=Defaults(max_new_tokens=FLAGS.max_new_tokens),
                    batch_size=FLAGS.batch_size, metrics_output=str(out_dir / "metrics.json"),
                    progress=False, overwrite=True)
  try:
    m = run(job)
  except UserError as e:
    fail(str(e))
  print(f"   {m['num_completed']} requests, {m['completion_tokens']} tokens: "
        f"{m['tokens_per_second']:.0f} tok/s overall, prefill {m['prefill_tokens_per_second']:.0f} "
        f"tok/s, decode {m['decode_tokens_per_second']:.0f} tok/s on {m['backend']} "
        f"(compile {m['compile_seconds']:.1f}s)")
  print(f"   prefix sharing saved {m['prefill_tokens_saved']} of "
        f"{m['prefill_tokens_saved'] + m['prefill_tokens_computed']} prompt tokens; mean slot "
        f"occupancy {m['mean_slot_occupancy']:.2f}; peak KV pages {m['kv_pages_used_peak']} of "
        f"{m['kv_pages_pool']}")
  records = [json.loads(l) for l in (out_dir / "completions.jsonl").read_text().splitlines()]
  prompts = {json.loads(l)["id"]: json.loads(l)["prompt"]
             for l in prompts_path().read_text().splitlines()}
  for rec in sorted(records, key=lambda r: r["line"])[:FLAGS.show]:
    print(f"\n--- {rec['id']} ({rec['finish_reason']}) ---")
    print(prompts[rec["id"]] + rec["completion"])
  print(f"\n== done in {time.perf_counter() - t0:.0f}s; outputs in {out_dir}/")
  if m["num_failed"]:
    sys.exit(1)
