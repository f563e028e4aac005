"""Weight quantization on the embedded model: held-out loss after PTQ per format, after QAT, and
of a full-precision control fine-tuned for the same steps; weight bytes per format.

  python experiments/bench_quant.py                  # ~10 minutes on 2 CPU cores
  python experiments/bench_quant.py --steps=1000 --batch_size=16   # a real QAT budget
  python experiments/bench_quant.py --distill        # QAT on LLM-QAT's KL loss as well
  python experiments/bench_quant.py --ptq_formats=fp8_e4m3,fp8_e5m2,fp4_e2m1 \
      --qat_formats=                                 # PTQ only: FP exponent / mantissa splits

Loss: mean next-token loss (nats/token) over the first --eval_batches batches of 16 windows of
256 tokens of the held-out stdlib text (files the embedded model never saw). PTQ quantizes the
embedded model as built. QAT fine-tunes it for --steps on its training text through the
fake-quantized forward (`jaxinfer train --qat`), then quantizes the result: the served weights.
The control is the same fine-tuning without quantization, and "PTQ of control" quantizes the
control's weights (train first, quantize after: what QAT must beat).

  gap recovered = (PTQ loss - QAT loss) / (PTQ loss - control loss)

PTQ of the model QAT started from against the control after the same steps: 100% means the
quantized model is as good as the full-precision one trained as long; 0% that QAT gained nothing
over PTQ; n/a when the control is no better than that PTQ (no gap to recover). The same ratio
against PTQ of the control is reported beside it. The QAT budget here is small (few steps,
small batch): the run says so in its output.
Weight bytes: the quantized leaves as held in memory (qvalue + scales; int4/int2/ternary/fp4/fp6
packed into bytes) and as the format's bits packed would take, against the same weights in
float32.
Appends one row per result to experiments/results/bench_quant.jsonl.
"""

from __future__ import annotations

import datetime
import math
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_list("ptq_formats", ["int8", "fp8_e4m3", "int4:g32", "int2:g32", "ternary"],
                  "Formats quantized after training (attention and MLP weights).")
flags.DEFINE_list("qat_formats", ["int4:g32", "int2:g32", "ternary"],
                  "Formats trained with QAT (each also quantized after the control).")
flags.DEFINE_integer("steps", 200, "Fine-tuning steps of each QAT run and of the control.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per training sequence.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW, cosine to 10%).")
flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
flags.DEFINE_integer("eval_batches", 16, "Held-out batches of 16 x 256 tokens.")
flags.DEFINE_bool("distill", False, "Also run QAT with the KL from the starting model's logits.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_quant.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS

# Targets from the quantization issue: PTQ loss cost (% of the full-precision loss) and the
# share of the PTQ gap QAT recovers (%).
PTQ_TARGET = {"int8": 0.1, "fp8_e4m3": 0.1, "int4:g32": 2.0}
RECOVERED_TARGET = {"int4:g32": 50.0, "int2:g32": 75.0, "ternary": 75.0}


def _bits(dtype) -> int:
  import ml_dtypes
  try:
    return ml_dtypes.iinfo(dtype).bits
  except (TypeError, ValueError):  # a float type
    return ml_dtypes.finfo(dtype).bits


def weight_bytes(params, quantized) -> dict[str, int]:
  """Bytes of the quantized leaves (held, packed) and of the same weights in float32."""
  import jax
  import jax.numpy as jnp

  from jaxinfer import quant
  held = packed = f32 = 0
  for q in jax.tree_util.tree_leaves(quantized, is_leaf=quant.is_quantized):
    if not quant.is_quantized(q):
      continue
    if isinstance(q, quant.ActQuantized):
      q = q.q
    bits = 2 if isinstance(q.qtype, str) else _bits(jnp.dtype(q.qtype))  # qwix's "int2": 2
    size = math.prod(quant.logical_shape(q))
    held += q.qvalue.nbytes + q.scale.nbytes
    packed += size * bits // 8 + q.scale.nbytes
    f32 += size * 4
  total = sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  return {"quantized_weights_float32_bytes": f32, "quantized_weights_bytes": held,
          "quantized_weights_packed_bytes": packed, "model_float32_bytes": total,
          "model_bytes": total - f32 + held}


def finetune(cfg, params, train_tokens, fmt, distill, workdir):
  """(final full-precision params, seconds): --steps of QAT in `fmt`, or plain with fmt None."""
  import jax
  import jax.numpy as jnp

  from jaxinfer.train import lm, qat
  from jaxinfer.train.loop import TrainConfig, train
  # seed 1: the embedded model was trained on seed 0's windows; these are new ones.
  windows = lm.TokenWindows(train_tokens, FLAGS.batch_size, FLAGS.seq_len, seed=1)
  tcfg = TrainConfig(steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
                     warmup_steps=FLAGS.warmup_steps, checkpoint_every=FLAGS.steps,
                     log_every=max(1, FLAGS.steps // 10), progress=False)
  start = jax.tree_util.tree_map(jnp.copy, params)  # training donates its starting buffers
  t0 = time.perf_counter()
  if fmt is None:
    out, _ = train(lm.lm_loss_fn(cfg), start, windows, tcfg, workdir, description="control")
  else:
    out, _ = qat.finetune(cfg, start, windows, tcfg, workdir, fmt, distill)
  return out, time.perf_counter() - t0


def run_all(cfg, params, train_tokens, evaluate):
  """Every result as (method, format name or None, loss, extra fields)."""
  from jaxinfer import quant
  from jaxinfer.model import Transformer
  from jaxinfer.train import qat
  spec = Transformer.spec(cfg)
  results = [("full_precision", None, evaluate(params), {})]
  for name in FLAGS.ptq_formats:
    q = quant.quantize_params(params, spec, quant.QuantFormat.parse(name))
    results.append(("ptq", name, evaluate(q), weight_bytes(params, q)))
  if not FLAGS.qat_formats:  # PTQ alone (e.g. the FP formats' exponent / mantissa splits)
    return results
  with tempfile.TemporaryDirectory() as tmp:
    control, secs = finetune(cfg, params, train_tokens, None, False, Path(tmp) / "control")
    results.append(("control", None, evaluate(control), {"train_seconds": round(secs, 1)}))
    methods = [("qat", False)] + ([("qat_distill", True)] if FLAGS.distill else [])
    for name in FLAGS.qat_formats:
      fmt = quant.QuantFormat.parse(name)
      results.append(("ptq_of_control", name, evaluate(qat.served(cfg, control, fmt)), {}))
      for method, distill in methods:
        tuned, secs = finetune(cfg, params, train_tokens, fmt, distill, Path(tmp) / method / name)
        results.append((method, name, evaluate(qat.served(cfg, tuned, fmt)),
                        {"train_seconds": round(secs, 1)}))
  return results


def to_rows(results, common) -> list[dict]:
  """JSONL rows: each loss with its cost against full precision and, for QAT, the gap
  recovered against the control (and against PTQ of the control)."""
  loss = {(m, f): l for m, f, l, _ in results}
  fp, control = loss[("full_precision", None)], loss.get(("control", None))
  rows = []
  for method, fmt, value, extra in results:
    row = {**common, "method": method, "format": fmt, "heldout_loss": round(value, 5),
           "loss_increase_percent": round(100 * (value - fp) / fp, 3), **extra}
    if method == "ptq" and fmt in PTQ_TARGET:
      row["target_loss_increase_percent"] = PTQ_TARGET[fmt]
    if method.startswith("qat"):
      for key, base in (("", ("ptq", fmt)), ("_vs_ptq_of_control", ("ptq_of_control", fmt))):
        gap = loss[base] - control if base in loss else 0.0
        # No gap to recover when the control is no better than PTQ: None, not a ratio of two
        # negative numbers.
        row["gap_recovered_percent" + key] = (round(100 * (loss[base] - value) / gap, 1)
                                              if gap > 0 else None)
      row["target_gap_recovered_percent"] = RECOVERED_TARGET.get(fmt)
    rows.append(row)
  return rows


def table(rows) -> str:
  """The rows as one markdown table."""
  out = ["| method | format | held-out loss | vs full precision | gap recovered (vs PTQ / vs "
         "PTQ of control) | target | met | weight bytes vs float32 (held / packed) |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    target, met, rec, size = "", "", "", ""
    if "target_loss_increase_percent" in r:
      target = f"<= {r['target_loss_increase_percent']}%"
      met = "yes" if r["loss_increase_percent"] <= r["target_loss_increase_percent"] else "no"
    if r["method"].startswith("qat"):
      pct = lambda v: "n/a" if v is None else f"{v}%"
      rec = (f"{pct(r['gap_recovered_percent'])} / "
             f"{pct(r.get('gap_recovered_percent_vs_ptq_of_control'))}")
      if r["target_gap_recovered_percent"] is not None:
        target = f">= {r['target_gap_recovered_percent']}%"
        met = ("n/a" if r["gap_recovered_percent"] is None else
               "yes" if r["gap_recovered_percent"] >= r["target_gap_recovered_percent"] else "no")
    if "quantized_weights_bytes" in r:
      f32 = r["quantized_weights_float32_bytes"]
      size = (f"{r['quantized_weights_bytes'] / f32:.3f} / "
              f"{r['quantized_weights_packed_bytes'] / f32:.3f}")
    out.append(f"| {r['method']} | {r['format'] or '-'} | {r['heldout_loss']:.4f} | "
               f"{r['loss_increase_percent']:+.2f}% | {rec} | {target} | {met} | {size} |")
  return "\n".join(out)


def main(argv):
  del argv
  import jax
  import numpy as np

  from jaxinfer import checkpoint, embedded
  from jaxinfer.train import lm

  model_dir = embedded.ensure()
  cfg, params, _ = checkpoint.load_model(str(model_dir), quiet=True)
  train_tokens = np.load(model_dir.parent / "train_tokens.npy").astype(np.int32)
  held = lm.TokenWindows(np.load(model_dir.parent / "heldout_tokens.npy").astype(np.int32), 16,
                         256)
  evaluate = lambda p: lm.evaluate(p, cfg, held, FLAGS.eval_batches)
  t0 = time.perf_counter()
  results = run_all(cfg, params, train_tokens, evaluate)
  common = {"model": "embedded", "params": cfg.num_params(),
            "steps": FLAGS.steps if FLAGS.qat_formats else 0,
            "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
            "learning_rate": FLAGS.learning_rate, "eval_tokens": FLAGS.eval_batches * 16 * 256,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}
  rows = to_rows(results, common)
  output.append_jsonl(FLAGS.results, rows)
  print(f"embedded model ({cfg.num_params():,} parameters; attention and MLP weights quantized, "
        f"embeddings and norms not); held-out loss over {common['eval_tokens']:,} tokens.\n"
        f"QAT and control: {FLAGS.steps} steps of {FLAGS.batch_size} x {FLAGS.seq_len} tokens "
        f"(a small budget for this CPU), lr {FLAGS.learning_rate}. Gap recovered = (PTQ - QAT) / "
        f"(PTQ - control), n/a when the control is no better than PTQ; "
        f"{time.perf_counter() - t0:.0f} s in all.\n")
  print(table(rows))
  print(f"\nappended {len(rows)} rows to {FLAGS.results}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
