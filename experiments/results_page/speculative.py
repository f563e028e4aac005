"""The sections of bench_speculative.jsonl (a row per record and method) and
bench_spec_batching.jsonl (a record per method, its modes side by side)."""

from __future__ import annotations

from .markdown import NA, Section, field, fmt, part, ratio, short_model
from .results import spec_rows


def depths(values) -> str:
  """Per-depth acceptance; a long run of trailing zeros (a trie's unused depths) is counted."""
  if not values:
    return NA
  values = list(values)
  zeros = 0
  while len(values) > 8 and values[-1] == 0:
    values.pop()
    zeros += 1
  text = ", ".join(f"{x:.2f}" for x in values)
  return text + (f", then 0 × {zeros}" if zeros else "")


def auto_chose(m: dict) -> str:
  best = m.get("auto_best_tree")
  if best is not None:
    return "plain" if best == "plain" else f"{best}-token trees"
  policy = m.get("auto_policy") or ""
  return "plain" if policy.startswith(("speculation turned itself off", "decoded plainly")) else (
      "speculate" if policy else NA)


def verify_cost(row: dict):
  """The target's forward over the row's tree against one token, as the same run measured it."""
  return row.get("verify_cost", {}).get(str(row.get("tree_size")))


def spread(r: dict, key: str) -> str:
  """A [min, max] pair of per-round speedups."""
  lo_hi = r.get(key)
  return f"{lo_hi[0]:.2f}–{lo_hi[1]:.2f}" if lo_hi else NA


def tokens_per_second(r: dict) -> str:
  """plain / always / auto generation tokens/s (compilation left out), then end to end where a
  call compiled (the auto policy trying a tree size for the first time)."""
  gen, e2e = (r.get(k) or {} for k in ("generation_tokens_per_second",
                                        "end_to_end_tokens_per_second"))
  text = lambda v: " / ".join(fmt(v.get(m), 0) for m in ("plain", "always", "auto"))
  return text(gen) + (f" ({text(e2e)} end to end)" if e2e != gen else "")


def compile_seconds(r: dict) -> str:
  """plain / always / auto seconds of compilation (the warm-up calls', which every process
  pays once before its first tokens; the timed calls leave it out)."""
  paid = r.get("compile_seconds")
  if not isinstance(paid, dict):
    return NA
  name = r.get("method")
  return " / ".join(fmt(paid.get(m), 1) for m in ("plain", f"{name} always", f"{name} auto"))


MODEL = ("model", lambda r: short_model(r.get("model")))
# rows of the current protocol (--num_prompts distinct held-out files at every batch size,
# against the engine's plain decoding) carry "protocol"; earlier rows do not
AGAINST_ENGINE = [
    MODEL, field("batch", "batch_size"), field("prompts", "num_prompts"),
    field("rounds", "repeats"), field("plain tok/s", "plain_tokens_per_second_median", 0),
    field("method", "method"), field("tree nodes", "tree_size"),
    field("draft heads", "draft_heads"), field("τ", "tau"),
    field("speedup, always", "speedup", unit="×"),
    ("always, min–max", lambda r: spread(r, "speedup_spread")),
    field("speedup, auto", "speedup_auto_policy", unit="×"),
    ("auto, min–max", lambda r: spread(r, "speedup_auto_spread")),
    field("τ, auto", "tau_auto"), ("auto chose", auto_chose),
    ("tok/s plain / always / auto", tokens_per_second),
    ("compile s plain / always / auto", compile_seconds),
    ("modes' order", lambda r: "reversed every other round" if "reversed" in str(
        r.get("mode_order")) else "plain, always, auto every round"),
    field("identical to plain", "identical_to_plain"), field("note", "note")]
METHODS = [
    MODEL, field("batch", "batch_size"),
    field("plain tok/s", "plain_tokens_per_second_median", 0), field("method", "method"),
    field("tree nodes", "tree_size"), field("draft heads", "draft_heads"), field("τ", "tau"),
    ("per-depth acceptance", lambda r: depths(r.get("per_depth_acceptance"))),
    field("speedup, always", "speedup", unit="×"),
    field("speedup, auto", "speedup_auto_policy", unit="×"), ("auto chose", auto_chose),
    field("draft share", "draft_share"), field("identical to plain", "identical_to_plain")]
COSTS = [
    MODEL, field("params", "params"), field("batch", "batch_size"),
    ("plain decoding", lambda r: "engine" if r.get("protocol") else "static generator"),
    field("method", "method"), field("τ", "tau"), ("verify cost", lambda r: fmt(verify_cost(r))),
    ("bound τ / cost", lambda r: ratio(r["tau"] / verify_cost(r))),
    field("speedup, always", "speedup", unit="×"),
    ("speedup / τ", lambda r: fmt(r["speedup"] / r["tau"])),
    ("speedup, auto (chose)",
     lambda r: f"{ratio(r.get('speedup_auto_policy'))} ({auto_chose(r)})")]
TREE_SIZES = [
    field("batch", "batch_size"), field("method", "method"), field("tree nodes", "tree_size"),
    field("always on", "speedup", unit="×"),
    field("auto, on / off", "speedup_auto_on_off", unit="×"),
    field("auto, shrinking", "speedup_auto_policy", unit="×"), ("auto chose", auto_chose),
    ("measured per tree size", lambda r: ", ".join(
        f"{k}: {v['tokens_per_second'] / 1000:.1f}k" for k, v in r["auto_tree_sizes"].items()))]


def _speculative(recs) -> list[str]:
  rows = spec_rows(recs)
  current = [r for r in rows if r.get("protocol")]
  earlier = [r for r in rows if not r.get("protocol")]
  return (part(
      "Against the engine's plain decoding",
      "`python experiments/bench_speculative.py`: the same prompts at every batch size, one "
      "128-token window (the middle of the file) from each of 32 distinct held-out files; batch "
      "B runs all of them through B slots (batch 1: one at a time). Each method runs through "
      "`jaxinfer.LLM(..., speculative=METHOD, speculation=always|auto)` against "
      "`jaxinfer.LLM(model, batch_size=B)` without speculation, compilation left out by warm-up "
      "calls (its seconds, which a process pays once before its first tokens, in their own "
      "column: beside a timed call's, they decide whether a short job gains); per round and "
      "method: plain, always, auto, in the order its column says (a fixed order measured the "
      "later modes in a warmer, or busier, machine). Speedup: plain wall time / method wall "
      "time of the same round, the median over rounds, then the slowest and fastest round. "
      "τ, auto: over the batches the auto policy speculated. Identical: prompts whose completions "
      "equal plain decoding's in every round, both policies.", AGAINST_ENGINE, current) + part(
      "Earlier runs: B prompts at batch B, against the static generator",
      "Batch 1 measured one prompt; plain decoding was the static generator, not the engine "
      "users get.", METHODS, earlier) + part(
      "Verification cost",
      "The target's forward over T tokens per row against one token, measured in the same run "
      "(`verify_cost`); speedup ≤ about τ / cost. `preset:wide` is the embedded model's "
      "vocabulary at 126M parameters with random weights (`--model=preset:wide "
      "--prompt_tokens=32 --max_new_tokens=192`): far beyond the CPU's caches, so its decode "
      "step is bound by memory, as on accelerators.",
      COSTS, [r for r in rows if verify_cost(r)]) + part(
      "The auto policy's tree sizes",
      "The auto policy with smaller trees, against the policy limited to on / off and against "
      "speculation forced on; the last column is what the policy measured per tree size (decode "
      "tokens/s).", TREE_SIZES, [r for r in rows if "speedup_auto_on_off" in r]))


SPECULATIVE = Section(
    "Speculative decoding",
    "`python experiments/bench_speculative.py --methods=...`: 128-token prompts of held-out "
    "stdlib source, 96 new tokens, greedy, float32; speedup = plain time / method time for the "
    "same prompts, median of interleaved rounds; \"always\" forces the proposer's tree every "
    "batch, \"auto\" is the default policy (the proposer's tree, a smaller one or plain decoding, "
    "by measured speed). τ counts the bonus token. Heads come from `experiments/train_heads.py` "
    "(below); `--heads=DIR` adds the methods whose heads DIR holds.",
    body=_speculative)


# ---------------------------------------------------------------------------------------------
# bench_spec_batching: what its records do not say about their runs, by line index in the file

SPEC_BATCHING_NOTES = {
    **{i: "plain engine: one 128-token prefill lane a step" for i in range(0, 9)},
    **{i: "plain engine: the default lanes (4 × 32)" for i in range(9, 12)},
    7: "plain engine: one 128-token lane a step; before the draft model's own cache was "
       "admitted in chunks too",
    12: "speculation in the engine after its step-ending fix, the prefix cache emptied before "
        "each engine round",
    13: "speculation in the engine: 4 lanes of 32 prompt tokens a step against the "
        "generator's 256-token admission chunks",
    14: "rerun at the final engine code (a dispatch ends at a row's end only while requests "
        "wait)",
    15: "rerun at the final engine code",
    **{i: "after the generator's own slots were removed: the engine against static batches"
       for i in range(19, 24)},
    24: "a draft model's K/V in the engine's pages (an earlier build, not kept then; the same "
        "workload with its own cache per slot: the layerskip row above)",
    25: "a draft model's K/V in the engine's pages, kept: in the same sitting its own cache per "
        "slot (the code before) took 3.09 s for spec, engine and 1.31 s for the plain engine, "
        "against 2.92 s and 1.23 s here",
    26: "a draft model's K/V in the engine's pages, the header's computed once: in the same "
        "sitting its own cache per slot (the code before, the header run again for every "
        "admission) took 7.19 s for spec, engine and 3.31 s for the plain engine, against 5.99 s "
        "and 2.94 s here",
}


def _mode(mode: str):
  """A mode's time ratio against plain static batches."""
  return lambda r: ratio(r["modes"][mode]["speedup_over_plain_static"]) if mode in r["modes"] \
      else NA


def _gain(fast: str, slow: str):
  return lambda r: NA if fast not in r["modes"] or slow not in r["modes"] else ratio(
      r["modes"][fast]["speedup_over_plain_static"] /
      r["modes"][slow]["speedup_over_plain_static"])


def _with_occupancy(mode: str):
  return lambda r: NA if mode not in r["modes"] else \
      f"{_mode(mode)(r)} ({r['modes'][mode]['occupancy']:.2f})"


COMMON = [field("method", "method"), field("slots", "slots"), field("requests", "requests")]
TAU = ("τ", lambda r: fmt(r["modes"].get("spec-continuous", {}).get("tau")))
IDENTICAL = ("identical", lambda r: fmt(all(m.get("identical_to_plain")
                                            for m in r["modes"].values())))
NOTE = field("note", "note")
CONTINUOUS = COMMON + [
    field("prompt tokens", "prompt_tokens"), field("prefill chunk", "prefill_chunk"),
    ("plain engine", _mode("plain-engine")),
    ("spec, static (occupancy)", _with_occupancy("spec-static")),
    ("spec, continuous (occupancy)", _with_occupancy("spec-continuous")),
    ("continuous / static", _gain("spec-continuous", "spec-static")), TAU, IDENTICAL, NOTE]
REUSE = COMMON + [
    field("shared header", "shared_header"), field("prompt tokens", "prompt_tokens"),
    ("plain engine", _mode("plain-engine")), ("spec, static", _mode("spec-static")),
    ("spec, continuous", _mode("spec-continuous")),
    ("spec, continuous, no reuse", _mode("spec-continuous-no-reuse")),
    ("reuse gain", _gain("spec-continuous", "spec-continuous-no-reuse")),
    ("spec, engine", _mode("spec-engine")),
    ("engine / continuous", _gain("spec-engine", "spec-continuous")), TAU,
    ("tokens reused", lambda r: fmt(r["modes"]["spec-continuous"].get("prefill_tokens_saved"))),
    ("rounds", lambda r: len(r["modes"]["plain-static"]["speedup_per_repeat"])), IDENTICAL, NOTE]
CHUNKED = COMMON + [
    field("prompt tokens", "prompt_tokens"), field("prefill chunk", "prefill_chunk"),
    ("plain engine", _mode("plain-engine")), ("spec, static", _mode("spec-static")),
    ("spec, continuous", _mode("spec-continuous")),
    ("spec, continuous, whole", _mode("spec-continuous-whole")),
    ("chunked / whole", _gain("spec-continuous", "spec-continuous-whole")),
    ("spec, engine", _mode("spec-engine")),
    ("engine / chunked", _gain("spec-engine", "spec-continuous")),
    ("longest admission call, chunked / whole ms",
     lambda r: f"{r['modes']['spec-continuous']['longest_prefill_call_ms']:.0f} / "
               f"{r['modes']['spec-continuous-whole']['longest_prefill_call_ms']:.0f}"),
    TAU, IDENTICAL, NOTE]
ENGINE = COMMON + [
    field("shared header", "shared_header"), field("prompt tokens", "prompt_tokens"),
    ("plain engine", _mode("plain-engine")),
    ("spec, static (occupancy)", _with_occupancy("spec-static")),
    ("spec, engine (occupancy)", _with_occupancy("spec-engine")),
    ("engine / static", _gain("spec-engine", "spec-static")),
    ("spec engine / plain engine", _gain("spec-engine", "plain-engine")),
    ("τ", lambda r: fmt(r["modes"]["spec-engine"].get("tau"))),
    ("tokens reused", lambda r: fmt(r["modes"]["spec-engine"].get("prefill_tokens_saved"))),
    ("rounds", lambda r: len(r["modes"]["plain-static"]["speedup_per_repeat"])), IDENTICAL, NOTE]


def _kind(r: dict) -> str:
  """Which of the comparisons a record's modes make (the generator's continuous slots, compared
  until they were removed, or the engine against static batches)."""
  modes = r["modes"]
  return ("engine" if "spec-continuous" not in modes else
          "reuse" if "spec-continuous-no-reuse" in modes else
          "chunked" if "spec-continuous-whole" in modes else "continuous")


def _spec_batching(recs) -> list[str]:
  rows = [{**r, "note": SPEC_BATCHING_NOTES.get(i)} for i, r in enumerate(recs)]
  plain, reuse, chunked, engine = ([r for r in rows if _kind(r) == k]
                                   for k in ("continuous", "reuse", "chunked", "engine"))
  return (part("The engine against static batches", "Speculation inside the engine (slots "
               "refilled, prompts prefilled in lanes beside verification, shared pages read by "
               "reference) against the static scheduler's batches (each prompt prefilled whole, "
               "rows held until the batch's longest ends).", ENGINE, engine) +
          part("Continuous against static batches", "Until the generator's own slots were "
               "removed (the records below): speculation in them, a finished row's slot refilled "
               "at the next host round trip.", CONTINUOUS, plain) +
          part("Prefix reuse", "The generator's slots, until removed. `--shared_header=N`: "
               "one header of held-out source before every prompt; \"tokens reused\" is one "
               "round's prompt tokens whose K/V were copied rather than computed. \"spec, "
               "engine\": speculation inside the engine, the header's pages read by "
               "reference.", REUSE, reuse) +
          part("Chunked admission", "The generator's slots, until removed. Prompts longer "
               "than its prefill chunk were admitted in chunks, a verification step of the "
               "running rows between chunks; \"whole\" admits each in one call. Longest "
               "admission call: the longest the running rows stood still (one more round, "
               "every call waited for). \"spec, engine\": speculation inside the engine, "
               "prompts prefilled in its lanes beside the verification rows (4 lanes of 32 "
               "tokens).", CHUNKED, chunked))


SPEC_BATCHING = Section(
    "Speculative decoding in the engine and in static batches",
    "`python experiments/bench_spec_batching.py`: requests of held-out prompts with output "
    "budgets drawn from 16 / 32 / 64 / 128 tokens, greedy; each mode runs the whole workload, "
    "prompts included; time ratio against plain static batches, median of interleaved rounds. "
    "Occupancy: live rows per verification step / slots.",
    body=_spec_batching)
