"""jaxinfer generate: batch generation over a JSONL file of prompts."""

from __future__ import annotations

import json
import sys

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import (apply_platform_flags, define_implementation_flag,
                                 define_model_flags)

define_model_flags()
flags.DEFINE_string("prompts", None, "Input JSONL: {id, prompt | prompt_ids | messages, "
                    "[max_new_tokens, temperature, top_k, top_p, min_p, stop, metadata]} per "
                    "line.")
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
flags.DEFINE_integer("batch_size", 8, "Sequences decoded together: slots per replica.",
                     lower_bound=1)
flags.DEFINE_enum("scheduler", "continuous", ["continuous", "static"],
                  "How the paged engine fills its slots: continuous refills a slot as soon as "
                  "its sequence ends; static admits --batch_size requests at a time and the "
                  "next ones once all have ended (static batching, for comparison).")
flags.DEFINE_enum("order", "prefix", ["prefix", "arrival"],
                  "prefix sorts the whole input by prompt, so requests "
                  "sharing a prefix run together (global prefix sharing); arrival keeps input "
                  "order, prefixes shared while the pool's LRU cache still holds them.")
flags.DEFINE_integer("num_samples", 1, "Completions per prompt (sharing the prompt's KV; under "
                     "a dynamic --sparsity its last partial page is copied).",
                     lower_bound=1)
flags.DEFINE_integer("chunk_size", 32, "Prompt tokens per prefill lane per step (a dynamic "
                     "--sparsity prefills each prompt whole instead).", lower_bound=1)
flags.DEFINE_integer("chunk_lanes", 4, "Prefill lanes per step (one prompt per lane; a prompt "
                     "may fill several; a dynamic --sparsity: one lane).", lower_bound=1)
flags.DEFINE_integer("decode_steps", 8, "Most decode steps run in one dispatch between prefill "
                     "steps.", lower_bound=1)
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
flags.DEFINE_string("kv_cache_dtype", None, "int8: keep the engine's KV pages in int8, one float32 "
                    "scale per token and kv head beside them (about half a bfloat16 cache; the "
                    "kernels read them directly). Unset: the model's dtype.")
flags.DEFINE_integer("kv_pages", None, "KV pool size in pages per replica (default: 1.5 x slots x "
                     "the longest request).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Start over instead of resuming from --output.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.",
                     lower_bound=0)
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the environment (TPU "
                  "pods, SLURM) instead of --coordinator_address, --num_processes and "
                  "--process_id.")
flags.DEFINE_string("metrics_output", None, "Write run metrics (JSON) here.")
define_implementation_flag()
flags.DEFINE_string("sparsity", "dense", "Long-prompt attention: dense, sinks_window:SINKS,WINDOW, "
                    "block_topk:TOPK[,BLOCK] or vertical_slash:V,S[,BLOCK] (see docs/kernels.md).")
flags.DEFINE_integer("max_seq_len", None, "Override the model's context length (prompt + output), "
                     "e.g. for long prompts under sinks_window sparsity.", lower_bound=2)
flags.DEFINE_enum("speculative", "none",
                  ["none", "ngram", "lookahead", "recycling", "draft", "layerskip", "medusa",
                   "hydra", "eagle"],
                  "Speculative decoding proposer (inside the paged engine: draft trees verified "
                  "beside prompt lanes): prompt lookup (a chain), a Lookahead-style trie over "
                  "prompt and output (a tree), Token Recycling, a separate draft model, the model "
                  "itself with layers skipped, Medusa or Hydra heads, or an EAGLE draft layer "
                  "(--draft_heads).")
flags.DEFINE_string("draft_heads", None, "Medusa or Hydra heads, or an EAGLE draft layer, "
                    "written by jaxinfer train-draft.")
flags.DEFINE_string("draft_model", None, "Draft model for --speculative=draft (same vocabulary).")
flags.DEFINE_integer("num_draft_tokens", 4, "Drafted tokens per step (chain proposers: ngram, "
                     "draft, layerskip, eagle); the trie's depth for lookahead.",
                     lower_bound=1)
flags.DEFINE_string("tree", "4,2,1,1", "Token Recycling's draft tree: children per node at each "
                    "depth. With --speculative=eagle: dynamic (EAGLE-2 trees of 16 nodes, top-4 "
                    "children, 5 deep) or dynamic:NODES,TOPK,DEPTH; otherwise EAGLE drafts a "
                    "chain of --num_draft_tokens. With --speculative=medusa|hydra: nodes:N "
                    "re-grows the heads' static tree with N nodes from their measured "
                    "accuracies (default: the tree they were trained with). With "
                    "--speculative=lookahead: nodes:N, the trie's size (default 16).")
flags.DEFINE_float("draft_fallback", 0.0, "--speculative=draft|layerskip: Big-Little's fallback "
                   "policy — a row stops drafting after a draft the draft model is less than "
                   "this sure of (its top probability); 0 drafts the whole chain.")
flags.DEFINE_string("draft_layers", None, "--speculative=layerskip: comma-separated layers the "
                    "draft keeps (default: the first half).")
flags.DEFINE_enum("acceptance", "exact", ["exact", "typical"], "exact: lossless rejection "
                  "sampling (greedy = plain greedy); typical: Medusa's typical acceptance (lossy).")
flags.DEFINE_enum("speculation", "auto", ["auto", "always"], "auto: each dispatch "
                  "speculates with the proposer's tree or a smaller one, or decodes plainly, "
                  "whichever measured fastest (speculation that stops paying shrinks its trees or "
                  "turns itself off); always: the proposer's tree every dispatch (sampled outputs "
                  "then do not depend on measured speed).")
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
      sparsity=FLAGS.sparsity, max_seq_len=FLAGS.max_seq_len, scheduler=FLAGS.scheduler,
      order=FLAGS.order,
      num_samples=FLAGS.num_samples, chunk_size=FLAGS.chunk_size, chunk_lanes=FLAGS.chunk_lanes,
      decode_steps=FLAGS.decode_steps,
      page_size=FLAGS.page_size, kv_pages=FLAGS.kv_pages, kv_cache_dtype=FLAGS.kv_cache_dtype,
      overwrite=FLAGS.overwrite,
      cache_dir=FLAGS.cache_dir, progress=FLAGS.progress,
      speculative=FLAGS.speculative, draft_model=FLAGS.draft_model,
      draft_heads=FLAGS.draft_heads,
      num_draft_tokens=FLAGS.num_draft_tokens, tree=FLAGS.tree, draft_layers=FLAGS.draft_layers,
      draft_fallback=FLAGS.draft_fallback, acceptance=FLAGS.acceptance,
      speculation=FLAGS.speculation)
  try:
    metrics = run(job, coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                  distributed=FLAGS.distributed)
  except (UserError, FileNotFoundError) as e:
    fail(str(e))
  # end to end: what the user waited for (compilation included); generation: the same without
  # compilation; tokens_per_second: the device steps alone
  keys = ("num_requests", "num_failed", "end_to_end_tokens_per_second",
          "generation_tokens_per_second", "tokens_per_second", "prefill_tokens_per_second",
          "decode_tokens_per_second", "compile_seconds", "mean_accepted_tokens", "speculation")
  print(json.dumps({k: metrics[k] for k in keys if k in metrics}), file=sys.stderr)
  if metrics["num_failed"]:
    print(f"{metrics['num_failed']} of {metrics['num_requests']} requests failed; see their "
          f"'error' records in {FLAGS.output}", file=sys.stderr)
    sys.exit(1)
