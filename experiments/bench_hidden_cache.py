"""Heads-only training steps from cached hidden states vs from token windows, side by side.

  python experiments/bench_hidden_cache.py            # embedded model; + a 16-layer variant

For each base and each heads-only recipe (Medusa-1, Hydra, EAGLE), one jitted training step (the
shared loop's: loss, gradients, AdamW) is timed two ways, in interleaved rounds: fed token
windows (the base runs forward every step) and fed the tensorstore cache's batches (the base's
hidden states read back, prefetched). Both timings include producing the batch. Reported: the
median seconds per step of each and their ratio, and the cache's one-off build time and size.
The embedded model is tiny next to its heads (4 layers, D=128, V=4096: one Medusa head's
vocabulary projection costs about what the whole base does), so the gain grows with the base;
`--layers` adds randomly initialised variants of the embedded model with more layers (timing
only) to show that. Appends to experiments/results/bench_hidden_cache.jsonl.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_list("layers", ["4", "16"], "Base depths: 4 is the embedded model itself, others "
                  "random variants of it with that many layers.")
flags.DEFINE_list("methods", ["medusa", "hydra", "eagle"], "Heads-only recipes.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("cache_windows", 512, "Training windows in the cache.")
flags.DEFINE_integer("steps", 10, "Steps per timed block.")
flags.DEFINE_integer("repeats", 5, "Interleaved rounds; medians are reported.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" /
                                   "bench_hidden_cache.jsonl"), "Results (JSON lines, appended).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np
  import optax

  from jaxinfer import checkpoint, embedded
  from jaxinfer import model as M
  from jaxinfer.draft_heads import eagle, hidden_cache, hydra, medusa
  from jaxinfer.train.lm import TokenWindows
  from jaxinfer.train.loop import TrainConfig, TrainState, make_optimizer

  model_dir = embedded.ensure()
  cfg0, base0, _ = checkpoint.load_model(str(model_dir), quiet=True)
  tokens = np.load(model_dir.parent / "train_tokens.npy")[
      :FLAGS.cache_windows * FLAGS.seq_len + 1].astype(np.int32)
  opt = make_optimizer(TrainConfig(steps=1000, warmup_steps=10))
  rows = []
  for n_layers in map(int, FLAGS.layers):
    if n_layers == cfg0.num_layers:
      cfg, base = cfg0, base0
    else:
      cfg = dataclasses.replace(cfg0, num_layers=n_layers)
      base = M.init_params(cfg, jax.random.key(0))
    tmp = Path(tempfile.mkdtemp(prefix="hidden_cache_"))
    t0 = time.perf_counter()
    cache = hidden_cache.build(tmp / "cache", base, cfg, tokens, FLAGS.seq_len,
                               batch_size=FLAGS.batch_size, progress=False)
    build_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file())
    feeds = {"tokens": TokenWindows(tokens, FLAGS.batch_size, FLAGS.seq_len),
             "cache": hidden_cache.HiddenBatches(cache, FLAGS.batch_size)}
    for method in FLAGS.methods:
      if method == "medusa":
        loss_fn, params = medusa.medusa_loss_fn(cfg), medusa.init_heads(base, 4)
      elif method == "hydra":
        loss_fn, params = hydra.hydra_loss_fn(cfg), hydra.init_heads(base, 4, jax.random.key(0))
      else:
        loss_fn = eagle.eagle_loss_fn(cfg)
        params = eagle.init_draft(eagle.draft_config(cfg), jax.random.key(0))

      @jax.jit
      def step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.key(0), state.step)
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch,
                                                                 rng)
        upd, o = opt.update(g, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, upd), o), loss

      state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, opt.init(params))
      counters = {k: 0 for k in feeds}

      def block(kind):
        nonlocal state
        t = time.perf_counter()
        for _ in range(FLAGS.steps):
          state, loss = step(state, base, feeds[kind](counters[kind]))
          counters[kind] += 1
        loss.block_until_ready()
        return (time.perf_counter() - t) / FLAGS.steps

      for kind in feeds:  # compile and warm both
        block(kind)
      times = {k: [] for k in feeds}
      for _ in range(FLAGS.repeats):
        for kind in feeds:
          times[kind].append(block(kind))
      med = {k: float(np.median(v)) for k, v in times.items()}
      ratios = [a / b for a, b in zip(times["tokens"], times["cache"])]
      row = {"model": "embedded" if base is base0 else f"embedded-{n_layers}-layer-random",
             "num_layers": n_layers, "method": method, "device": jax.devices()[0].device_kind,
             "jax": jax.__version__, "date": datetime.date.today().isoformat(),
             "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
             "seconds_per_step_tokens": round(med["tokens"], 4),
             "seconds_per_step_cache": round(med["cache"], 4),
             "speedup": round(float(np.median(ratios)), 2),
             "cache_windows": cache.num_windows, "cache_build_seconds": round(build_s, 1),
             "cache_bytes": size}
      print(json.dumps(row))
      rows.append(row)
    shutil.rmtree(tmp)
  output.append_jsonl(FLAGS.results, rows)


if __name__ == "__main__":
  app.run(main)
