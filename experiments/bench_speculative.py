"""Speculative decoding vs plain decoding, side by side in one run: tau and wall-clock speedup.

  python experiments/bench_speculative.py                 # embedded model, batch 1, 4, 16

Prompts are held-out Python standard-library source (the embedded model's domain); each method
generates --max_new_tokens greedily for the same prompts as plain decoding, and its output is
checked to be identical. Per batch size: plain decode tokens/s, then per method tau (mean tokens
per target forward per row, bonus token included), per-depth acceptance, decode tokens/s and
speedup = plain time / method time for the same batch (wall time of generate, prompt included),
the median over --repeats interleaved rounds after warm-up, with speculation forced on (policy
"always") and as users get it (policy "auto": each batch speculates with the proposer's tree or
a smaller one, or decodes plainly, by measured speed; the warm-up batches let it measure them),
and with the auto policy limited to on / off (the proposer's tree or plain decoding). Results
are appended to experiments/results/bench_speculative.jsonl.

Each batch size also records what the device charges for verification: the target's forward
over T tokens per row against one token (`verify_cost`, medians of interleaved timings of a
compiled loop of forwards; speedup cannot exceed about tau / verify_cost(T)).
`--model=preset:wide` (random weights, the embedded model's vocabulary at 126M parameters,
prompts from the embedded tokenizer) is too large for a CPU's caches, so its decode step is
bound by memory, as on accelerators.
"""

from __future__ import annotations

import datetime
import json
import sys
from functools import partial
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_string("model", "embedded", "Target model: 'embedded', a model directory, or "
                    "preset:NAME (random weights, no EOS; prompts from the embedded tokenizer).")
flags.DEFINE_list("methods", ["ngram", "recycling", "layerskip"], "Proposers to measure: "
                  "ngram, lookahead, recycling, layerskip, layerskip-fallback (with Big-Little's "
                  "fallback), draft, medusa, hydra, hydra++ (with the prefix "
                  "layer), eagle (a chain), eagle-ttt (a chain, drafted by a draft trained with the "
                  "training-time test), eagle-tree "
                  "(EAGLE-2 dynamic trees).")
flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes.")
flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per prompt.")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length (tokens of held-out source).")
flags.DEFINE_integer("num_draft_tokens", 4, "Chain length for ngram / layerskip.")
flags.DEFINE_string("tree", "4,2,1,1", "Recycling tree branching.")
flags.DEFINE_string("dynamic_tree", "dynamic", "eagle-tree: dynamic or dynamic:NODES,TOPK,DEPTH.")
flags.DEFINE_string("draft_layers", None, "layerskip: layers kept (default: first half).")
flags.DEFINE_string("draft_heads", None, "medusa: heads written by jaxinfer train-draft "
                    "(default for the embedded model: the quickstart's, medusa-400).")
flags.DEFINE_string("hydra_heads", None, "hydra: heads written by jaxinfer train-draft "
                    "--method=hydra (default for the embedded model: hydra-400, from "
                    "experiments/train_heads.py --method=hydra).")
flags.DEFINE_string("hydrapp_heads", None, "hydra++: Hydra heads with the prefix layer "
                    "(train-draft --method=hydra --prefix_layer; default for the embedded model: "
                    "hydrapp-400-cached, from experiments/train_heads.py --method=hydra "
                    "--prefix_layer --hidden_cache).")
flags.DEFINE_string("eagle_ttt_draft", None, "eagle-ttt: an EAGLE draft trained with the "
                    "training-time test (default for the embedded model: eagle-v1024-ttt3-400, "
                    "from experiments/train_heads.py --method=eagle --draft_vocab=1024 "
                    "--ttt_steps=3); drafted as a chain.")
flags.DEFINE_string("eagle_draft", None, "eagle: the draft layer written by jaxinfer train-draft "
                    "--method=eagle (default for the embedded model: eagle-v1024-400, from "
                    "experiments/train_heads.py --method=eagle --draft_vocab=1024).")
flags.DEFINE_float("draft_fallback", 0.5, "layerskip-fallback: Big-Little's fallback "
                   "confidence for the layer-skip draft.")
flags.DEFINE_integer("repeats", 5, "Interleaved timed runs; the median ratio is reported.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_speculative.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS


def forward_costs(cfg, params, batch: int, sizes, repeats: int = 5, steps: int = 20) -> dict:
  """{T: the target's forward over T tokens per row (over a cache, logits included) / over one
  token}, medians of `repeats` interleaved timings of a compiled loop of `steps` forwards."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer import model as M
  from jaxinfer.kv_cache import KVCache

  def loop(t):
    @jax.jit
    def run(params, cache):
      def body(i, cache):
        tokens = jnp.full((batch, t), 5, jnp.int32) + i
        positions = jnp.broadcast_to(100 + i + jnp.arange(t), (batch, t))
        hidden, cache = M.forward(params, tokens, positions, cfg, cache, kv_source="cache")
        logits = M.logits(params, hidden)  # (kept: its result feeds the next iteration)
        return jax.tree_util.tree_map(lambda x: x + 0 * logits[0, 0, 0].astype(x.dtype), cache)
      return jax.lax.fori_loop(0, steps, body, cache)
    return run

  cache = KVCache.init(cfg, batch, 128 + steps + max(sizes))
  fns = {t: loop(t) for t in sorted({1, *sizes})}
  for f in fns.values():
    jax.block_until_ready(f(params, cache))
  times = {t: [] for t in fns}
  for _ in range(repeats):
    for t, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, cache))
      times[t].append(time.perf_counter() - t0)
  one = float(np.median(times[1]))
  return {t: round(float(np.median(v)) / one, 3) for t, v in times.items()}


def main(argv):
  del argv
  import dataclasses
  import time

  import jax
  import numpy as np

  from jaxinfer import checkpoint, embedded
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  from jaxinfer.generation import Generator, RowRequest
  from jaxinfer.runner import GenerateJob
  from jaxinfer.speculative.registry import build as make_proposer
  from jaxinfer.speculative.decode import SpeculativeGenerator

  preset = FLAGS.model.startswith("preset:")
  model_dir = checkpoint.resolve_model_dir("embedded" if preset else FLAGS.model)
  heads = {"medusa": FLAGS.draft_heads, "hydra": FLAGS.hydra_heads,
           "hydra++": FLAGS.hydrapp_heads, "eagle": FLAGS.eagle_draft,
           "eagle-ttt": FLAGS.eagle_ttt_draft}
  for method, default in (("medusa", "medusa-400"), ("hydra", "hydra-400"),
                          ("hydra++", "hydrapp-400-cached"), ("eagle", "eagle-v1024-400"),
                          ("eagle-ttt", "eagle-v1024-ttt3-400")):
    if heads[method] is None and FLAGS.model == "embedded":
      heads[method] = str(Path(model_dir).parent / default)
  cfg, params, tok = checkpoint.load_model(str(model_dir))
  if preset:  # random weights; no EOS, so every row generates its whole budget
    cfg = dataclasses.replace(PRESETS[FLAGS.model.split(":", 1)[1]], eos_token_ids=())
    if cfg.vocab_size < tok.vocab_size:
      raise ValueError(f"--model={FLAGS.model}: its vocabulary ({cfg.vocab_size}) is smaller "
                       f"than the embedded tokenizer's ({tok.vocab_size})")
    params = M.init_params(cfg, jax.random.key(0))
  sizes = [int(b) for b in FLAGS.batch_sizes]
  all_prompts = embedded.heldout_prompts(tok, max(sizes), FLAGS.prompt_tokens)
  base = {"model": FLAGS.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "max_new_tokens": FLAGS.max_new_tokens,
          "prompt_tokens": FLAGS.prompt_tokens}

  def clock(gen, rows):
    t0 = time.perf_counter()
    out = gen.generate(rows)
    return time.perf_counter() - t0, out

  for b in sizes:
    rows = [RowRequest(p, FLAGS.max_new_tokens, jax.random.key(i))
            for i, p in enumerate(all_prompts[:b])]
    plain_gen = Generator(cfg, params, steps_per_sync=32)
    plain = plain_gen.generate(rows)  # compile
    new_tokens = sum(len(r.tokens) for r in plain)
    row = dict(base, batch_size=b, methods={}, params=cfg.num_params())
    plain_times = []
    tree_sizes = set()  # the methods' trees: their verify cost is measured after them
    for method in FLAGS.methods:
      # "eagle-tree": the EAGLE draft growing EAGLE-2 dynamic trees (--dynamic_tree);
      # "hydra++": Hydra heads with the prefix layer
      spec = {"eagle-tree": "eagle", "eagle-ttt": "eagle", "hydra++": "hydra",
              "layerskip-fallback": "layerskip"}.get(method, method)
      tree = FLAGS.dynamic_tree if method == "eagle-tree" else FLAGS.tree
      head_dir = heads.get(method, heads.get(spec))
      job = GenerateJob(prompts="-", output="-", speculative=spec,
                        num_draft_tokens=FLAGS.num_draft_tokens, tree=tree,
                        draft_layers=FLAGS.draft_layers, draft_heads=head_dir,
                        draft_fallback=FLAGS.draft_fallback if method.endswith("-fallback")
                        else 0.0)
      proposer, draft_params = make_proposer(job, cfg, params, None)
      make = partial(SpeculativeGenerator, cfg, params, proposer, draft_params=draft_params,
                     steps_per_sync=16)
      gens = {"always": make(policy="always"), "auto": make(policy="auto"),
              "on_off": make(policy="auto", max_shrinks=0)}
      # compile; the auto policies measure their modes (two batches each: compile, measure)
      warmup = {"always": 2, "on_off": 4, "auto": 2 * len(gens["auto"].ladder) + 2}
      outs = {k: [g.generate(rows) for _ in range(warmup[k])][-1] for k, g in gens.items()}
      ratios = {k: [] for k in gens}
      for _ in range(FLAGS.repeats):  # interleaved: drift hits all three alike
        tp, _ = clock(plain_gen, rows)
        plain_times.append(tp)
        for k, g in gens.items():
          tk, outs[k] = clock(g, rows)
          ratios[k].append(tp / tk)
      st = gens["always"].stats
      same = sum(a.tokens == c.tokens == d.tokens == e.tokens
                 for a, c, d, e in zip(plain, outs["always"], outs["auto"], outs["on_off"]))
      auto = gens["auto"].stats
      speedup = float(np.median(ratios["always"]))
      result = {"tau": round(st.mean_accepted_tokens, 3),
                "per_depth_acceptance": [round(x, 3) for x in st.per_depth_acceptance()],
                "speedup": round(speedup, 3),
                "speedup_per_repeat": [round(x, 3) for x in ratios["always"]],
                "speedup_over_tau": round(speedup / st.mean_accepted_tokens, 3),
                "speedup_auto_policy": round(float(np.median(ratios["auto"])), 3),
                "auto_policy": auto.decision(),
                "auto_best_tree": auto.best_tree if (auto.spec_tps or 0) >= (
                    auto.plain_tps or 0) else "plain",
                "auto_tree_sizes": auto.metrics()["tree_sizes"],
                "speedup_auto_on_off": round(float(np.median(ratios["on_off"])), 3),
                "on_off_policy": gens["on_off"].stats.decision(),
                "identical_to_plain": f"{same}/{b}", "tree_size": proposer.tree_size,
                "draft_share": None if st.draft_share is None else round(st.draft_share, 3),
                "draft_heads": Path(head_dir).name if head_dir else None}
      row["methods"][method] = result
      tree_sizes.add(proposer.tree_size)
      print(f"  batch {b} {method}: {json.dumps(result)}", file=sys.stderr, flush=True)
    row["verify_cost"] = forward_costs(cfg, params, b, tree_sizes)
    print(f"  batch {b} verify cost (T: forward over T tokens / one): {row['verify_cost']}",
          file=sys.stderr, flush=True)
    row["plain_tokens_per_second_median"] = round(new_tokens / float(np.median(plain_times)), 1)
    output.append_jsonl(FLAGS.results, [row])


if __name__ == "__main__":
  app.run(main)
