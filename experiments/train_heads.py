"""Trains draft heads (Medusa-1 heads or an EAGLE draft layer) on the embedded model and records
what they learned.

  python experiments/train_heads.py                      # Medusa-1, self-distilled, 400 steps
  python experiments/train_heads.py --self_distill=0     # on the stdlib text itself
  python experiments/train_heads.py --method=hydra       # Hydra heads, same data and budget
  python experiments/train_heads.py --method=hydra --prefix_layer --hidden_cache   # Hydra++,
                                                         # from cached hidden states
  python experiments/train_heads.py --method=eagle --draft_vocab=1024   # the EAGLE draft layer

Data: --self_distill windows of the embedded model's training tokens, continued greedily by the
batch engine (what the heads see when serving), or the training text itself. Held-out accuracy
is measured on held-out windows treated the same way. Writes the heads to --output (default:
beside the embedded model, where the quickstart looks for them) and appends per-head top-1/top-5
accuracy, the tree and the predicted tokens per step to experiments/results/train_heads.jsonl.
tau and wall-clock speedup are measured by bench_speculative.py --methods=medusa.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_enum("method", "medusa", ["medusa", "medusa2", "hydra", "eagle"],
                  "Draft-head recipe.")
flags.DEFINE_float("kl_weight", 10.0, "medusa2: KL weight.")
flags.DEFINE_integer("steps", 400, "Training steps.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("num_heads", 4, "Medusa heads.")
flags.DEFINE_integer("draft_vocab", 0, "eagle: draft vocabulary size (0: the whole vocabulary).")
flags.DEFINE_integer("self_distill", 1024, "Self-distillation windows (0: train on the text).")
flags.DEFINE_bool("prefix_layer", False, "hydra: Hydra++'s prefix-attention layer (heads get a "
                  "hydrapp- name).")
flags.DEFINE_integer("ttt_steps", 1, "eagle: training-time test steps (EAGLE-3 style).")
flags.DEFINE_integer("head_layers", 1, "hydra: residual blocks per head (Hydra++: 4).")
flags.DEFINE_bool("hidden_cache", False, "medusa|hydra|eagle: train from the base's hidden "
                  "states cached (tensorstore zarr) beside the embedded model, built on first use "
                  "and shared by the methods; heads get a -cached suffix.")
flags.DEFINE_string("output", None, "Heads directory (default: <embedded cache>/<method>-<steps>"
                    " for self-distilled heads).")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "train_heads.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np

  from jaxinfer import checkpoint, embedded
  from jaxinfer.draft_heads import distill, eagle, hydra, medusa, medusa2

  model_dir = embedded.ensure()
  cfg, base, _ = checkpoint.load_model(str(model_dir), quiet=True)
  train_tokens = np.load(model_dir.parent / "train_tokens.npy")
  held_tokens = np.load(model_dir.parent / "heldout_tokens.npy")
  m = FLAGS.method
  name = m + (f"-v{FLAGS.draft_vocab}" if m == "eagle" and FLAGS.draft_vocab else "")
  if m == "eagle" and FLAGS.ttt_steps > 1:
    name += f"-ttt{FLAGS.ttt_steps}"
  if m == "hydra" and FLAGS.prefix_layer:
    name = "hydrapp"
  if m == "hydra" and FLAGS.head_layers > 1:
    name += f"-l{FLAGS.head_layers}"
  default = model_dir.parent / ((f"{name}-{FLAGS.steps}" if FLAGS.self_distill
                                 else f"{name}-text-{FLAGS.steps}")
                                + ("-cached" if FLAGS.hidden_cache else ""))
  if FLAGS.hidden_cache and m == "medusa2":
    raise app.UsageError("--hidden_cache: Medusa-2 trains the base; its states cannot be cached")
  cache_dir = (model_dir.parent / f"hidden-cache-sd{FLAGS.self_distill}-t{FLAGS.seq_len}"
               if FLAGS.hidden_cache else None)
  out = Path(FLAGS.output or default)
  work = Path(str(out) + ".run")
  t0 = time.perf_counter()
  if FLAGS.self_distill:
    train_tokens = distill.windows(str(model_dir), train_tokens, work / "distill",
                                   num_prompts=FLAGS.self_distill, progress=False)
    held_tokens = distill.windows(str(model_dir), held_tokens, work / "distill_held",
                                  num_prompts=64, progress=False)
  t1 = time.perf_counter()
  common = dict(steps=FLAGS.steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                progress=False)
  heads_only = dict(common, hidden_cache=cache_dir)
  vocab = None
  if m == "eagle":
    heads, vocab, info = eagle.train_eagle(cfg, base, train_tokens, held_tokens, work,
                                           draft_vocab=FLAGS.draft_vocab,
                                           ttt_steps=FLAGS.ttt_steps, **heads_only)
    top1, top5 = [info["accuracy_top1"]], [info["accuracy_top5"]]
  elif m == "medusa2":
    heads, tuned, info = medusa2.train_medusa2(cfg, base, train_tokens, held_tokens, work,
                                               num_heads=FLAGS.num_heads,
                                               kl_weight=FLAGS.kl_weight, **common)
    checkpoint.save_hf(out / "model", cfg, tuned, tokenizer_dir=model_dir)
    top1 = info["accuracy_top1"]
    top5 = [round(float(sum(r[:5])), 4) for r in info["accuracy_topk"]]
  else:
    extra = ({"prefix_layer": FLAGS.prefix_layer, "head_layers": FLAGS.head_layers}
             if m == "hydra" else {})
    heads, info = (medusa if m == "medusa" else hydra).train_heads(
        cfg, base, train_tokens, held_tokens, work, num_heads=FLAGS.num_heads, **heads_only,
        **extra)
    top1 = info["accuracy_top1"]
    top5 = [round(float(sum(r[:5])), 4) for r in info["accuracy_topk"]]
  info.update(train_seconds=round(time.perf_counter() - t1, 1),
              distill_seconds=round(t1 - t0, 1), self_distilled_prompts=FLAGS.self_distill)
  if m == "eagle":
    eagle.save(out, heads, info, vocab)
  else:
    (hydra if m == "hydra" else medusa).save(out, heads, info)
  row = {"model": "embedded", "method": {"medusa": "medusa-1", "medusa2": "medusa-2",
                                         "hydra": ("hydra++" if FLAGS.prefix_layer else "hydra")
                                         + (f", {FLAGS.head_layers}-block heads"
                                            if FLAGS.head_layers > 1 else ""),
                                         "eagle": "eagle-1" + (
                                             f", training-time test {FLAGS.ttt_steps}"
                                             if FLAGS.ttt_steps > 1 else "")}[m],
         "device": jax.devices()[0].device_kind,
         "jax": jax.__version__, "date": datetime.date.today().isoformat(),
         "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
         "self_distilled_prompts": FLAGS.self_distill, "train_tokens": int(len(train_tokens)),
         "accuracy_top1": top1, "accuracy_top5": top5,
         "tree_nodes": len(info.get("tree", [])) or None,
         "expected_accepted_per_step": info.get("expected_accepted_per_step"),
         "distill_seconds": info["distill_seconds"], "train_seconds": info["train_seconds"],
         "draft_vocab": FLAGS.draft_vocab or None,
         "draft_vocab_coverage": info.get("draft_vocab_coverage"),
         "greedy_agreement": info.get("greedy_agreement"),
         "accuracy_top1_by_drafting_step": info.get("accuracy_top1_by_drafting_step"),
         "heads": out.name,
         "hidden_cache": FLAGS.hidden_cache}
  print(json.dumps(row, indent=2))
  output.append_jsonl(FLAGS.results, [row])


if __name__ == "__main__":
  app.run(main)
