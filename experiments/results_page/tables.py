"""The sections of the results files other than the speculative benchmarks': what each run did,
and the columns its records show."""

from __future__ import annotations

from .markdown import NA, Section, every_field, field, fmt, part, short_model, table
from .speculative import spread


def _batch_intro(recs) -> str:
  head = recs[0] if recs else {}
  return (f"`python experiments/bench_batch.py`: {head.get('num_prompts')} prompts "
          f"({head.get('prompt_tokens')} prompt tokens, "
          f"{head.get('shared_prefix_fraction_of_prompt_tokens', 0):.0%} of them one shared "
          "header of real stdlib source), 8–96 new tokens each, greedy, "
          f"{head.get('batch_size')} slots / batch {head.get('batch_size')}, model "
          f"{head.get('model')}, float32. Static and engine runs alternate in one process; the "
          "median ratio is the headline. Columns with two values are static / engine. Static "
          "is padded batches (each prompt prefilled whole, no prefix shared) up to 2026-12-03, "
          "and from 2026-12-05 the engine's own static waves (`--scheduler=static`: the same "
          "steps and shared prefix pages, slots refilled only once a whole batch has ended).")


def _both(key: str, digits: int = 2):
  """static / engine values of one field."""
  return lambda r: f"{fmt(r['static'][key], digits)} / {fmt(r['continuous'][key], digits)}"


BATCH = Section("Batch engine against static batches", _batch_intro, [
    ("lanes × tokens",
     lambda r: f"{r['chunk_lanes']} × {r['chunk_size']}" if "chunk_lanes" in r else NA),
    field("static tok/s", "static.generation_tokens_per_second", 0),
    field("engine tok/s", "continuous.generation_tokens_per_second", 0),
    field("engine / static, per repeat", "speedup_per_repeat"),
    field("median", "speedup", unit="×"),
    field("including compilation", "speedup_including_compilation", unit="×"),
    ("steps (engine dispatches)",
     lambda r: f"{_both('steps')(r)} ({fmt(r['continuous'].get('dispatches'))})"),
    ("slot occupancy", _both("mean_slot_occupancy")),
    ("prompt tokens computed", lambda r: f"{_both('prefill_tokens_computed')(r)} "
     f"({r['continuous']['prefill_tokens_saved']} saved)"),
    ("compilations", _both("compilations")),
    field("identical", "identical_completions"),
])

def _order_intro(recs) -> str:
  head = recs[0] if recs else {}
  return (f"`python experiments/bench_prefix_order.py`: {head.get('num_prompts')} prompts "
          f"({head.get('prompt_tokens')} prompt tokens), {head.get('headers')} headers of "
          f"{head.get('header_tokens')} tokens of real stdlib source each shared by "
          f"{head.get('per_header')} of them, arriving interleaved in random order; 8–48 new "
          f"tokens each, greedy, {head.get('batch_size')} slots, the engine's default KV pool, "
          "model embedded, float32. The same engine runs them sorted by prompt (global prefix "
          "sharing, BatchLLM) and in arrival order (the pool's LRU prefix cache alone, as "
          "vLLM's automatic prefix caching), alternating in one process; the median ratio is "
          "the headline. Columns with two values are prefix / arrival.")


def _orders(key: str, digits: int = 2):
  return lambda r: f"{fmt(r['prefix'][key], digits)} / {fmt(r['arrival'][key], digits)}"


PREFIX_ORDER = Section("Global prefix sharing against LRU prefix caching", _order_intro, [
    field("prefix-sorted tok/s", "prefix.generation_tokens_per_second", 0),
    field("arrival-order tok/s", "arrival.generation_tokens_per_second", 0),
    field("sorted / arrival, per repeat", "speedup_per_repeat"),
    field("median", "speedup", unit="×"),
    ("prompt tokens computed", _orders("prefill_tokens_computed")),
    field("computed, arrival / sorted", "prefill_computed_ratio", unit="×"),
    ("KV pages used at peak (pool)",
     lambda r: f"{_orders('kv_pages_used_peak')(r)} ({r['prefix'].get('kv_pages_pool')})"),
    field("identical", "identical_completions"),
])

DECODE = Section(
    "Decode throughput",
    "`python experiments/bench_decode.py` (GPU plan: `--model=preset:llama3-8b "
    "--batch_sizes=1`, target ≥ 80% of measured HBM bandwidth). Bandwidth = bytes of weights and "
    "KV a step reads / step time, against the ceiling the same run measured. On a CPU the small "
    "model stays in cache, so the fraction exceeds 1 and means nothing; runs of the same command "
    "varied by up to 2× on the shared CPU. `--quantize=none,int8,int4:g128` measures quantized "
    "weights in the same run (GPU plan: W8A16 ≥ 1.3× and W4A16 ≥ 1.6× the unquantized step); "
    "their bandwidth counts the bytes stored.",
    [field("model", "model"), field("dtype", "dtype"),
     ("weights", lambda r: r.get("weights", "none")), field("params", "params"),
     field("batch", "batch"), ("prompt / new", lambda r: f"{r.get('prompt_len')} / "
                               f"{r.get('new_tokens')}"),
     field("decode tok/s", "decode_tokens_per_second", 0), field("step ms", "step_ms", 3),
     field("compile s", "compile_seconds"), field("GB/s", "achieved_gbps", 1),
     field("measured ceiling GB/s", "ceilings.bandwidth_gbps", 1),
     field("fraction of ceiling", "fraction_of_measured_bandwidth"),
     field("× unquantized", "speedup_vs_unquantized", unit="×")])

VS_BATCH = [
    field("torch", "torch"), field("transformers", "transformers"), field("model", "model"),
    field("dtype", "dtype"), field("batch", "batch"),
    ("prompt / new", lambda r: f"{r.get('prompt_len')} / {r.get('new_tokens')}"),
    field("engine tok/s", "jaxinfer_tokens_per_second", 0),
    field("transformers tok/s", "transformers_tokens_per_second", 0),
    field("ratio", "speedup", unit="×"),
    field("engine decode-only tok/s", "jaxinfer_decode_tokens_per_second", 0),
    field("identical", "identical_completions")]


def _spread(s: dict | None) -> str:
  """A per-round ratio: its median (slowest–fastest round)."""
  return NA if not s else f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"


VS_SPECULATIVE = [
    field("torch", "torch"), field("transformers", "transformers"), field("threads", "threads"),
    field("prompts", "num_prompts"), field("rounds", "repeats"), field("side", "side"),
    field("mode", "mode"), field("tok/s", "tokens_per_second", 0),
    ("speedup over its plain (min–max)", lambda r: _spread(r.get("speedup_over_plain"))),
    field("τ", "tau"), field("compile s, warm-up", "warmup_compile_seconds", 1), field("identical to transformers' plain",
                             "identical_to_transformers_plain"), field("note", "note")]
VS_RATIOS = [field("prompts", "num_prompts"), field("rounds", "repeats"),
             field("tokens/s, one over the other", "pair"),
             ("ratio (min–max)", lambda r: _spread(r.get("ratio")))]


def _vs_transformers(recs) -> list[str]:
  batch = [r for r in recs if not r.get("protocol")]
  spec = [r for r in recs if r.get("protocol")]
  modes = [{**r, "side": side, "mode": mode, **m} for r in spec
           for side, key in (("jaxinfer", "jaxinfer_modes"), ("transformers", "transformers_modes"))
           for mode, m in r[key].items()]
  ratios = [{**r, "pair": pair, "ratio": v} for r in spec
            for pair, v in r["absolute_ratios"].items()]
  return ([""] + table(VS_BATCH, batch) + (part(
      "Speculative decoding, batch 1",
      "`python experiments/bench_vs_transformers.py --speculative --new_tokens=96`: one "
      "128-token window from each of 32 distinct held-out files (bench_speculative's prompts), "
      "96 greedy tokens each (EOS off), float32, one prompt at a time; transformers' prompt "
      "lookup (`prompt_lookup_num_tokens=K`) and assisted generation with the model's first half "
      "of layers as `assistant_model` (its defaults otherwise), jaxinfer's ngram (speculation "
      "always / auto) and its own first-half-of-layers draft (layerskip). Both sides stay up in "
      "processes of their own and take turns, every mode once a round; speedup is over the "
      "same side's plain decoding in the same round (compilation, which a jaxinfer process pays "
      "once before its first tokens, left out: its warm-up seconds in their own column, where "
      "recorded). τ: tokens per target forward after the "
      "first token (bonus included). torch's OpenMP threads spin while they wait: with other "
      "jobs busy on the CPU that slows transformers by 10× and more (`--omp_wait_policy=PASSIVE` "
      "avoids it, at about 2× on an idle CPU), so these runs need the CPU to themselves.",
      VS_SPECULATIVE, modes) + part(
      "Speculative decoding, batch 1: jaxinfer against transformers",
      "Tokens/s of a jaxinfer mode over a transformers mode, per round (the same tokens).",
      VS_RATIOS, ratios) if spec else []))


VS_TRANSFORMERS = Section(
    "Engine against transformers' generate",
    "`python experiments/bench_vs_transformers.py`: the same weights, each side in its own "
    "process, alternating; exactly `new` greedy tokens per prompt (EOS off); compilation "
    "excluded. The planned GPU comparison is `--model=preset:llama3-8b --dtype=bfloat16 "
    "--batch_sizes=64,128,256` (target ≥ 5×).",
    body=_vs_transformers)

CLI = Section(
    "`jaxinfer generate` end to end",
    "`python experiments/bench_cli.py`: one `jaxinfer generate` process per mode and round over "
    "bench_speculative's prompts (one 128-token window from each of 32 distinct held-out files, "
    "96 greedy tokens each), modes taking turns; a mode's time is its whole process (start-up, "
    "model load, compilation with the persistent compilation cache the earlier rounds left, "
    "generation, output), the first round (which fills that cache) left out. Speedup: plain "
    "decoding's wall time over the mode's, per round, then the median. The last round's own "
    "metrics: its compilation, generation tokens/s and the policy's summary.",
    [field("batch", "batch_size"), field("prompts", "num_prompts"), field("rounds", "rounds"),
     field("mode", "mode"), field("wall s (median)", "wall_seconds_median"),
     field("speedup, end to end", "speedup_end_to_end", unit="×"),
     ("min–max", lambda r: spread(r, "speedup_spread")),
     field("compile s", "compile_seconds"),
     field("generation tok/s", "generation_tokens_per_second", 0),
     field("speculation", "speculation"), field("identical to plain", "identical_to_plain"),
     field("note", "note")])

# bench_attention's kinds of row: the sub-table's title and the columns its rows fill
ATTENTION_KINDS = {
    "dense_causal": ("Dense causal forward", [
        field("seq", "seq_len"), field("ours ms", "ours_ms", 3),
        field("ours TFLOP/s", "ours_tflops", 3),
        field("of matmul peak", "ours_fraction_of_matmul_peak", 3), field("XLA ms", "xla_ms", 3),
        field("XLA TFLOP/s", "xla_tflops", 3)]),
    "density": ("Time against block density", [
        field("seq", "seq_len"), ("density", lambda r: r.get("density", NA)), field("ms", "ms", 3),
        field("time / (density × dense)", "time_over_density_x_dense")]),
    "paged_decode": ("Paged decode", [
        field("batch", "batch"), field("context", "context"), field("page size", "page_size"),
        field("ms", "ms", 3), field("GB/s", "gbps", 3),
        field("of measured bandwidth", "fraction_of_measured_bandwidth", 3)]),
}
# fields every attention row has, or that a kind's columns show; the rest go to "other fields"
ATTENTION_KNOWN = {"bench", "device", "backend", "jax", "date", "dtype", "ceilings", "interpret",
                   "seq_len", "ours_ms", "ours_tflops", "ours_fraction_of_matmul_peak", "xla_ms",
                   "xla_tflops", "density", "ms", "time_over_density_x_dense", "batch", "context",
                   "page_size", "gbps", "fraction_of_measured_bandwidth"}


def _attention_other(r) -> str:
  return ", ".join(f"{k}={fmt(v, 3)}" for k, v in r.items() if k not in ATTENTION_KNOWN) or NA


def _attention(recs) -> list[str]:
  out = []
  for kind in dict.fromkeys(r.get("bench") for r in recs):
    title, columns = ATTENTION_KINDS.get(kind, (str(kind), []))
    out += part(title, "", [field("dtype", "dtype"), field("interpret", "interpret"), *columns,
                            ("other fields", _attention_other)],
                [r for r in recs if r.get("bench") == kind])
  return out


ATTENTION = Section(
    "Attention kernels",
    "`python experiments/bench_attention.py` (`--quick` anywhere). Rows marked interpret ran the "
    "kernels in Pallas interpret mode on a CPU: they check the script end to end and are not "
    "speed measurements. Targets on an accelerator: dense ≥ 50% of the matmul peak, time ≤ 1.25 "
    "× density × dense down to density 0.1, paged decode ≥ 75% of HBM bandwidth.",
    body=_attention)

LONG_CONTEXT_COLUMNS = [
    field("pattern", "pattern"), field("implementation", "implementation"),
    field("loss", "loss", 3), field("last quarter", "loss_last_quarter", 3),
    field("top-1 agreement with dense", "top1_agreement_with_dense", 3),
    ("tiles visited", lambda r: NA if r.get("tiles_visited") is None
     else f"{r['tiles_visited']:.1%}"),
    field("max loss difference to reference", "max_abs_loss_diff_vs_reference", 6)]


def _long_context(recs) -> list[str]:
  out = []
  for r in recs:
    y = r["yardstick_windows_of_train_len"]
    rows = [{**r, **y, "pattern": f"yardstick: independent {y['train_len']}-token windows"}]
    rows += [{**r, **p, "pattern": f"`{name}`"} for name, p in r["patterns"].items()]
    out += ["", f"{r['num_seqs']} sequences of {r['seq_len']} tokens, model "
            f"{short_model(r['model'])}:", ""] + table(LONG_CONTEXT_COLUMNS, rows)
    g = r.get("generate_long_prompt")
    if g:
      out += ["", f"Generation from a {g['prompt_tokens']}-token prompt through `jaxinfer "
              f"generate --implementation=pallas --sparsity={g['sparsity']}`: "
              f"{g['completion_tokens']} tokens, prefill {g['prefill_tokens_per_second']:.0f} "
              "tokens/s (interpret mode)."]
  return out


LONG_CONTEXT = Section(
    "Long prompts: attention patterns beyond the training length",
    "`python experiments/long_context.py`: held-out stdlib text, teacher-forced loss "
    "(nats/token) per pattern through the Pallas block-sparse kernel (checked against the jnp "
    "reference), against dense attention and against the same text scored in windows of the "
    "model's training length (what the model can do at best).",
    body=_long_context)

TRAIN_HEADS = Section(
    "Draft-head training",
    "`python experiments/train_heads.py --method=...`: heads trained on the embedded model's own "
    "greedy continuations (self-distilled by the batch engine) or on the stdlib text; held-out "
    "top-1 / top-5 per head (Hydra's given the path so far; EAGLE's one step ahead), and the "
    "accepted tokens per step their tree predicts. τ in serving is in the speculative table "
    "above (its draft heads column names these heads).",
    [field("method", "method"), ("heads", lambda r: f"`{r.get('heads')}`"),
     field("steps", "steps"), ("batch × seq", lambda r: f"{r.get('batch_size')} × "
                               f"{r.get('seq_len')}"),
     ("data", lambda r: f"{r['self_distilled_prompts']} self-distilled"
      if r.get("self_distilled_prompts") else "the text"),
     field("train tokens", "train_tokens"), field("held-out top-1", "accuracy_top1"),
     field("held-out top-5", "accuracy_top5"), field("tree nodes", "tree_nodes"),
     field("predicted accepted / step", "expected_accepted_per_step"),
     ("draft vocabulary (coverage)", lambda r: f"{r['draft_vocab']} "
      f"({r['draft_vocab_coverage']:.1%})" if r.get("draft_vocab") else NA),
     field("greedy agreement", "greedy_agreement"),
     ("hidden cache", lambda r: fmt(r.get("hidden_cache", False))),
     field("train s", "train_seconds", 0), field("distill s", "distill_seconds", 1)],
    plot=lambda r: f"train_heads_{r.get('heads')}.png",
    plots_caption="Training curves (held-out top-1 / top-5 and predicted τ where evaluated; the "
    "first Medusa-1, Hydra and EAGLE runs show training-batch curves only):")

HIDDEN_CACHE = Section(
    "Heads-only training from cached hidden states",
    "`python experiments/bench_hidden_cache.py`: one jitted training step with its batch, from "
    "the tensorstore cache of the base's hidden states against from token windows (which runs "
    "the frozen base), medians of interleaved rounds. The 16-layer variant has random weights "
    "(timing only).",
    [field("model", "model"), field("layers", "num_layers"), field("method", "method"),
     ("batch × seq", lambda r: f"{r.get('batch_size')} × {r.get('seq_len')}"),
     field("s / step, tokens", "seconds_per_step_tokens", 4),
     field("s / step, cache", "seconds_per_step_cache", 4), field("speedup", "speedup", unit="×"),
     field("cache windows", "cache_windows"), field("cache build s", "cache_build_seconds", 1),
     ("cache size", lambda r: f"{r['cache_bytes'] / 1e6:.0f} MB" if r.get("cache_bytes")
      else NA)])


def _weight_bytes(r) -> str:
  """Quantized weights against float32, as held in memory / as packed bits."""
  f32 = r.get("quantized_weights_float32_bytes")
  if not f32:
    return f"{NA} / {NA}"
  return (f"{r['quantized_weights_bytes'] / f32:.3f} / "
          f"{r['quantized_weights_packed_bytes'] / f32:.3f}")


QUANT = Section(
    "Weight quantization: PTQ and QAT",
    "`python experiments/bench_quant.py --steps=N`: held-out loss (nats/token) of the embedded "
    "model after PTQ per format, after QAT, and of a full-precision control fine-tuned for the "
    "same steps; \"ptq_of_control\" quantizes the control. Gap recovered = (PTQ loss − QAT "
    "loss) / (PTQ loss − control loss); n/a (—) when the control is no better than PTQ. Target: "
    "the row's goal (loss increase for PTQ, gap recovered for QAT). Weight bytes: the quantized "
    "weights as held in memory (sub-byte values in one-byte containers) and as packed bits would "
    "take, against float32. Embeddings are not quantized.",
    [field("method", "method"), field("format", "format"), field("steps", "steps"),
     field("lr", "learning_rate", 4), field("held-out loss", "heldout_loss", 4),
     field("loss increase", "loss_increase_percent", 2, "%"),
     field("gap recovered", "gap_recovered_percent", 1, "%"),
     field("against PTQ of control", "gap_recovered_percent_vs_ptq_of_control", 1, "%"),
     ("target", lambda r: fmt(r.get("target_gap_recovered_percent",
                                    r.get("target_loss_increase_percent")), 1, "%")),
     ("weight bytes vs float32, held / packed", _weight_bytes),
     field("train s", "train_seconds", 1)])

def _kv_cache(recs) -> list[str]:
  by = lambda m: [r for r in recs if r.get("measure") == m]
  return (part("Held-out loss", "", [
      field("model", "model"), field("eval tokens", "eval_tokens"),
      field("model-dtype cache", "heldout_loss_model_dtype_cache", 5),
      field("int8 cache", "heldout_loss_int8_cache", 5),
      field("loss increase", "loss_increase_percent", 4, "%"),
      field("target", "target_loss_increase_percent", 2, "%")], by("held-out loss"))
      + part("Greedy agreement", "", [
          field("path", "implementation"), field("prompts", "prompts"),
          field("new tokens", "new_tokens"),
          field("int8 vs model-dtype cache", "int8_vs_model_dtype_cache", 3),
          field("int8: ngram vs plain", "int8_ngram_vs_int8_plain", 3),
          field("identical rows", "identical_rows_int8_ngram_vs_plain")],
          by("greedy agreement"))
      + part("Bytes and pool capacity", "", [
          field("shape", "shape"), field("head dim", "head_dim"),
          field("bytes/token bf16", "kv_bytes_per_token_bfloat16"),
          field("bytes/token int8", "kv_bytes_per_token_int8"),
          field("int8 / bf16", "int8_vs_bfloat16", 3, "×"),
          field("target", "target_vs_bfloat16", 2, "×"),
          field("tokens in the same pool", "tokens_admitted_ratio", 2, "×"),
          field("target", "target_tokens_admitted_ratio", 1, "×")], by("bytes"))
      + part("Old KV evicted or kept in low precision (MiKV)",
             "`--measures=mikv`: each query reads its `recent` latest positions and the first "
             "`sinks` as computed, older keys and values evicted or rounded per token and kv "
             "head; recent 0 rounds them all. Cache: what a window's last token reads, against "
             "all of it in bfloat16.", [
          field("window", "window_tokens"), field("eval tokens", "eval_tokens"),
          field("recent", "recent"), field("sinks", "sinks"), field("older KV", "old_kv"),
          field("held-out loss", "heldout_loss", 5),
          field("full cache", "heldout_loss_full_cache", 5),
          field("loss increase", "loss_increase_percent", 3, "%"),
          field("cache / bf16", "cache_vs_bfloat16", 3, "×")], by("mikv")))


KV_CACHE = Section(
    "int8 KV cache",
    "`python experiments/bench_kv_cache.py`: the engine's pool in int8 with one float32 scale "
    "per token and kv head (`--kv_cache_dtype=int8`). Held-out loss of the embedded model with "
    "every window prefilled through the cache (written, then read), model-dtype cache against "
    "int8; greedy agreement: share of output tokens equal between two engine runs over the same "
    "held-out prompts (an early flip changes the rest of its row); bytes of one token's K and V "
    "over all layers, and the tokens a pool of the same bytes holds, int8 against bfloat16.",
    body=_kv_cache)


def _device_check_result(r) -> str:
  """One device_check.jsonl row in a line: each step's exit code and seconds, the kernel tests'
  counts, or the summary's fractions against the targets."""
  if r.get("step") == "steps":
    return ", ".join(f"{name} {s['exit']} ({s['seconds']} s)" for name, s in r["steps"].items())
  if r.get("step") == "kernel_tests":
    failed = "; failed: " + ", ".join(f.split("::")[-1] for f in r["failures"]) \
        if r.get("failures") else ""
    note = f" ({r['note']})" if r.get("note") else ""
    return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors{note}{failed}"
  return ", ".join(f"{k} {fmt(v, 3)}" for k, v in r.items()
                   if k not in ("step", "date", "device", "jax"))


DEVICE_CHECK = Section(
    "Device checks",
    "`bash experiments/device_check.sh` on a GPU, in one call: each step's exit code (124: cut "
    "at its time limit) and seconds, the kernel tests compiled for the GPU, and the benchmarks' "
    "results as fractions of the ceilings the same run measured (their rows are in the sections "
    "above). Targets: paged decode >= 0.75 of HBM bandwidth, dense attention >= 0.5 of the "
    "matmul peak, block-sparse time <= 1.25 x density x dense down to density 0.1, 8B decode at "
    "batch 1 >= 0.8 of HBM bandwidth.",
    [field("step", "step"), ("result", _device_check_result)])

RECORDED = Section(
    "Recorded without a results file",
    "Figures from runs whose benchmarks wrote no results file at the time, typed into "
    "`recorded.jsonl` with what each ran on (a date of \"not recorded\" was not written down). "
    "A benchmark that measures one of them again appends its own record to its own file.",
    body=every_field)
