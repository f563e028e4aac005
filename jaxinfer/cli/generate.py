"""jaxinfer generate: batch generation over a JSONL file of prompts."""

from __future__ import annotations

import json
import sys

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import apply_platform_flags, define_model_flags

define_model_flags()
flags.DEFINE_string("prompts", None, "Input JSONL: {id, prompt | prompt_ids, [max_new_tokens, "
                    "temperature, top_k, top_p, min_p, stop, metadata]} per line.")
flags.DEFINE_string("output", None, "Output JSONL: one record per input line.")
flags.DEFINE_integer("max_new_tokens", 128, "Default tokens to generate per request.",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Default sampling temperature; 0 is greedy.",
                   lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Default top-k filter; 0 disables.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Default nucleus (top-p) filter in (0, 1]; 1 disables.")
flags.DEFINE_float("min_p", 0.0, "Default min-p filter in [0, 1]; 0 disables.", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_multi_string("stop", [], "Default stop string (repeatable).")
flags.DEFINE_integer("seed", 0, "Run seed; each request's sampling key derives from it and the "
                     "request id.")
flags.DEFINE_integer("batch_size", 8, "Sequences generated together.", lower_bound=1)
flags.DEFINE_string("metrics_output", None, "Write run metrics (JSON) here.")
flags.DEFINE_enum("implementation", "xla", ["xla", "pallas"], "Attention: xla (reference) or "
                  "pallas (block-sparse prefill and paged decode kernels; interpreted on CPU).")
flags.DEFINE_string("sparsity", "dense", "Long-prompt attention: dense, sinks_window:SINKS,WINDOW, "
                    "block_topk:TOPK[,BLOCK] or vertical_slash:V,S[,BLOCK] (see README).")
flags.DEFINE_integer("max_seq_len", None, "Override the model's context length (prompt + output), "
                     "e.g. for long prompts under sinks_window sparsity.", lower_bound=2)
flags.DEFINE_integer("steps_per_sync", 32, "Decode steps per host round trip.", lower_bound=1)
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.mark_flags_as_required(["prompts", "output"])
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, "--top_p must be in (0, 1]")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  apply_platform_flags()
  from jaxinfer.requests import Defaults
  from jaxinfer.runner import GenerateJob, UserError, run

  job = GenerateJob(
      prompts=FLAGS.prompts, output=FLAGS.output, model=FLAGS.model,
      defaults=Defaults(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
                        stop=tuple(FLAGS.stop)),
      seed=FLAGS.seed, dtype=FLAGS.dtype, mesh=FLAGS.mesh, batch_size=FLAGS.batch_size,
      metrics_output=FLAGS.metrics_output, implementation=FLAGS.implementation,
      sparsity=FLAGS.sparsity, max_seq_len=FLAGS.max_seq_len,
      steps_per_sync=FLAGS.steps_per_sync, cache_dir=FLAGS.cache_dir, progress=FLAGS.progress)
  try:
    metrics = run(job)
  except (UserError, FileNotFoundError) as e:
    fail(str(e))
  print(json.dumps({k: metrics[k] for k in ("num_requests", "num_failed", "tokens_per_second",
                                            "prefill_tokens_per_second",
                                            "decode_tokens_per_second")}), file=sys.stderr)
  if metrics["num_failed"]:
    print(f"{metrics['num_failed']} of {metrics['num_requests']} requests failed; see their "
          f"'error' records in {FLAGS.output}", file=sys.stderr)
    sys.exit(1)
