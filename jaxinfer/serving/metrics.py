"""What one generation call measured, as the flat metrics dict `jaxinfer generate` writes
(--metrics_output) and `jaxinfer.LLM.metrics` holds."""

from __future__ import annotations

import jax

from jaxinfer.options import ServeOptions
from jaxinfer.sharding import format_mesh, parse_mesh

# a speculating engine's own numbers, passed through when present
SPECULATIVE_KEYS = ("mean_accepted_tokens", "accepted_length_histogram", "per_depth_acceptance",
                    "verify_steps", "nodes_per_verification", "host_syncs",
                    "speculation", "speculative_batches", "plain_batches", "tree_sizes")


def generation_metrics(stats: dict, *, compiled: tuple[float, int, int], completion_tokens: int,
                       prompt_tokens: int, seconds: float, opts: ServeOptions, dtype: str,
                       sparsity) -> dict:
  """`stats`: a backend's (`jaxinfer.serving.backends`); `compiled`: (seconds, compilations,
  of them loaded from the persistent cache) of every compilation in the call
  (`compilation_cache.CompileClock`), the backend's compiled steps and anything outside them;
  `seconds`: the call's wall time."""
  busy = stats["busy_s"]
  compile_s = max(stats["compile_s"], compiled[0])
  metrics = {
      "prompt_tokens": prompt_tokens,
      "completion_tokens": completion_tokens,
      "tokens_per_second": round(completion_tokens / busy, 2) if busy else 0.0,
      "prefill_tokens_per_second": stats["prefill_tps"],
      "decode_tokens_per_second": stats["decode_tps"],
      # what a user waited for, compilation included
      "end_to_end_tokens_per_second": round(completion_tokens / max(seconds, 1e-9), 2),
      # wall time of generation minus compilation: host scheduling included
      "generation_tokens_per_second": round(
          completion_tokens / max(seconds - compile_s, 1e-9), 2),
      "prefill_tokens_computed": stats["prefill_tokens"],
      "prefill_tokens_saved": stats.get("prefill_saved", 0),
      "mean_slot_occupancy": stats.get("occupancy", 1.0),
      "kv_pages_used_peak": stats.get("peak_pages"),
      "kv_pages_pool": stats.get("pool_pages"),
      "steps": stats["steps"],
      "dispatches": stats.get("dispatches"),
      "decode_tokens_discarded": stats.get("decode_tokens_discarded"),
      "compile_seconds": round(compile_s, 3),  # every compilation of the call
      "compilations": stats["compilations"],  # of the compiled steps
      # anything else that compiled (small eager operations outside the steps)
      "other_compilations": max(0, compiled[1] - stats["compilations"]),
      # of all these, how many the persistent compilation cache supplied
      "compilations_loaded": compiled[2],
      # beyond the fixed shapes (continuous: decode-only + lane lengths per engine; static: one
      # per bucket it met)
      "recompilations": max(0, stats["compilations"] - stats["expected_compilations"]),
      "generate_seconds": round(seconds, 3),
      "scheduler": opts.scheduler,
      "replicas": stats["replicas"],
      "batch_size": opts.batch_size,
      "mesh": format_mesh(parse_mesh(opts.mesh)) if opts.mesh else "default",
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "model": opts.model,
      "dtype": dtype,
      "implementation": opts.implementation,
      "sparsity": str(sparsity),
  }
  metrics.update({k: stats[k] for k in SPECULATIVE_KEYS if k in stats})
  if opts.speculating:
    metrics["speculative"] = opts.speculative
    metrics["acceptance"] = opts.acceptance
  return metrics
