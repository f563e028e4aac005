"""jaxinfer quickstart: build the embedded model if missing, then batch-generate over the
bundled prompts and print throughput and sample completions."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from importlib import resources
from pathlib import Path

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import apply_compilation_cache, define_compilation_cache_flag

flags.DEFINE_string("output_dir", "jaxinfer_quickstart", "Where completions and metrics go.")
flags.DEFINE_string("cache_dir", None, "Embedded model cache (default $JAXINFER_CACHE, else "
                    "$XDG_CACHE_HOME/jaxinfer or ~/.cache/jaxinfer).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Sequences generated together.", lower_bound=1)
flags.DEFINE_integer("show", 3, "Completions to print.", lower_bound=0)
flags.DEFINE_integer("speculative_prompts", 4, "Prompts for the speculative-decoding demo (0: "
                     "skip it).", lower_bound=0)
flags.DEFINE_integer("medusa_steps", 400, "Training steps for the Medusa heads of the demo (0: "
                     "skip training them).", lower_bound=0)
flags.DEFINE_enum("recipe", "default", ["default", "smoke"], "Embedded model recipe; smoke builds "
                  "a throwaway model in seconds (for testing the pipeline).")
define_compilation_cache_flag()
FLAGS = flags.FLAGS


def prompts_path() -> Path:
  return Path(str(resources.files("jaxinfer") / "data" / "quickstart_prompts.jsonl"))


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  apply_compilation_cache()
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
  with _cache_errors():
    cached = embedded.is_built(FLAGS.cache_dir, recipe)
    print(f"== embedded model "
          f"({'cached' if cached else 'building: a few minutes on 2 CPU cores'})", flush=True)
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
  if FLAGS.speculative_prompts:
    speculative_demo(model_dir, prompts_path(), FLAGS.speculative_prompts, FLAGS.max_new_tokens,
                     "prompt lookup, 4 drafted tokens", speculative="ngram", num_draft_tokens=4)
    if FLAGS.medusa_steps:
      with _cache_errors():
        heads, nodes = medusa_heads(model_dir, FLAGS.medusa_steps)
      speculative_demo(model_dir, prompts_path(), FLAGS.speculative_prompts,
                       FLAGS.max_new_tokens, f"Medusa heads, {nodes}-node tree",
                       speculative="medusa", draft_heads=str(heads))
  print(f"\n== done in {time.perf_counter() - t0:.0f}s; outputs in {out_dir}/")
  if m["num_failed"]:
    sys.exit(1)


@contextlib.contextmanager
def _cache_errors():
  """A cache directory that cannot be used (not creatable, not writable) in one line, as
  `jaxinfer generate` says it (it was a traceback)."""
  from jaxinfer.errors import UserError
  try:
    yield
  except UserError as e:
    fail(str(e))
  except OSError as e:
    where = e.filename or FLAGS.cache_dir or "the cache directory"
    fail(f"--cache_dir: cannot use {str(where)!r} ({e.strerror or e})")


def medusa_heads(model_dir: Path, steps: int) -> tuple[Path, int]:
  """Medusa heads for the embedded model, trained once (resumable) and cached beside it: their
  directory (what `--draft_heads` reads) and the nodes their tree drafts."""
  import numpy as np

  from jaxinfer import checkpoint
  from jaxinfer.draft_heads import distill, medusa

  out = model_dir.parent / f"medusa-{steps}"
  if not (out / medusa.CONFIG).is_file():
    # about two passes over the distilled tokens (64 prompt + 128 written per window)
    num_prompts = max(64, min(1024, steps * 8 * 128 // 192 // 2))
    print(f"\n== training Medusa heads on the frozen model: the batch engine writes {num_prompts} "
          f"greedy continuations of training text (self-distillation), then {steps} steps; "
          f"cached after", flush=True)
    cfg, base, _ = checkpoint.load_model(str(model_dir), quiet=True)
    work = model_dir.parent / f"medusa-{steps}.run"
    t0 = time.perf_counter()
    tokens = distill.windows(str(model_dir), np.load(model_dir.parent / "train_tokens.npy"),
                             work / "distill", num_prompts=num_prompts, progress=False)
    held = distill.windows(str(model_dir), np.load(model_dir.parent / "heldout_tokens.npy"),
                           work / "distill_held", num_prompts=64, progress=False)
    heads, info = medusa.train_heads(cfg, base, tokens, held, work, steps=steps, batch_size=8,
                                     seq_len=128, progress=False)
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    medusa.save(out, heads, info)
  _, info = medusa.load(out)
  print(f"\n== Medusa heads ({out}): held-out top-1 accuracy per head "
        f"{', '.join(f'{a:.2f}' for a in info['accuracy_top1'])}")
  return out, len(info["tree"])


def speculative_demo(model_dir: Path, prompts_file: Path, n: int, max_new_tokens: int,
                     label: str, **options) -> None:
  """Speculative decoding (`jaxinfer.LLM(..., speculative=..., speculation="always")`, the
  engine with one slot) against the same engine's plain decoding over the same prompts, greedy:
  the outputs must match; prints tau and the measured speedup (both compiled beforehand)."""
  import jax

  import jaxinfer

  print(f"\n== speculative decoding ({label}, greedy, batch 1, {n} prompts)", flush=True)
  texts = [json.loads(l)["prompt"] for l in prompts_file.read_text().splitlines()[:n]]
  sp = jaxinfer.SamplingParams(max_new_tokens=max_new_tokens)
  plain = jaxinfer.LLM(str(model_dir), batch_size=1, progress=False)
  spec = jaxinfer.LLM(str(model_dir), batch_size=1, progress=False, speculation="always",
                      **options)
  timed = []
  for llm in (plain, spec):
    llm.generate(texts, sp)  # compiles every shape
    llm.reset_prefix_cache()  # (the timed call computes its prompts too)
    t0 = time.perf_counter()
    out = llm.generate(texts, sp)
    timed.append((time.perf_counter() - t0, out))
  (t_plain, a), (t_spec, b) = timed
  same = sum(x.completion_ids == y.completion_ids for x, y in zip(a, b))
  m = spec.metrics
  print(f"   tau {m['mean_accepted_tokens']:.2f} tokens per target forward (bonus included); "
        f"per-depth acceptance {', '.join(f'{x:.2f}' for x in m['per_depth_acceptance'])}")
  print(f"   {t_plain / t_spec:.2f}x the speed of plain decoding on "
        f"{jax.default_backend()}; outputs identical to plain greedy: {same}/{len(texts)}")
