"""Speculative decoding in the engine against plain decoding in static batches and in the
engine, side by side in one run.

  python experiments/bench_spec_batching.py             # embedded model, 4 slots, ngram + eagle

A workload of --requests held-out stdlib prompts whose output budgets are mixed (drawn from
--budgets, as in a real job: some requests want a line, some a page), greedy. Each mode runs the
whole workload through --slots rows:

  plain-static     padded batches of --slots requests, each run to its longest (Generator)
  plain-engine     the continuous-batching engine with --slots slots (the default scheduler)
  spec-engine      speculation inside the engine (forced on): its --slots slots verify draft
                   trees beside prompt lanes in one step, over its one page pool (shared prompt
                   pages read by reference, not copied)

With --shared_header every prompt starts with the same header, whose pages the engine computes
once. Per mode: workload wall time (prompts included; the median over --repeats interleaved
rounds after a compiling warm-up), its tokens/s, its time ratio against plain-static, and for
the speculative mode tau, slot occupancy (live rows per verification step / slots) and prompt
tokens whose K/V were reused rather than computed (one round's worth). Outputs are checked
identical across modes. Results are appended to experiments/results/bench_spec_batching.jsonl.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "Target model.")
flags.DEFINE_list("methods", ["ngram", "eagle"], "Proposers (as bench_speculative.py names "
                  "them; eagle: a chain drafted by the embedded model's eagle-v1024-400 draft).")
flags.DEFINE_integer("slots", 4, "Rows decoded at once (batch size / engine slots).")
flags.DEFINE_integer("requests", 32, "Requests in the workload.")
flags.DEFINE_list("budgets", ["16", "32", "64", "128"], "max_new_tokens values, drawn per "
                  "request with a fixed seed.")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length (tokens of held-out source).")
flags.DEFINE_integer("shared_header", 0, "Tokens of one header (held-out source) put before "
                     "every prompt, as a system prompt is (0: none).")
flags.DEFINE_integer("num_draft_tokens", 4, "Chain length.")
flags.DEFINE_string("eagle_draft", None, "eagle: the draft layer (default for the embedded "
                    "model: eagle-v1024-400).")
flags.DEFINE_integer("repeats", 5, "Interleaved timed rounds; medians are reported.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" /
                                   "bench_spec_batching.jsonl"), "Results file (JSON lines, "
                    "appended).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import time

  import jax
  import numpy as np

  from jaxinfer import checkpoint, embedded
  from jaxinfer.engine import Engine, EngineConfig, EngineRequest
  from jaxinfer.generation import Generator, RowRequest
  from jaxinfer.runner import GenerateJob
  from jaxinfer.speculative.registry import build as make_proposer

  model_dir = checkpoint.resolve_model_dir(FLAGS.model)
  eagle_dir = FLAGS.eagle_draft
  if eagle_dir is None and FLAGS.model == "embedded":
    eagle_dir = str(Path(model_dir).parent / "eagle-v1024-400")
  cfg, params, tok = checkpoint.load_model(str(model_dir))
  b, n = FLAGS.slots, FLAGS.requests
  rng = np.random.RandomState(0)
  budgets = [int(x) for x in rng.choice([int(x) for x in FLAGS.budgets], size=n)]
  prompts = embedded.heldout_prompts(tok, n + 1, max(FLAGS.prompt_tokens, FLAGS.shared_header))
  header = list(prompts[n][:FLAGS.shared_header])
  rows = [RowRequest(header + list(p[:FLAGS.prompt_tokens]), m, jax.random.key(i))
          for i, (p, m) in enumerate(zip(prompts[:n], budgets))]
  prompt_len = len(header) + FLAGS.prompt_tokens
  max_len = prompt_len + max(budgets)

  def plain_static():
    gen = Generator(cfg, params, steps_per_sync=32)
    return lambda: [r for i in range(0, n, b) for r in gen.generate(rows[i:i + b])]

  def engine(proposer=None, draft_params=None):
    eng = Engine(cfg, params, EngineConfig(num_slots=b), max_len, proposer=proposer,
                 speculation="always", draft_params=draft_params)
    reqs = [EngineRequest(i, list(r.prompt_ids), r.max_new_tokens,
                          np.asarray(jax.random.key_data(r.key))) for i, r in enumerate(rows)]

    def go():
      eng.reset_prefix_cache()  # no round reuses an earlier one's prompts
      out = [None] * n
      eng.run(reqs, lambda res: out.__setitem__(res.uid, res.tokens))
      return out
    return eng, go

  tokens_of = lambda out: [r if isinstance(r, list) else r.tokens for r in out]

  def counters(eng):
    """(row verifications, row slots of its steps, tokens emitted, prompt tokens reused) so far."""
    st = eng.stats
    return st.row_steps, st.steps * eng.cfg.num_slots, st.decode_tokens, st.prefill_tokens_saved
  base = {"model": FLAGS.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "slots": b, "requests": n,
          "budgets": FLAGS.budgets, "prompt_tokens": prompt_len,
          "shared_header": len(header)}
  for method in FLAGS.methods:
    job = GenerateJob(prompts="-", output="-", speculative=method,
                      num_draft_tokens=FLAGS.num_draft_tokens,
                      draft_heads=eagle_dir if method == "eagle" else None)
    modes = {"plain-static": (None, plain_static()), "plain-engine": (None, engine()[1]),
             "spec-engine": engine(*make_proposer(job, cfg, params, None))}
    ref = tokens_of(modes["plain-static"][1]())
    identical = {}
    for name, (_, run) in modes.items():  # compile (and the outputs' check)
      identical[name] = tokens_of(run()) == ref
    new_tokens = sum(len(t) for t in ref)
    snapshot = {name: None if g is None else counters(g) for name, (g, _) in modes.items()}
    times = {name: [] for name in modes}
    for _ in range(FLAGS.repeats):  # interleaved: drift hits every mode alike
      for name, (_, run) in modes.items():
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
    result = dict(base, method=method, modes={})
    for name, (g, _) in modes.items():
      t = float(np.median(times[name]))
      ratios = [a / c for a, c in zip(times["plain-static"], times[name])]
      entry = {"seconds": round(t, 4), "tokens_per_second": round(new_tokens / t, 1),
               "speedup_over_plain_static": round(float(np.median(ratios)), 3),
               "speedup_per_repeat": [round(x, 3) for x in ratios],
               "identical_to_plain": identical[name]}
      if g is not None:  # this mode's timed rounds only
        v, s, e, p = np.subtract(counters(g), snapshot[name])
        entry["tau"] = round(e / max(v, 1), 3)
        entry["occupancy"] = round(v / max(s, 1), 3)
        entry["prefill_tokens_saved"] = int(p) // FLAGS.repeats
      result["modes"][name] = entry
    print(json.dumps(result), file=sys.stderr, flush=True)
    output.append_jsonl(FLAGS.results, [result])


if __name__ == "__main__":
  app.run(main)
