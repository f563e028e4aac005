"""jaxinfer train: pretrain (--init=random) or fine-tune a model on text, optionally
quantization-aware (--qat); resumes from its workdir after a crash; writes a Hugging Face
directory, or with --qat a quantized jaxinfer checkpoint, plus report.json at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import (apply_platform_flags, check_data, check_workdir, data_tokens,
                                 define_model_flags, define_resume_flag,
                                 load_model_from_flags, record_settings)

define_model_flags()
define_resume_flag()
flags.DEFINE_string("data", None, "Training text: a .txt file, a directory (its *.txt, *.py "
                    "and *.md files), or JSONL with a 'text' field or a conversation "
                    "('messages', rendered by the model's chat template) per line.")
flags.DEFINE_string("output", None, "Where the trained model is written: a Hugging Face "
                    "directory, or with --qat a quantized jaxinfer (orbax) checkpoint instead.")
flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl (default: <output>.run).")
flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                  "Start from --model's weights, or from random weights of its architecture.")
flags.DEFINE_integer("steps", 1000, "Optimizer steps.", lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Sequences per step.", lower_bound=1)
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.", lower_bound=2)
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW), above 0.")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be above 0")
flags.DEFINE_integer("warmup_steps", 50, "Linear warmup steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).", lower_bound=0.0)
flags.DEFINE_integer("checkpoint_every", 200, "Steps between orbax checkpoints.", lower_bound=1)
flags.DEFINE_float("heldout_fraction", 0.05, "Tail of the data kept for evaluation.",
                   lower_bound=0.0, upper_bound=0.5)
flags.DEFINE_integer("seed", 0, "Data order and init seed.")
flags.DEFINE_string("qat", None, "Quantization-aware training for this weight format (as in "
                    "jaxinfer quantize --format, e.g. int4:g32): the forward sees the weights the "
                    "quantized model serves, gradients pass straight through to the full-precision "
                    "weights the checkpoints hold. --output then receives the quantized checkpoint "
                    "(Hugging Face files cannot hold it) that jaxinfer generate --model serves.")
flags.DEFINE_bool("distill", False, "With --qat: train on the KL divergence from the starting "
                  "model's next-token distribution (full precision, frozen) on the same batch, as "
                  "LLM-QAT does, instead of the next-token loss on the text.")
flags.mark_flags_as_required(["data", "output"])
FLAGS = flags.FLAGS
# what decides a run's course: a resumed run must have the values it started with
TRAIN_FLAGS = ("model", "dtype", "mesh", "data", "init", "steps", "batch_size", "seq_len",
               "learning_rate", "warmup_steps", "weight_decay", "heldout_fraction", "seed", "qat",
               "distill")


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  apply_platform_flags()
  import jax
  import numpy as np

  from jaxinfer import checkpoint
  from jaxinfer import model as M
  from jaxinfer import quant
  from jaxinfer.train import lm, qat
  from jaxinfer.checkpoint.destination import check_destination
  from jaxinfer.files import write_atomically
  from jaxinfer.sharding import format_mesh
  from jaxinfer.train.loop import TrainConfig, train

  try:
    fmt = quant.QuantFormat.parse(FLAGS.qat) if FLAGS.qat is not None else None
  except ValueError as e:
    fail(f"--qat: {e}")
  if FLAGS.distill and fmt is None:
    fail("--distill: distils the model into its quantized view; pass --qat=FORMAT too")
  if FLAGS.distill and FLAGS.init == "random":
    fail("--distill: the teacher is the starting model; use --init=pretrained")
  settings = {name: FLAGS[name].value for name in TRAIN_FLAGS}
  try:
    check_destination(FLAGS.output, None)  # (an empty name, or one under a file: before all)
    workdir = Path(FLAGS.workdir or FLAGS.output.rstrip("/") + ".run")
    check_workdir(workdir, FLAGS.resume, settings)
    mesh, src, cfg, params, tokenizer = load_model_from_flags()
    check_destination(FLAGS.output, src, "hf" if fmt is None else "orbax")  # (now, not after)
    if FLAGS.seq_len > cfg.max_seq_len:
      fail(f"--seq_len: {FLAGS.seq_len} is past the model's context ({cfg.max_seq_len} "
           f"positions)")
    tokens = data_tokens(tokenizer, src, cfg)
    n_held = int(len(tokens) * FLAGS.heldout_fraction)
    train_tokens, held_tokens = tokens[:len(tokens) - n_held], tokens[len(tokens) - n_held:]
    if len(train_tokens) <= FLAGS.seq_len + 1:
      fail(f"--data: {FLAGS.data} gives {len(train_tokens)} training tokens, too few for one "
           f"window of --seq_len={FLAGS.seq_len} (and its next token)")
    windows = lm.TokenWindows(train_tokens, FLAGS.batch_size, FLAGS.seq_len, FLAGS.seed)
    tcfg = TrainConfig(steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
                       warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
                       checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed)
    if quant.holds_quantized(params):
      fail(f"--model: {FLAGS.model} holds quantized weights, which training cannot update; "
           f"train the full-precision model (with --qat=FORMAT to fine-tune it for a format)")
    if fmt is not None:
      try:
        qat.check(cfg, params, fmt)
      except ValueError as e:  # (a group size that does not divide a weight's axis)
        fail(f"--qat: {e}")
    check_data(workdir, tokens, FLAGS.data)  # (the first write: every check above passed)
  except (OSError, ValueError) as e:  # (OSError: e.g. a --workdir under a file)
    fail(str(e))
  if FLAGS.init == "random":
    params = M.init_params(cfg, jax.random.key(FLAGS.seed), mesh)
  record_settings(workdir, settings)
  if fmt is None:
    params, logged = train(lm.lm_loss_fn(cfg), params, windows, tcfg, workdir, mesh=mesh)
  else:
    params, logged = qat.finetune(cfg, params, windows, tcfg, workdir, fmt, FLAGS.distill,
                                  mesh=mesh)
    params = qat.served(cfg, params, fmt)
  for record in logged:
    if not np.isfinite(record["loss"]):
      fail(f"--learning_rate: training diverged (loss {record['loss']} at step "
           f"{record['step']}); nothing was written to --output: train again with a lower "
           f"--learning_rate (now {FLAGS.learning_rate}) in a new --workdir")
  report = {"train_tokens": int(len(train_tokens)), "steps": FLAGS.steps,
            "mesh": format_mesh(dict(mesh.shape))}
  if fmt is not None:
    report.update(quantization=fmt.name, distill=FLAGS.distill)
  report["heldout_tokens"] = int(len(held_tokens))
  report["heldout_loss_nats_per_token"] = None  # (a tail shorter than a window: no loss)
  if len(held_tokens) > FLAGS.seq_len + 1:
    held = lm.TokenWindows(np.asarray(held_tokens), 1, FLAGS.seq_len)
    report["heldout_loss_nats_per_token"] = round(lm.evaluate(params, cfg, held, 64), 4)
  else:
    print(f"warning: no held-out loss: --heldout_fraction={FLAGS.heldout_fraction} leaves "
          f"{len(held_tokens)} tokens, under one window of --seq_len={FLAGS.seq_len} and its "
          f"next token", file=sys.stderr)
  if fmt is None:
    out = checkpoint.save_hf(FLAGS.output, cfg, params, tokenizer_dir=src)
  else:
    out = checkpoint.save_orbax(FLAGS.output, cfg, params, tokenizer_dir=src, quant_format=fmt)
  write_atomically(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
  print(json.dumps(report))
  print(f"wrote {out}" + (f" ({fmt.name} quantized checkpoint)" if fmt is not None else ""))
