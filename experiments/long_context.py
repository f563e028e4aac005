"""Long prompts on the embedded model: what each attention pattern costs in quality at 8k+.

  python experiments/long_context.py --seq_len=8192 --num_seqs=2

Teacher-forced next-token loss on held-out stdlib text (never trained on), concatenated into
sequences of --seq_len tokens, for: dense causal attention; sinks + window; MInference block
top-k; MInference vertical-slash. Every sparse pattern runs through the Pallas block-sparse
kernel (interpreted on CPU) and is checked against the jnp reference on the first sequence.
Reported per pattern: loss over all positions and over the last quarter, top-1 agreement with
dense attention, and the fraction of (q block, kv block) tiles visited. As a yardstick, the same
text scored in independent windows of the training length (256). Then a generation from a
--seq_len prompt through `jaxinfer generate` with sinks+window, to show the path end to end.
Results: experiments/results/long_context.json.
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence.")
flags.DEFINE_integer("num_seqs", 2, "Sequences scored.")
flags.DEFINE_integer("train_len", 256, "The embedded model's training length (yardstick).")
flags.DEFINE_string("patterns", "dense;sinks_window:4,256;sinks_window:4,1024;block_topk:4,128;"
                    "vertical_slash:256,256,128",
                    "Sparsity patterns (jaxinfer/sparsity.py syntax), separated by ';'.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "long_context.json"),
                    "Results file.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer import embedded
  from jaxinfer import model as M
  from jaxinfer.checkpoint import load_model
  from jaxinfer.requests import Defaults
  from jaxinfer.runner import GenerateJob, run
  from jaxinfer.runtime import Runtime
  from jaxinfer.sparsity import parse

  model_dir = embedded.ensure()
  cfg, params, tok = load_model(str(model_dir))
  stream = np.load(model_dir.parent / "heldout_tokens.npy")
  t = FLAGS.seq_len  # scored positions per sequence (inputs of exactly t tokens)
  n = min(FLAGS.num_seqs, len(stream) // (t + 1))
  if n < 1:
    raise SystemExit(f"held-out text has {len(stream)} tokens, fewer than --seq_len={t} + 1")
  seqs = jnp.asarray(stream[:n * (t + 1)].reshape(n, t + 1).astype(np.int32))

  def scorer(sparsity, implementation):
    def score(tokens):
      inputs, targets = tokens[None, :-1], tokens[None, 1:]
      pos = jnp.arange(inputs.shape[1])[None]
      hidden, _ = M.forward(params, inputs, pos, cfg,
                            runtime=Runtime(implementation=implementation, sparsity=sparsity))
      logits = M.logits(params, hidden)[0]
      loss = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[0][:, None],
                                                                 -1)[:, 0]
      return loss, jnp.argmax(logits, -1)
    return jax.jit(score)

  # Yardstick: the same targets scored in independent windows of the training length.
  win = FLAGS.train_len
  short = scorer(parse("dense"), "xla")
  yard = []
  for s in range(n):
    losses = np.zeros(t)
    for start in range(0, t, win):
      chunk = seqs[s, start:start + win + 1]
      if len(chunk) > 1:
        losses[start:start + len(chunk) - 1] = np.asarray(short(chunk)[0])
    yard.append(losses)
  yard = np.stack(yard)

  results = {"model": str(model_dir), "seq_len": t, "num_seqs": n,
             "device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "date": datetime.date.today().isoformat(),
             "yardstick_windows_of_train_len": {
                 "train_len": win, "loss": round(float(yard.mean()), 4),
                 "loss_last_quarter": round(float(yard[:, -t // 4:].mean()), 4)},
             "patterns": {}}
  dense_pred = None
  for spec in FLAGS.patterns.split(";"):
    sparsity = parse(spec)
    impl = "xla" if spec == "dense" else "pallas"
    fn = scorer(sparsity, impl)
    t0 = time.perf_counter()
    outs = [fn(seqs[s]) for s in range(n)]
    losses = np.stack([np.asarray(o[0]) for o in outs])
    preds = np.stack([np.asarray(o[1]) for o in outs])
    seconds = time.perf_counter() - t0
    if dense_pred is None:
      dense_pred = preds
    row = {"implementation": impl, "loss": round(float(losses.mean()), 4),
           "loss_last_quarter": round(float(losses[:, -t // 4:].mean()), 4),
           "top1_agreement_with_dense": round(float((preds == dense_pred).mean()), 4),
           "cpu_seconds": round(seconds, 1)}
    if impl == "pallas":  # the kernel path equals the reference on the first sequence
      ref_loss, _ = scorer(sparsity, "xla")(seqs[0])
      row["max_abs_loss_diff_vs_reference"] = float(np.abs(np.asarray(ref_loss) - losses[0]).max())
    row["tiles_visited"] = tile_density(sparsity, cfg, params, seqs[0], t)
    results["patterns"][spec] = row
    print(spec, json.dumps(row), file=sys.stderr, flush=True)

  # End to end: a --seq_len prompt through `jaxinfer generate` with sinks + window.
  with tempfile.TemporaryDirectory() as d:
    prompts = Path(d) / "p.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt_ids": np.asarray(seqs[0, :t]).tolist()})
                       + "\n")
    out = Path(d) / "o.jsonl"
    metrics = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(model_dir),
                              defaults=Defaults(max_new_tokens=32), implementation="pallas",
                              sparsity="sinks_window:4,256", max_seq_len=2 * t + 64,
                              progress=False))
    rec = json.loads(out.read_text())
    if "error" in rec:
      raise SystemExit(f"long-prompt generation failed: {rec['error']}")
    results["generate_long_prompt"] = {
        "prompt_tokens": rec["prompt_tokens"], "completion_tokens": rec["completion_tokens"],
        "sparsity": "sinks_window:4,256", "prefill_tokens_per_second":
            metrics["prefill_tokens_per_second"], "completion": rec["completion"]}
  Path(FLAGS.results).parent.mkdir(parents=True, exist_ok=True)
  Path(FLAGS.results).write_text(json.dumps(results, indent=2) + "\n")
  print(json.dumps(results, indent=2))


def tile_density(sparsity, cfg, params, tokens, length):
  """Fraction of causal (q block, kv block) tiles the kernel visits, layer 0, mean over heads."""
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer import model as M
  from jaxinfer.rope import apply_rope, rope_tables
  from pallas_kernels.block_sparse_attention import dynamic, mask_info, masks
  block = sparsity.block
  nb = -(-length // block)
  causal_tiles = nb * (nb + 1) / 2
  if sparsity.kind == "dense":
    return 1.0
  if sparsity.kind == "sinks_window":
    info = mask_info(masks.sinks_and_window((length, length), sparsity.num_sinks,
                                            sparsity.window), block, block)
    return round(float(np.asarray(info.num_kv).sum() / causal_tiles), 4)
  # Dynamic patterns depend on the layer's q and k: rebuild them for layer 0.
  x = jnp.take(params.embed, tokens[None, :length], axis=0)
  layer = params.layers[0]
  x = M.rms_norm(x, layer.attn_norm, cfg.norm_eps)
  cos, sin = rope_tables(jnp.arange(length)[None], cfg)
  q = apply_rope(jnp.einsum("btd,dnh->btnh", x, layer.attn.q), cos, sin).transpose(0, 2, 1, 3)
  k = apply_rope(jnp.einsum("btd,dkh->btkh", x, layer.attn.k), cos, sin).transpose(0, 2, 1, 3)
  t = (length // block) * block
  q, k = q[:, :, :t], k[:, :, :t]
  if sparsity.kind == "block_topk":
    info = dynamic.block_topk_mask_info(q, k, block, sparsity.top_k)
  else:
    info = dynamic.vertical_slash_mask_info(q, k, block, sparsity.num_vertical, sparsity.num_slash,
                                            sparsity.last_q)
  nb = t // block
  return round(float(np.asarray(info.num_kv).sum(-1).mean() / (nb * (nb + 1) / 2)), 4)


if __name__ == "__main__":
  app.run(main)
