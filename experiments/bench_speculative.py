"""Speculative decoding against the default engine's plain decoding, side by side in one run.

  python experiments/bench_speculative.py                 # embedded model, batch 1, 4, 16
  python experiments/bench_speculative.py --heads=DIR     # + the draft heads found in DIR

Prompts: one --prompt_tokens window (the middle of the file) from each of --num_prompts distinct
held-out Python standard-library files (the embedded model's domain, text it was not trained
on), the same prompts at every batch size: batch B is all of them through B slots (batch 1: one
at a time). Each method runs through the Python API as users get it,
`jaxinfer.LLM(model, batch_size=B, speculative=METHOD, speculation=...)`, with speculation forced
on ("always") and with the default policy ("auto": per dispatch the proposer's tree, a smaller
one or plain decoding, by measured speed; a tree is compiled and tried only once the work in
sight pays for its compilation, which on this CPU takes more work than these calls add up to, so
here it decodes plainly), against `jaxinfer.LLM(model, batch_size=B)` with no speculation: the
continuous-batching engine. Compilation is left out by warm-up calls (until two in a row
compile nothing). Then --repeats
rounds; in each, per method: plain, always, auto, one after the other, so that drift hits them
alike.

Per batch size and method: speedup = plain wall time / method wall time of the same round
(generate() of every prompt, less any compilation in the call: the auto policy compiles each tree
size the first time it tries one), its median, min-max and quartiles over rounds; tau (mean
tokens per target forward per row, bonus token included) and per-depth acceptance; end-to-end
and generation tokens/s (`llm.metrics`); how many completions are identical to plain decoding's
in every round. Also what the device charges for verification: the target's forward over T
tokens per row against one token (`verify_cost`; speedup cannot exceed about tau /
verify_cost(T)).
`--model=preset:wide` (random weights, the embedded model's vocabulary at 126M parameters, no
EOS) is too large for a CPU's caches, so its decode step is bound by memory, as on accelerators.
Records are appended to experiments/results/bench_speculative.jsonl, one per batch size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from jaxinfer import output
from jaxinfer.speculative import registry

flags.DEFINE_string("model", "embedded", "Target model: 'embedded', a model directory, or "
                    "preset:NAME (random weights, no EOS; prompts from the embedded tokenizer).")
flags.DEFINE_list("methods", ["ngram", "lookahead", "recycling", "layerskip"], "Proposers to "
                  "measure: ngram, lookahead, recycling, layerskip, layerskip-fallback (with "
                  "Big-Little's fallback), draft (--draft_model), medusa, hydra, hydra++ (with "
                  "the prefix layer), eagle (a chain), eagle-ttt (a chain, drafted by a draft "
                  "trained with the training-time test), eagle-tree (EAGLE-2 dynamic trees).")
flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Slots (the same prompts at each).")
flags.DEFINE_integer("num_prompts", 32, "Prompts, each from a distinct held-out file.")
flags.DEFINE_integer("max_new_tokens", 96, "Tokens generated per prompt (greedy).")
flags.DEFINE_integer("prompt_tokens", 128, "Prompt length (tokens of held-out source).")
flags.DEFINE_string("dtype", "float32", "Both sides' dtype.")
flags.DEFINE_integer("num_draft_tokens", 4, "Chain length for ngram / layerskip / draft.")
flags.DEFINE_string("tree", "4,2,1,1", "Recycling tree branching.")
flags.DEFINE_string("dynamic_tree", "dynamic", "eagle-tree: dynamic or dynamic:NODES,TOPK,DEPTH.")
flags.DEFINE_string("draft_layers", None, "layerskip: layers kept (default: first half).")
flags.DEFINE_string("draft_model", None, "draft: the draft model's directory.")
flags.DEFINE_float("draft_fallback", 0.5, "layerskip-fallback: Big-Little's fallback "
                   "confidence for the layer-skip draft.")
flags.DEFINE_string("heads", None, "The folder experiments/train_heads.py writes heads into "
                    "(default: the embedded model's cache folder); given, and --methods not, the "
                    "head methods whose heads it holds are measured too.")
flags.DEFINE_string("draft_heads", None, "medusa: heads written by jaxinfer train-draft "
                    "(default: --heads/medusa-400, the quickstart's).")
flags.DEFINE_string("hydra_heads", None, "hydra: heads written by jaxinfer train-draft "
                    "--method=hydra (default: --heads/hydra-400, from experiments/train_heads.py "
                    "--method=hydra).")
flags.DEFINE_string("hydrapp_heads", None, "hydra++: Hydra heads with the prefix layer "
                    "(default: --heads/hydrapp-400-cached, from experiments/train_heads.py "
                    "--method=hydra --prefix_layer --hidden_cache).")
flags.DEFINE_string("eagle_draft", None, "eagle, eagle-tree: the draft layer written by jaxinfer "
                    "train-draft --method=eagle (default: --heads/eagle-v1024-400, from "
                    "experiments/train_heads.py --method=eagle --draft_vocab=1024).")
flags.DEFINE_string("eagle_ttt_draft", None, "eagle-ttt: an EAGLE draft trained with the "
                    "training-time test (default: --heads/eagle-v1024-ttt3-400, from "
                    "experiments/train_heads.py --method=eagle --draft_vocab=1024 --ttt_steps=3).")
flags.DEFINE_integer("repeats", 5, "Alternating timed rounds.")
flags.DEFINE_integer("max_warmup_calls", 8, "Warm-up calls per LLM at most (until one compiles "
                     "nothing).")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_speculative.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS

PROTOCOL = "held-out files, vs engine plain"
# method -> (its heads flag, the folder train_heads.py names its default run of that kind)
HEADS = {"medusa": ("draft_heads", "medusa-400"), "hydra": ("hydra_heads", "hydra-400"),
         "hydra++": ("hydrapp_heads", "hydrapp-400-cached"),
         "eagle": ("eagle_draft", "eagle-v1024-400"), "eagle-tree": ("eagle_draft",
                                                                      "eagle-v1024-400"),
         "eagle-ttt": ("eagle_ttt_draft", "eagle-v1024-ttt3-400")}
SPEC = {"eagle-tree": "eagle", "eagle-ttt": "eagle", "hydra++": "hydra",
        "layerskip-fallback": "layerskip"}  # a method's --speculative


def forward_costs(cfg, params, batch: int, sizes, repeats: int = 5, steps: int = 20) -> dict:
  """{T: the target's forward over T tokens per row (over a cache, logits included) / over one
  token}, medians of `repeats` interleaved timings of a compiled loop of `steps` forwards."""
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


def spread(xs) -> dict:
  """Median, min-max and quartiles of per-round values."""
  import numpy as np
  q1, med, q3 = np.percentile(xs, [25, 50, 75])
  return {"median": round(float(med), 3), "min": round(float(min(xs)), 3),
          "max": round(float(max(xs)), 3), "iqr": [round(float(q1), 3), round(float(q3), 3)]}


def method_options(method: str, heads_dir: Path | None) -> dict:
  spec = SPEC.get(method, method)
  opts = dict(speculative=spec,
              draft_fallback=FLAGS.draft_fallback if method.endswith("-fallback") else 0.0)
  if method == "eagle-tree":
    opts["tree"] = FLAGS.dynamic_tree
  elif spec in registry.CHAINS:  # (each method gets the options it reads)
    opts["num_draft_tokens"] = FLAGS.num_draft_tokens
  if spec == "recycling" or (spec in ("lookahead", "medusa", "hydra")
                             and FLAGS.tree.startswith("nodes:")):
    opts["tree"] = FLAGS.tree
  if spec == "layerskip":
    opts["draft_layers"] = FLAGS.draft_layers
  if spec == "draft":
    opts["draft_model"] = FLAGS.draft_model
  if method in HEADS:
    flag, default = HEADS[method]
    opts["draft_heads"] = getattr(FLAGS, flag) or (str(heads_dir / default) if heads_dir
                                                   else None)
  return opts


def main(argv):
  del argv
  import jax
  import numpy as np

  import jaxinfer
  from jaxinfer import checkpoint
  from jaxinfer import model as M
  from jaxinfer.config import PRESETS
  from jaxinfer.embedded import heldout_file_windows

  t_run = time.perf_counter()
  preset = FLAGS.model.startswith("preset:")
  model, tmp = FLAGS.model, None
  base_dir = checkpoint.resolve_model_dir("embedded") if preset or model == "embedded" else None
  if preset:  # random weights written as a model directory; no EOS: every row runs its budget
    _, _, tok = checkpoint.load_model(str(base_dir))
    cfg = dataclasses.replace(PRESETS[FLAGS.model.split(":", 1)[1]], eos_token_ids=())
    if cfg.vocab_size < tok.vocab_size:
      raise ValueError(f"--model={FLAGS.model}: its vocabulary ({cfg.vocab_size}) is smaller "
                       f"than the embedded tokenizer's ({tok.vocab_size})")
    tmp = tempfile.TemporaryDirectory()
    model = str(checkpoint.save_hf(Path(tmp.name) / "model", cfg,
                                   M.init_params(cfg, jax.random.key(0))))
  heads_dir = Path(FLAGS.heads) if FLAGS.heads else (base_dir.parent if base_dir else None)
  methods = list(FLAGS.methods)
  if FLAGS.heads and not FLAGS["methods"].present:
    methods += [m for m in HEADS if (heads_dir / HEADS[m][1]).is_dir()]
  sampling = jaxinfer.SamplingParams(max_new_tokens=FLAGS.max_new_tokens)
  # one replica: batch size B is B rows of one engine, however many devices the host has
  common = dict(dtype=FLAGS.dtype, progress=False, mesh="data:1")
  prompts = None

  def warm(llm) -> float:
    """Calls until two in a row compile nothing (a later call that compiles has that time
    left out); the seconds spent."""
    spent, quiet = 0.0, 0
    for _ in range(FLAGS.max_warmup_calls):
      llm.generate(prompts, sampling)
      spent += llm.metrics["compile_seconds"]
      quiet = quiet + 1 if llm.metrics["compilations"] == 0 else 0
      if quiet == 2:
        break
    return round(spent, 2)

  def timed(llm):
    llm.reset_prefix_cache()  # each round computes its prompts, as a job of its own would
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling)
    seconds = time.perf_counter() - t0 - llm.metrics["compile_seconds"]  # compilation left out
    return seconds, [o.completion_ids for o in outs], dict(llm.metrics)

  for b in map(int, FLAGS.batch_sizes):
    plain = jaxinfer.LLM(model, batch_size=b, **common)
    if prompts is None:
      prompts = heldout_file_windows(tok if preset else plain.tokenizer, FLAGS.num_prompts,
                                     FLAGS.prompt_tokens)
    llms = {m: {mode: jaxinfer.LLM(model, batch_size=b, speculation=mode,
                                   **method_options(m, heads_dir), **common)
                for mode in ("always", "auto")} for m in methods}
    compile_s = {"plain": warm(plain)} | {f"{m} {mode}": warm(llm) for m, d in llms.items()
                                          for mode, llm in d.items()}
    runs = {m: {"plain": [], "always": [], "auto": []} for m in methods}
    for r in range(FLAGS.repeats):
      # per method: plain, always, auto, then the other way round (drift and each mode's place
      # in a round hit them alike: a run right after another's leaves it caches and garbage)
      for m in methods:
        for mode in ("plain", "always", "auto")[::1 if r % 2 == 0 else -1]:
          runs[m][mode].append(timed(plain if mode == "plain" else llms[m][mode]))
        print(f"  batch {b} round {r + 1} {m}: " + ", ".join(
            f"{k} {v[-1][0]:.3f}s" for k, v in runs[m].items()), file=sys.stderr, flush=True)
    reference = runs[methods[0]]["plain"][0][1] if methods else None
    plain_runs = [x for m in methods for x in runs[m]["plain"]]
    row = {"protocol": f"{FLAGS.num_prompts} {PROTOCOL}", "model": FLAGS.model,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "dtype": FLAGS.dtype,
           "cpu_threads": os.cpu_count(), "batch_size": b, "num_prompts": FLAGS.num_prompts,
           "prompt_set": f"the middle {FLAGS.prompt_tokens}-token window of each of the first "
                         f"{FLAGS.num_prompts} held-out stdlib files (by path) longer than that",
           "prompt_tokens": FLAGS.prompt_tokens, "max_new_tokens": FLAGS.max_new_tokens,
           "baseline": f"jaxinfer.LLM(model, batch_size={b}): the engine, no speculation",
           "repeats": FLAGS.repeats,
           "mode_order": "plain, always, auto; reversed every other round",
           "params": plain.config.num_params(),
           "compile_seconds": compile_s,
           "plain_tokens_per_second_median": round(float(np.median(
               [x[2]["end_to_end_tokens_per_second"] for x in plain_runs])), 1),
           "plain_generation_tokens_per_second_median": round(float(np.median(
               [x[2]["generation_tokens_per_second"] for x in plain_runs])), 1),
           "plain_identical_across_rounds": all(x[1] == reference for x in plain_runs),
           "methods": {}}
    for m in methods:
      p, a, u = (runs[m][k] for k in ("plain", "always", "auto"))
      ratios = {k: [x[0] / y[0] for x, y in zip(p, v)] for k, v in (("always", a), ("auto", u))}
      same = sum(all(x[1][i] == reference[i] for x in a + u) for i in range(len(reference)))
      last, auto = a[-1][2], u[-1][2]
      med = lambda xs, key: round(float(np.median([x[2][key] for x in xs])), 1)
      sa, su = spread(ratios["always"]), spread(ratios["auto"])
      steps = sum(x[2].get("verify_steps", 0) for x in u)  # the auto policy's speculative rows
      spec_batches = sum(x[2].get("speculative_batches", 0) for x in u)
      tau_auto = round(sum(x[2].get("mean_accepted_tokens", 0) * x[2].get("verify_steps", 0)
                           for x in u) / steps, 3) if steps else None
      result = {
          "tau": round(last["mean_accepted_tokens"], 3),
          "per_depth_acceptance": [round(x, 3) for x in last["per_depth_acceptance"]],
          "speedup": sa["median"], "speedup_spread": [sa["min"], sa["max"]],
          "speedup_iqr": sa["iqr"], "speedup_per_repeat": [round(x, 3) for x in ratios["always"]],
          "speedup_over_tau": round(sa["median"] / last["mean_accepted_tokens"], 3),
          "speedup_auto_policy": su["median"], "speedup_auto_spread": [su["min"], su["max"]],
          "speedup_auto_iqr": su["iqr"],
          "speedup_auto_per_repeat": [round(x, 3) for x in ratios["auto"]],
          "tau_auto": tau_auto, "auto_speculative_batches": spec_batches,
          "auto_plain_batches": sum(x[2].get("plain_batches", 0) for x in u),
          "auto_policy": auto.get("speculation"), "auto_tree_sizes": auto.get("tree_sizes"),
          "end_to_end_tokens_per_second": {"plain": med(p, "end_to_end_tokens_per_second"),
                                           "always": med(a, "end_to_end_tokens_per_second"),
                                           "auto": med(u, "end_to_end_tokens_per_second")},
          "generation_tokens_per_second": {"plain": med(p, "generation_tokens_per_second"),
                                           "always": med(a, "generation_tokens_per_second"),
                                           "auto": med(u, "generation_tokens_per_second")},
          # the auto policy compiles a mode it tries for the first time (left out of speedup)
          "compile_seconds_in_rounds": round(sum(x[2]["compile_seconds"] for x in a + u), 2),
          "rounds_compiling": sum(x[2]["compilations"] > 0 for x in a + u),
          "identical_to_plain": f"{same}/{len(reference)}",
          "tree_size": max(map(int, last["tree_sizes"])),
          "draft_heads": (Path(llms[m]["always"].options.draft_heads).name
                          if llms[m]["always"].options.draft_heads else None)}
      row["methods"][m] = result
      print(f"  batch {b} {m}: {json.dumps(result)}", file=sys.stderr, flush=True)
    sizes = {r["tree_size"] for r in row["methods"].values()}
    row["verify_cost"] = forward_costs(plain.config, plain.params, b, sizes) if sizes else {}
    row["run_seconds"] = round(time.perf_counter() - t_run, 1)
    row["load_average_1m"] = round(os.getloadavg()[0], 2)  # other jobs on a shared CPU show here
    output.append_jsonl(FLAGS.results, [row])  # per batch size: a timeout keeps the rest
    print(f"  batch {b}: plain {row['plain_tokens_per_second_median']} tok/s, verify cost "
          f"{row['verify_cost']}", file=sys.stderr, flush=True)
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  app.run(main)
