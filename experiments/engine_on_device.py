"""The paged engine on this machine's accelerator: the same greedy requests through the XLA and
the Pallas attention, plainly, under a dynamic sparsity pattern (prompts prefilled whole; the
second call copies their cached partial pages) and speculating with prompt lookup and with a
layer-skip draft (its K/V in the engine's pages), on a small random model (nothing to download
or train).

  python experiments/engine_on_device.py --output=engine_on_device.json

Prints and writes one JSON object: per mode, the completions on which Pallas and XLA agree
(token for token, float32), each one's seconds for its second call less any compilation in
it (the first compiles; the second reuses the first's cached prompt pages) and the backend. experiments/device_check.sh runs it on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("output", None, "Write the JSON here too.")
flags.DEFINE_integer("prompts", 8, "Requests per call.")
flags.DEFINE_integer("new_tokens", 16, "New tokens per request.")
FLAGS = flags.FLAGS

MODES = {"dense": {}, "vertical_slash": {"sparsity": "vertical_slash:8,8,128"},
         "ngram": {"speculative": "ngram", "speculation": "always"},
         "layerskip": {"speculative": "layerskip", "speculation": "always"}}


def main(argv):
  del argv
  import jax
  import numpy as np

  import jaxinfer
  from jaxinfer import model as M
  from jaxinfer.checkpoint import save_hf
  from jaxinfer.config import PRESETS

  cfg = dataclasses.replace(PRESETS["tiny"], dtype="float32", max_seq_len=1024)
  rng = np.random.RandomState(0)
  # prompts of 2 to 5 blocks of 128, each repeating a phrase (so lookups find matches)
  prompts = [[int(t) for t in np.tile(rng.randint(3, cfg.vocab_size, 24), 30)[:n]]
             for n in rng.randint(260, 640, FLAGS.prompts)]
  sampling = jaxinfer.SamplingParams(max_new_tokens=FLAGS.new_tokens)
  row = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "jax": jax.__version__, "model": "preset:tiny (random weights), float32"}
  with tempfile.TemporaryDirectory() as d:
    save_hf(Path(d), cfg, M.init_params(cfg, jax.random.key(0)))
    for mode, options in MODES.items():
      outs, secs = {}, {}
      for impl in ("xla", "pallas"):
        llm = jaxinfer.LLM(d, implementation=impl, progress=False, **options)
        llm.generate(prompts, sampling)  # compiles
        t0 = time.perf_counter()
        outs[impl] = [r.completion_ids for r in llm.generate(prompts, sampling)]
        secs[impl] = round(time.perf_counter() - t0 - llm.metrics["compile_seconds"], 3)
      same = sum(a == b for a, b in zip(outs["xla"], outs["pallas"]))
      row[mode] = {"identical": f"{same}/{len(prompts)}", "seconds": secs}
      print(mode, json.dumps(row[mode]), flush=True)
      if FLAGS.output:  # rewritten after each mode: a timeout keeps the modes measured
        Path(FLAGS.output).write_text(json.dumps(row) + "\n")
  print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
