"""experiments/results/README.md from the results files beside it: every measured table, each row
with its device, jax version and date, plots beside their tables, and the reproductions of the
seed papers' claims.

  python experiments/results_readme.py            # rewrite experiments/results/README.md
  python experiments/results_readme.py --check    # exit 1 if it is stale

The page is never edited by hand: a benchmark appends its rows to its JSONL file, and this script
is run again. Records are shown in file order (oldest first); a field a record lacks shows "—".
Output depends only on the files: same files, same page. No jax needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = RESULTS / "README.md"
COMMAND = "python experiments/results_readme.py"
NA = "—"


# ---------------------------------------------------------------------------------------------
# formatting

def fmt(v, digits: int = 2, unit: str = "") -> str:
  if v is None:
    return NA
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.{digits}f}{unit}"
  if isinstance(v, list):
    return ", ".join(fmt(x, digits) for x in v)
  return f"{v}{unit}"


def ratio(v) -> str:
  return fmt(v, 2, "×")


def cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
  return out


def stamp(r: dict) -> list[str]:
  """date, device, jax of a record; a record without `device` shows what it has instead (the
  device kind its ceilings were measured on, or its backend)."""
  device = r.get("device") or r.get("ceilings", {}).get("device_kind") or r.get("backend")
  return [fmt(r.get("date")), fmt(device), fmt(r.get("jax"))]


STAMP = ["date", "device", "jax"]


def short_model(name) -> str:
  if isinstance(name, str) and "/" in name:  # a cache path: keep its last two parts
    return "/".join(Path(name).parts[-2:])
  return fmt(name)


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


def load() -> dict[str, list[dict]]:
  files = {}
  for path in sorted(RESULTS.glob("*.jsonl")):
    files[path.name] = [json.loads(line) for line in path.read_text().splitlines()
                        if line.strip()]
  for path in sorted(RESULTS.glob("*.json")):
    data = json.loads(path.read_text())
    files[path.name] = data if isinstance(data, list) else [data]
  return files


# ---------------------------------------------------------------------------------------------
# the speculative benchmark's rows: one per (record, method)

def spec_rows(files) -> list[tuple[dict, str, dict]]:
  return [(r, name, m) for r in files.get("bench_speculative.jsonl", [])
          for name, m in r.get("methods", {}).items()]


BATCHES = (1, 4, 16)


def latest(files, method: str, batch: int, model: str = "embedded", **want):
  """The last bench_speculative row of `method` at `batch` whose fields equal `want` (a value
  of None in `want` also matches a record that lacks the field)."""
  for r, name, m in reversed(spec_rows(files)):
    if name != method or r.get("batch_size") != batch or r.get("model") != model:
      continue
    if all(m.get(k) == v for k, v in want.items()):
      return r, m
  return None


def per_batch(files, method, batches=BATCHES, **want):
  found = [latest(files, method, b, **want) for b in batches]
  return None if any(f is None for f in found) else [m for _, m in found]


def pair(files, a: str, b: str, want_a: dict, want_b: dict, batches=BATCHES):
  """([a's rows], [b's rows], whether all came from records holding both) per batch size: from
  the last record holding both (one run, so their speeds compare), else each method's latest."""
  out_a, out_b, together = [], [], True
  for batch in batches:
    for r, name, m in reversed(spec_rows(files)):
      other = r.get("methods", {}).get(b)
      if (name == a and other is not None and r.get("batch_size") == batch
          and r.get("model") == "embedded" and all(m.get(k) == v for k, v in want_a.items())
          and all(other.get(k) == v for k, v in want_b.items())):
        out_a.append(m)
        out_b.append(other)
        break
    else:
      together = False
      found_a, found_b = latest(files, a, batch, **want_a), latest(files, b, batch, **want_b)
      if found_a is None or found_b is None:
        return None
      out_a.append(found_a[1])
      out_b.append(found_b[1])
  return out_a, out_b, together


def triple(values, f=lambda v: f"{v:.2f}") -> str:
  return " / ".join(f(v) for v in values)


def times(values) -> str:
  return triple(values, lambda v: f"{v:.2f}×")


def tau_vs(found, label_a, label_b) -> str | None:
  """'label_a τ x / y / z against label_b's ... (batch 1 / 4 / 16): ratios'."""
  if found is None:
    return None
  ta, tb = [m["tau"] for m in found[0]], [m["tau"] for m in found[1]]
  return (f"{label_a} τ {triple(ta)} against {label_b} {triple(tb)} (batch 1 / 4 / 16): "
          f"{times([x / y for x, y in zip(ta, tb)])}")


def speed(found, key="speedup") -> tuple[str, str]:
  """Both methods' `key` per batch size; a note when they come from separate runs."""
  fast, slow = times([m[key] for m in found[0]]), times([m[key] for m in found[1]])
  return fast, slow + ("" if found[2] else " (separate runs)")


# ---------------------------------------------------------------------------------------------
# Reproductions: the seed papers' claims that jaxinfer can test on its own hardware. Paper numbers
# are the authors' own (or Spec-Bench's, marked independent); "ours" is computed from the records
# each time the page is built, or "not measured yet".

def _hydra(files):
  found = pair(files, "hydra++", "medusa", {"tree_size": 17, "draft_heads": "hydrapp-400-cached"},
               {"tree_size": 17})
  if found is None:
    return None
  fast, slow = speed(found)
  return f"{tau_vs(found, 'Hydra++', 'Medusa')}; wall clock {fast} against {slow}"


def _eagle2(files):
  found = pair(files, "eagle-tree", "eagle", {"tree_size": 17},
               {"tree_size": 5, "draft_heads": "eagle-v1024-400"})
  if found is None:
    return None
  fast, slow = speed(found)
  tau = tau_vs(found, "dynamic tree (17 nodes)", "chain of 4")
  return f"{tau}; wall clock {fast} against {slow}"


def _recycling(files):
  found = pair(files, "recycling", "ngram", {"tree_size": 29}, {"tree_size": 5})
  if found is None:
    return None
  fast, slow = speed(found)
  auto, _ = speed(found, "speedup_auto_policy")
  return (f"{tau_vs(found, 'Token Recycling (29 nodes)', 'prompt lookup')}; wall clock always "
          f"on {fast} against {slow}; with the auto policy {auto}")


def _lookahead(files):
  found = pair(files, "lookahead", "ngram", {"tree_size": 17}, {"tree_size": 5})
  if found is None:
    return None
  fast, slow = speed(found)
  auto, _ = speed(found, "speedup_auto_policy")
  return (f"{tau_vs(found, 'trie (17 nodes)', 'prompt lookup')}; wall clock always on {fast} "
          f"against {slow}, auto policy {auto}; outputs identical to plain decoding")


def _batchllm(files):
  return None  # needs the engine with its global sort off (LRU prefix caching alone): not built


def _sarathi(files):
  parts = []
  for method in ("ngram", "layerskip"):
    rows = [r for r in files.get("bench_spec_batching.jsonl", [])
            if r.get("method") == method and "spec-continuous-whole" in r.get("modes", {})]
    if rows:
      m = rows[-1]["modes"]
      chunked, whole = m["spec-continuous"], m["spec-continuous-whole"]
      gain = chunked["speedup_over_plain_static"] / whole["speedup_over_plain_static"]
      parts.append(f"{method}: longest stall of the running rows "
                   f"{whole['longest_prefill_call_ms']:.0f} → "
                   f"{chunked['longest_prefill_call_ms']:.0f} ms; whole job {gain:.2f}× faster "
                   "chunked")
  return "; ".join(parts) or None


def _density(files):
  rows = [r for r in files.get("bench_attention.jsonl", [])
          if r.get("bench") == "density" and not r.get("interpret", True)]
  if not rows:
    return None
  return "; ".join(f"density {r['density']}: {r['time_over_density_x_dense']:.2f} × density "
                   f"× dense ({r.get('device')})" for r in rows)


def _sinks(files):
  (r,) = files.get("long_context.json", [None])
  if not r:
    return None
  p = r["patterns"]
  sw = next((k for k in p if k.startswith("sinks_window") and k.endswith(",256")), None)
  if sw is None or "dense" not in p:
    return None
  y = r["yardstick_windows_of_train_len"]
  return (f"{r['seq_len']} tokens ({r['seq_len'] // y['train_len']}× the training length): loss "
          f"{p[sw]['loss']:.3f} with `{sw}` against {p['dense']['loss']:.3f} dense and "
          f"{y['loss']:.3f} scored in training-length windows; {p[sw]['tiles_visited']:.0%} of "
          "tiles visited")


def _qat(files):
  rows = [r for r in files.get("bench_quant.jsonl", []) if r.get("method") == "qat"]
  if not rows:
    return None
  parts = []
  for r in rows:
    g = r.get("gap_recovered_percent")
    parts.append(f"{r['format']} {g:.1f}%" if g is not None else
                 f"{r['format']} n/a (control worse than PTQ; "
                 f"{r.get('gap_recovered_percent_vs_ptq_of_control')}% against PTQ of the "
                 "control)")
  return "PTQ gap recovered: " + ", ".join(parts)


def _medusa2(files):
  model = next((r["model"] for r, name, m in spec_rows(files)
                if name == "medusa" and m.get("draft_heads") == "medusa2-400"), None)
  if model is None:
    return None
  m2 = [latest(files, "medusa", b, model=model, draft_heads="medusa2-400") for b in BATCHES]
  m1 = per_batch(files, "medusa", tree_size=17, draft_heads="medusa-400")
  if None in m2 or m1 is None:
    return None
  t2, t1 = [m["tau"] for _, m in m2], [m["tau"] for m in m1]
  change = triple([(a / b - 1) * 100 for a, b in zip(t2, t1)], lambda v: f"{v:+.0f}%")
  return (f"Medusa-2 τ {triple(t2)} against Medusa-1 {triple(t1)} (batch 1 / 4 / 16): "
          f"{change}")


def _ttt(files):
  return tau_vs(pair(files, "eagle-ttt", "eagle", {"draft_heads": "eagle-v1024-ttt3-400"},
                     {"draft_heads": "eagle-v1024-400"}), "with the 3-step test", "EAGLE-1")


def _biglittle(files):
  found = pair(files, "layerskip-fallback", "layerskip", {}, {})
  if found is None:
    return None
  fast, slow = speed(found)
  taus = [triple([m["tau"] for m in side]) for side in found[:2]]
  return (f"layer-skip draft with fallback 0.5: {fast} against {slow} without (batch 1 / 4 / "
          f"16), τ {taus[0]} against {taus[1]}; draft share of a step "
          f"{found[0][0]['draft_share']:.2f} against {found[1][0]['draft_share']:.2f} at batch 1")


def _medusa_acc(files):
  rows = [r for r in files.get("train_heads.jsonl", [])
          if r.get("method") == "medusa-1" and r.get("heads") == "medusa-400"]
  if not rows:
    return None
  return "top-1 per head " + ", ".join(f"{a:.2f}" for a in rows[-1]["accuracy_top1"])


SPEC = "python experiments/bench_speculative.py"
CLAIMS = [
    # (claim, paper, ours(files) -> str | None, command, note)
    ("Hydra++ heads accept more than Medusa's (τ)",
     "Hydra++ τ 3.26 against Medusa 2.31 (1.41×; independent, Spec-Bench, Vicuna-7B); "
     "\"1.31x\" Medusa's speed (authors)", _hydra,
     "python experiments/train_heads.py; python experiments/train_heads.py --method=hydra "
     f"--prefix_layer --hidden_cache; {SPEC} --methods=medusa,hydra,hydra++",
     "Agrees on τ. Speed is not tested here: on this compute-bound CPU a 17-node tree costs "
     "nearly 17 one-token forwards, so both lose to plain decoding."),
    ("EAGLE-2 dynamic trees over static drafts", "EAGLE-2 τ 4.34 against EAGLE-1 3.58 (1.21×; "
     "2.36× against 2.10× speed; independent, Spec-Bench)", _eagle2,
     f"python experiments/train_heads.py --method=eagle --draft_vocab=1024; {SPEC} "
     "--methods=eagle,eagle-tree",
     "Smaller gain than the paper's: ours is set against a chain of 4, not EAGLE-1's static "
     "tree (not built), and the 17-node tree's verification costs more than it saves on a CPU."),
    ("Token Recycling over prompt lookup (n-gram)", "\"approximately 2x\" over plain decoding, "
     "training-free, \"<2MB\" extra storage; no n-gram figure in our reference", _recycling,
     f"{SPEC} --methods=ngram,recycling,medusa,eagle",
     "Disagrees on speed: higher τ at batch 1 only, and its 29-node tree is slower than plain "
     "decoding here unless the auto policy shrinks it. The paper measured on a GPU, where "
     "verifying a tree costs about one forward."),
    ("Lookahead (trie) over prompt lookup (n-gram)", "lossless, worst case = plain decoding "
     "(Lookahead, Alipay); Jacobi lookahead decoding τ 1.64, 1.34× (independent, Spec-Bench)",
     _lookahead, f"{SPEC} --methods=ngram,lookahead",
     "Agrees on τ and losslessness; always on it is slower than plain decoding on this CPU, and "
     "only the auto policy keeps the worst case at plain decoding."),
    ("Global prefix sharing over LRU prefix caching (BatchLLM)", "\"1.1x to 2x\" over vLLM",
     _batchllm, NA,
     "bench_batch.py sets the engine (global sort, shared pages) against static padded batches, "
     "not against LRU caching alone; that comparison needs the global sort switched off."),
    ("Chunked prefill removes decode stalls (SARATHI)", "decode throughput \"up to 10x\", end to "
     "end \"up to 1.33x\" (LLaMA-13B, A6000)", _sarathi,
     "python experiments/bench_spec_batching.py --methods=ngram,layerskip --prompt_tokens=1024 "
     "--requests=16 --slots=4 --prefill_chunk=256 --repeats=3",
     "Measured on speculative decoding's chunked admission (1024-token prompts, chunks of 256), "
     "the stall bound rather than throughput; the plain engine has no unchunked mode to compare."),
    ("Block-sparse attention time scales with density", "a block-sparse kernel runs at the dense "
     "kernel's rate per visited block (splash attention; FlexAttention ~90% of "
     "FlashAttention-2); our target: time ≤ 1.25 × density × dense down to density 0.1",
     _density, "python experiments/bench_attention.py",
     "The CPU rows below ran in interpret mode: they check the script and are not speed. On a "
     "GPU, `bash experiments/device_check.sh` runs it with the other device checks."),
    ("Attention sinks + window hold the loss beyond the training length (StreamingLLM, "
     "LM-Infinite)", "LM-Infinite: Λ-shaped mask fluent to 32k tokens, \"2.72x\" decoding",
     _sinks, "python experiments/long_context.py --seq_len=8192 --num_seqs=3",
     "Agrees on quality: the in-length loss is recovered at 32× the training length. Speed not "
     "measured (kernels interpreted on CPU)."),
    ("QAT recovers PTQ's loss", "torchao: QAT recovers \"a large part\" of the int4 PTQ "
     "degradation (no figure in our reference)", _qat,
     "python experiments/bench_quant.py --steps=150",
     "int4 is not judged at this budget: 150 steps at lr 1e-3 made the full-precision control "
     "worse than the model it started from."),
    ("Medusa-2 (joint LoRA) over Medusa-1", "Medusa-1 \"over 2.2x\", Medusa-2 \"2.3-3.6x\"",
     _medusa2, "python experiments/train_heads.py --method=medusa2; "
     f"{SPEC} --model=<embedded cache>/medusa2-400/model --methods=medusa "
     "--draft_heads=<embedded cache>/medusa2-400",
     "Disagrees: the KL weight that keeps the model at 97% greedy agreement leaves the adapters "
     "little room; about one point of head accuracy gained."),
    ("EAGLE-3's training-time test", "EAGLE-3 \"up to 6.5x\" (with multi-layer features and "
     "far more data)", _ttt, "python experiments/train_heads.py --method=eagle "
     f"--draft_vocab=1024 --ttt_steps=3; {SPEC} --methods=eagle,eagle-ttt",
     "Did not pay here: 400 steps of one small layer; the later drafting steps compete with the "
     "first for the same capacity. Multi-layer feature fusion is not built."),
    ("Big-Little fallback on draft confidence", "\"up to 2.12x\" (T4), not exactly lossless",
     _biglittle, f"{SPEC} --methods=layerskip,layerskip-fallback",
     "Keeps τ and cuts drafting, but the half-depth layer-skip draft of a 4-layer model is too "
     "weak to pay either way; ours stays lossless."),
    ("Medusa heads' accuracy falls with depth", "Medusa-1 top-1 per head 0.56, 0.32, 0.20, "
     "0.15, 0.12 (Vicuna-7B)", _medusa_acc, "python experiments/train_heads.py",
     "Falls far less here: the heads learn the tiny model's own greedy continuations, which are "
     "far more predictable than chat data."),
]


def reproductions(files) -> list[str]:
  rows = []
  for claim, paper, ours, command, note in CLAIMS:
    value = ours(files)
    rows.append([claim, paper, value if value is not None else "not measured yet",
                 f"`{command}`" if command != NA else NA, note])
  return ["## Reproductions", "",
          "The seed papers' claims that jaxinfer can test on its own hardware. \"Ours\" is "
          "computed from the records below each time this page is built; where no record "
          "exists yet it says so. Our runs are on a 2-core CPU with the embedded 1.3M-parameter "
          "model unless a row says otherwise, so speed claims made on GPUs are mostly not "
          "tested by them.", ""] + table(["claim", "paper", "ours", "command", "note"], rows)


# ---------------------------------------------------------------------------------------------
# one section per results file

def sec_batch(recs):
  rows = []
  for r in recs:
    s, c = r["static"], r["continuous"]
    lanes = (f"{r['chunk_lanes']} × {r['chunk_size']}" if "chunk_lanes" in r else NA)
    rows.append(stamp(r) + [
        lanes, fmt(s["generation_tokens_per_second"], 0), fmt(c["generation_tokens_per_second"], 0),
        fmt(r["speedup_per_repeat"]), ratio(r["speedup"]),
        ratio(r["speedup_including_compilation"]),
        f"{s['steps']} / {c['steps']} ({fmt(c.get('dispatches'))})",
        f"{s['mean_slot_occupancy']:.2f} / {c['mean_slot_occupancy']:.2f}",
        f"{s['prefill_tokens_computed']} / {c['prefill_tokens_computed']} "
        f"({c['prefill_tokens_saved']} saved)",
        f"{s['compilations']} / {c['compilations']}", fmt(r.get("identical_completions"))])
  head = recs[0] if recs else {}
  return (["## Batch engine against static batches", "",
           f"`python experiments/bench_batch.py`: {head.get('num_prompts')} prompts "
           f"({head.get('prompt_tokens')} prompt tokens, "
           f"{head.get('shared_prefix_fraction_of_prompt_tokens', 0):.0%} of them one shared "
           "header of real stdlib source), 8–96 new tokens each, greedy, "
           f"{head.get('batch_size')} slots / batch {head.get('batch_size')}, model "
           f"{head.get('model')}, float32. Static and engine runs alternate in one process; the "
           "median ratio is the headline. Columns with two values are static / engine.", ""] +
          table(STAMP + ["lanes × tokens", "static tok/s", "engine tok/s",
                         "engine / static, per repeat", "median", "including compilation",
                         "steps (engine dispatches)", "slot occupancy", "prompt tokens computed",
                         "compilations", "identical"],
                rows))


def sec_decode(recs):
  rows = [stamp(r) + [r.get("model"), r.get("dtype"), fmt(r.get("params")), r.get("batch"),
                      f"{r.get('prompt_len')} / {r.get('new_tokens')}",
                      fmt(r.get("decode_tokens_per_second"), 0), fmt(r.get("step_ms"), 3),
                      fmt(r.get("compile_seconds")), fmt(r.get("achieved_gbps"), 1),
                      fmt(r.get("ceilings", {}).get("bandwidth_gbps"), 1),
                      fmt(r.get("fraction_of_measured_bandwidth"))] for r in recs]
  return (["## Decode throughput", "",
           "`python experiments/bench_decode.py` (GPU plan: `--model=preset:llama3-8b "
           "--batch_sizes=1`, target ≥ 80% of measured HBM bandwidth). Bandwidth = bytes of "
           "weights and KV a step reads / step time, against the ceiling the same run measured. "
           "On a CPU the small model stays in cache, so the fraction exceeds 1 and means "
           "nothing; runs of the same command varied by up to 2× on the shared CPU.", ""] +
          table(STAMP + ["model", "dtype", "params", "batch", "prompt / new", "decode tok/s",
                         "step ms", "compile s", "GB/s", "measured ceiling GB/s",
                         "fraction of ceiling"], rows))


def sec_vs_hf(recs):
  rows = [stamp(r) + [fmt(r.get("torch")), fmt(r.get("transformers")), r.get("model"),
                      r.get("dtype"), r.get("batch"),
                      f"{r.get('prompt_len')} / {r.get('new_tokens')}",
                      fmt(r.get("jaxinfer_tokens_per_second"), 0),
                      fmt(r.get("transformers_tokens_per_second"), 0), ratio(r.get("speedup")),
                      fmt(r.get("jaxinfer_decode_tokens_per_second"), 0),
                      fmt(r.get("identical_completions"))] for r in recs]
  return (["## Engine against transformers' generate", "",
           "`python experiments/bench_vs_transformers.py`: the same weights, each side in its "
           "own process, alternating; exactly `new` greedy tokens per prompt (EOS off); "
           "compilation excluded. The planned GPU comparison is `--model=preset:llama3-8b "
           "--dtype=bfloat16 --batch_sizes=64,128,256` (target ≥ 5×).", ""] +
          table(STAMP + ["torch", "transformers", "model", "dtype", "batch", "prompt / new",
                         "engine tok/s", "transformers tok/s", "ratio", "engine decode-only tok/s",
                         "identical"], rows))


ATTENTION_KNOWN = {"bench", "seq_len", "ours_ms", "ours_tflops", "ours_fraction_of_matmul_peak",
                   "xla_ms", "xla_tflops", "device", "backend", "jax", "date", "dtype", "ceilings",
                   "interpret", "density", "ms", "time_over_density_x_dense", "batch", "context",
                   "page_size", "gbps", "fraction_of_measured_bandwidth"}


def _others(r) -> str:
  extra = {k: v for k, v in r.items() if k not in ATTENTION_KNOWN}
  return ", ".join(f"{k}={fmt(v, 3)}" for k, v in extra.items()) or NA


def sec_attention(recs):
  out = ["## Attention kernels", "",
         "`python experiments/bench_attention.py` (`--quick` anywhere). Rows marked interpret "
         "ran the kernels in Pallas interpret mode on a CPU: they check the script end to end "
         "and are not speed measurements. Targets on an accelerator: dense ≥ 50% of the "
         "matmul peak, time ≤ 1.25 × density × dense down to density 0.1, paged decode ≥ 75% "
         "of HBM bandwidth."]
  kinds = {
      "dense_causal": ("Dense causal forward", ["seq", "ours ms", "ours TFLOP/s",
                                                "of matmul peak", "XLA ms", "XLA TFLOP/s"],
                       lambda r: [r.get("seq_len"), fmt(r.get("ours_ms"), 3),
                                  fmt(r.get("ours_tflops"), 3),
                                  fmt(r.get("ours_fraction_of_matmul_peak"), 3),
                                  fmt(r.get("xla_ms"), 3), fmt(r.get("xla_tflops"), 3)]),
      "density": ("Time against block density", ["seq", "density", "ms",
                                                 "time / (density × dense)"],
                  lambda r: [r.get("seq_len"), r.get("density"), fmt(r.get("ms"), 3),
                             fmt(r.get("time_over_density_x_dense"))]),
      "paged_decode": ("Paged decode", ["batch", "context", "page size", "ms", "GB/s",
                                        "of measured bandwidth"],
                       lambda r: [r.get("batch"), r.get("context"), r.get("page_size"),
                                  fmt(r.get("ms"), 3), fmt(r.get("gbps"), 3),
                                  fmt(r.get("fraction_of_measured_bandwidth"), 3)]),
  }
  for kind in dict.fromkeys(r.get("bench") for r in recs):
    sel = [r for r in recs if r.get("bench") == kind]
    title, cols, row = kinds.get(kind, (str(kind), [], lambda r: []))
    out += ["", f"### {title}", ""]
    out += table(STAMP + ["dtype", "interpret"] + cols + ["other fields"],
                 [stamp(r) + [fmt(r.get("dtype")), fmt(r.get("interpret"))] + row(r) +
                  [_others(r)] for r in sel])
  return out


def sec_long_context(recs):
  out = ["## Long prompts: attention patterns beyond the training length", "",
         "`python experiments/long_context.py`: held-out stdlib text, teacher-forced loss "
         "(nats/token) per pattern through the Pallas block-sparse kernel (checked against the "
         "jnp reference), against dense attention and against the same text scored in windows "
         "of the model's training length (what the model can do at best)."]
  for r in recs:
    y = r["yardstick_windows_of_train_len"]
    rows = [stamp(r) + [f"yardstick: independent {y['train_len']}-token windows", NA,
                        fmt(y["loss"], 3), fmt(y["loss_last_quarter"], 3), NA, NA, NA]]
    for name, p in r["patterns"].items():
      rows.append(stamp(r) + [f"`{name}`", p.get("implementation"), fmt(p["loss"], 3),
                              fmt(p["loss_last_quarter"], 3),
                              fmt(p["top1_agreement_with_dense"], 3),
                              f"{p['tiles_visited']:.1%}",
                              fmt(p.get("max_abs_loss_diff_vs_reference"), 6)])
    out += ["", f"{r['num_seqs']} sequences of {r['seq_len']} tokens, model "
            f"{short_model(r['model'])}:", ""]
    out += table(STAMP + ["pattern", "implementation", "loss", "last quarter",
                          "top-1 agreement with dense", "tiles visited",
                          "max loss difference to reference"], rows)
    g = r.get("generate_long_prompt")
    if g:
      out += ["", f"Generation from a {g['prompt_tokens']}-token prompt through `jaxinfer "
              f"generate --implementation=pallas --sparsity={g['sparsity']}`: "
              f"{g['completion_tokens']} tokens, prefill {g['prefill_tokens_per_second']:.0f} "
              "tokens/s (interpret mode)."]
  return out


def _auto_chose(m) -> str:
  best = m.get("auto_best_tree")
  if best is not None:
    return "plain" if best == "plain" else f"{best}-token trees"
  policy = m.get("auto_policy") or ""
  return "plain" if policy.startswith("speculation turned itself off") else (
      "speculate" if policy else NA)


def sec_speculative(recs):
  rows, cost_rows, tree_rows = [], [], []
  for r in recs:
    for name, m in r.get("methods", {}).items():
      rows.append(stamp(r) + [
          short_model(r.get("model")), r.get("batch_size"),
          fmt(r.get("plain_tokens_per_second_median"), 0), name, fmt(m.get("tree_size")),
          fmt(m.get("draft_heads")), fmt(m.get("tau")), depths(m.get("per_depth_acceptance")),
          ratio(m.get("speedup")), ratio(m.get("speedup_auto_policy")), _auto_chose(m),
          fmt(m.get("draft_share")), fmt(m.get("identical_to_plain"))])
      cost = r.get("verify_cost", {}).get(str(m.get("tree_size")))
      if cost:
        cost_rows.append(stamp(r) + [
            short_model(r.get("model")), fmt(r.get("params")), r.get("batch_size"), name,
            fmt(m["tau"]), fmt(cost), ratio(m["tau"] / cost), ratio(m["speedup"]),
            fmt(m["speedup"] / m["tau"]),
            f"{ratio(m.get('speedup_auto_policy'))} ({_auto_chose(m)})"])
      sizes = m.get("auto_tree_sizes")
      if sizes:
        tree_rows.append(stamp(r) + [
            r.get("batch_size"), name, fmt(m.get("tree_size")), ratio(m.get("speedup")),
            ratio(m.get("speedup_auto_on_off")), ratio(m.get("speedup_auto_policy")),
            _auto_chose(m), ", ".join(f"{k}: {v['tokens_per_second'] / 1000:.1f}k"
                                      for k, v in sizes.items())])
  return (["## Speculative decoding", "",
           f"`{SPEC} --methods=...`: 128-token prompts of held-out stdlib source, 96 new tokens, "
           "greedy; speedup = plain time / method time for the same batch, median of interleaved "
           "rounds; \"always\" forces the proposer's tree every batch, \"auto\" is the default "
           "policy (the proposer's tree, a smaller one or plain decoding, by measured speed). "
           "τ counts the bonus token. Heads come from `experiments/train_heads.py` (below).", ""] +
          table(STAMP + ["model", "batch", "plain tok/s", "method", "tree nodes", "draft heads",
                         "τ", "per-depth acceptance", "speedup, always", "speedup, auto",
                         "auto chose", "draft share", "identical to plain"], rows) +
          ["", "### Verification cost", "",
           "The target's forward over T tokens per row against one token, measured in the same "
           "run (`verify_cost`); speedup ≤ about τ / cost. `preset:wide` is the embedded model's "
           "vocabulary at 126M parameters with random weights (`--model=preset:wide "
           "--prompt_tokens=32 --max_new_tokens=192`): far beyond the CPU's caches, so its "
           "decode step is bound by memory, as on accelerators.", ""] +
          table(STAMP + ["model", "params", "batch", "method", "τ", "verify cost", "bound τ / cost",
                         "speedup, always", "speedup / τ", "speedup, auto (chose)"], cost_rows) +
          ["", "### The auto policy's tree sizes", "",
           "The auto policy with smaller trees, against the policy limited to on / off and "
           "against speculation forced on; the last column is what the policy measured per tree "
           "size (decode tokens/s).", ""] +
          table(STAMP + ["batch", "method", "tree nodes", "always on", "auto, on / off",
                         "auto, shrinking", "auto chose", "measured per tree size"], tree_rows))


# What the records do not say about their runs (by line index in bench_spec_batching.jsonl).
SPEC_BATCHING_NOTES = {
    **{i: "plain engine: one 128-token prefill lane a step" for i in range(0, 9)},
    **{i: "plain engine: the default lanes (4 × 32)" for i in range(9, 12)},
    7: "plain engine: one 128-token lane a step; before the draft model's own cache was "
       "admitted in chunks too",
}


def _modes_identical(r) -> str:
  return "yes" if all(m.get("identical_to_plain") for m in r["modes"].values()) else "no"


def sec_spec_batching(recs):
  plain, reuse, chunked = [], [], []
  for i, r in enumerate(recs):
    m = r["modes"]
    note = SPEC_BATCHING_NOTES.get(i, NA)
    sp = lambda k: ratio(m[k]["speedup_over_plain_static"]) if k in m else NA
    base = stamp(r) + [r.get("method"), r.get("slots"), r.get("requests")]
    tau = fmt(m.get("spec-continuous", {}).get("tau"))
    if "spec-continuous-no-reuse" in m:
      gain = m["spec-continuous"]["speedup_over_plain_static"] / m[
          "spec-continuous-no-reuse"]["speedup_over_plain_static"]
      reuse.append(base + [r.get("shared_header"), r.get("prompt_tokens"), sp("plain-engine"),
                           sp("spec-static"), sp("spec-continuous"), sp("spec-continuous-no-reuse"),
                           ratio(gain), tau, fmt(m["spec-continuous"].get("prefill_tokens_saved")),
                           len(m["plain-static"]["speedup_per_repeat"]), _modes_identical(r),
                           note])
    elif "spec-continuous-whole" in m:
      c, w = m["spec-continuous"], m["spec-continuous-whole"]
      chunked.append(base + [r.get("prompt_tokens"), r.get("prefill_chunk"), sp("plain-engine"),
                             sp("spec-static"), sp("spec-continuous"),
                             sp("spec-continuous-whole"),
                             ratio(c["speedup_over_plain_static"] / w["speedup_over_plain_static"]),
                             f"{c['longest_prefill_call_ms']:.0f} / "
                             f"{w['longest_prefill_call_ms']:.0f}", tau, _modes_identical(r),
                             note])
    else:
      s, c = m["spec-static"], m["spec-continuous"]
      plain.append(base + [r.get("prompt_tokens"), fmt(r.get("prefill_chunk")), sp("plain-engine"),
                           f"{ratio(s['speedup_over_plain_static'])} ({s['occupancy']:.2f})",
                           f"{ratio(c['speedup_over_plain_static'])} ({c['occupancy']:.2f})",
                           ratio(c["speedup_over_plain_static"] / s["speedup_over_plain_static"]),
                           tau, _modes_identical(r), note])
  common = ["method", "slots", "requests"]
  return (["## Speculative decoding in continuous and static batches", "",
           "`python experiments/bench_spec_batching.py`: requests of held-out prompts with "
           "output budgets drawn from 16 / 32 / 64 / 128 tokens, greedy; each mode runs the whole "
           "workload, prompts included; time ratio against plain static batches, median of "
           "interleaved rounds. Occupancy: live rows per verification step / slots.", "",
           "### Continuous against static batches", ""] +
          table(STAMP + common + ["prompt tokens", "prefill chunk", "plain engine",
                                  "spec, static (occupancy)", "spec, continuous (occupancy)",
                                  "continuous / static", "τ", "identical", "note"], plain) +
          ["", "### Prefix reuse", "", "`--shared_header=N`: one header of held-out source "
           "before every prompt; \"tokens reused\" is one round's prompt tokens whose K/V were "
           "copied rather than computed.", ""] +
          table(STAMP + common + ["shared header", "prompt tokens", "plain engine",
                                  "spec, static", "spec, continuous", "spec, continuous, no reuse",
                                  "reuse gain", "τ", "tokens reused", "rounds", "identical",
                                  "note"], reuse) +
          ["", "### Chunked admission", "", "Prompts longer than `--prefill_chunk` are admitted "
           "in chunks, a verification step of the running rows between chunks; \"whole\" admits "
           "each in one call. Longest admission call: the longest the running rows stood still "
           "(one more round, every call waited for).", ""] +
          table(STAMP + common + ["prompt tokens", "prefill chunk", "plain engine",
                                  "spec, static", "spec, continuous", "spec, continuous, whole",
                                  "chunked / whole", "longest admission call, chunked / whole ms",
                                  "τ", "identical", "note"], chunked))


def sec_train_heads(recs):
  rows, plots = [], []
  for r in recs:
    plot = RESULTS / f"train_heads_{r.get('heads')}.png"
    if plot.is_file():
      plots.append(plot.name)
    vocab = (f"{r['draft_vocab']} ({r['draft_vocab_coverage']:.1%})"
             if r.get("draft_vocab") else NA)
    rows.append(stamp(r) + [
        r.get("method"), f"`{r.get('heads')}`", r.get("steps"),
        f"{r.get('batch_size')} × {r.get('seq_len')}",
        (f"{r['self_distilled_prompts']} self-distilled" if r.get("self_distilled_prompts")
         else "the text"), r.get("train_tokens"), fmt(r.get("accuracy_top1")),
        fmt(r.get("accuracy_top5")), fmt(r.get("tree_nodes")),
        fmt(r.get("expected_accepted_per_step")), vocab, fmt(r.get("greedy_agreement")),
        fmt(r.get("hidden_cache", False)), fmt(r.get("train_seconds"), 0),
        fmt(r.get("distill_seconds"), 1),
        f"[plot]({plot.name})" if plot.is_file() else NA])
  out = (["## Draft-head training", "",
          "`python experiments/train_heads.py --method=...`: heads trained on the embedded "
          "model's own greedy continuations (self-distilled by the batch engine) or on the "
          "stdlib text; held-out top-1 / top-5 per head (Hydra's given the path so far; EAGLE's "
          "one step ahead), and the accepted tokens per step their tree predicts. τ in serving is "
          "in the speculative table above (its draft heads column names these heads).", ""] +
         table(STAMP + ["method", "heads", "steps", "batch × seq", "data", "train tokens",
                        "held-out top-1", "held-out top-5", "tree nodes",
                        "predicted accepted / step", "draft vocabulary (coverage)",
                        "greedy agreement", "hidden cache", "train s", "distill s", "plot"], rows))
  if plots:
    out += ["", "Training curves (held-out top-1 / top-5 and predicted τ where evaluated; the "
            "first Medusa-1, Hydra and EAGLE runs show training-batch curves only):", ""]
    out += [f"![{p}]({p})" for p in plots]
  return out


def sec_hidden_cache(recs):
  rows = [stamp(r) + [r.get("model"), r.get("num_layers"), r.get("method"),
                      f"{r.get('batch_size')} × {r.get('seq_len')}",
                      fmt(r.get("seconds_per_step_tokens"), 4),
                      fmt(r.get("seconds_per_step_cache"), 4),
                      ratio(r.get("speedup")), r.get("cache_windows"),
                      fmt(r.get("cache_build_seconds"), 1),
                      f"{r['cache_bytes'] / 1e6:.0f} MB" if r.get("cache_bytes") else NA]
          for r in recs]
  return (["## Heads-only training from cached hidden states", "",
           "`python experiments/bench_hidden_cache.py`: one jitted training step with its "
           "batch, from the tensorstore cache of the base's hidden states against from token "
           "windows (which runs the frozen base), medians of interleaved rounds. The 16-layer "
           "variant has random weights (timing only).", ""] +
          table(STAMP + ["model", "layers", "method", "batch × seq", "s / step, tokens",
                         "s / step, cache", "speedup", "cache windows", "cache build s",
                         "cache size"], rows))


def sec_quant(recs):
  rows = []
  for r in recs:
    held = packed = NA
    if r.get("quantized_weights_float32_bytes"):
      f32 = r["quantized_weights_float32_bytes"]
      held = f"{r['quantized_weights_bytes'] / f32:.3f}"
      packed = f"{r['quantized_weights_packed_bytes'] / f32:.3f}"
    target = r.get("target_gap_recovered_percent", r.get("target_loss_increase_percent"))
    rows.append(stamp(r) + [
        r.get("method"), fmt(r.get("format")), r.get("steps"), fmt(r.get("learning_rate"), 4),
        fmt(r.get("heldout_loss"), 4), fmt(r.get("loss_increase_percent"), 2, "%"),
        fmt(r.get("gap_recovered_percent"), 1, "%"),
        fmt(r.get("gap_recovered_percent_vs_ptq_of_control"), 1, "%"),
        fmt(target, 1, "%"), f"{held} / {packed}", fmt(r.get("train_seconds"), 1)])
  return (["## Weight quantization: PTQ and QAT", "",
           "`python experiments/bench_quant.py --steps=N`: held-out loss (nats/token) of the "
           "embedded model after PTQ per format, after QAT, and of a full-precision control "
           "fine-tuned for the same steps; \"ptq_of_control\" quantizes the control. Gap "
           "recovered = (PTQ loss − QAT loss) / (PTQ loss − control loss); n/a (—) when the "
           "control is no better than PTQ. Target: the row's goal (loss increase for PTQ, gap "
           "recovered for QAT). Weight bytes: the quantized weights as held in memory "
           "(sub-byte values in one-byte containers) and as packed bits would take, against "
           "float32. Embeddings are not quantized.", ""] +
          table(STAMP + ["method", "format", "steps", "lr", "held-out loss", "loss increase",
                         "gap recovered", "against PTQ of control", "target",
                         "weight bytes vs float32, held / packed", "train s"], rows))


def _flatten(r, prefix="") -> dict:
  out = {}
  for k, v in r.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def sec_generic(name, recs):
  flat = [_flatten(r) for r in recs]
  cols = list(dict.fromkeys(k for f in flat for k in f if k not in ("date", "device", "jax")))
  return ([f"## {name}", "", "Every field of every record, as written.", ""] +
          table(STAMP + cols, [stamp(r) + [fmt(f.get(k), 3) for k in cols]
                               for r, f in zip(recs, flat)]))


SECTIONS = {
    "bench_batch.jsonl": sec_batch,
    "bench_decode.jsonl": sec_decode,
    "bench_vs_transformers.jsonl": sec_vs_hf,
    "bench_attention.jsonl": sec_attention,
    "long_context.json": sec_long_context,
    "bench_speculative.jsonl": sec_speculative,
    "bench_spec_batching.jsonl": sec_spec_batching,
    "train_heads.jsonl": sec_train_heads,
    "bench_hidden_cache.jsonl": sec_hidden_cache,
    "bench_quant.jsonl": sec_quant,
}


# ---------------------------------------------------------------------------------------------
# Figures recorded in the project notebook before their benchmarks wrote results files. Each is
# kept here, with what it was measured on, until a results file holds it.

NOTEBOOK = [
    ("`jaxinfer compile`: llama3-8b on a TPU v5e 2×4 slice, per device",
     "`jaxinfer compile --target=tpu:v5e:2x4 --model=preset:llama3-8b --mesh=model:8 "
     "--batch_size=64 --implementation=xla|pallas --dtype=bfloat16 --kv_pages=4096`",
     ["2026-12-03", "cpu (libtpu 0.0.42.1 compile-only client)", "0.10.2"],
     ["step", "compile", "weights", "KV", "temporaries", "total (of 16 GiB HBM)"],
     [["prefill, `xla`", "70.7 s", "1.87 GiB", "1.00 GiB", "181.6 MiB", "3.05 GiB (19%)"],
      ["decode, `xla`", "73.3 s", "1.87 GiB", "1.00 GiB", "442.9 MiB", "3.30 GiB (21%)"],
      ["prefill, `pallas`", "86.1 s", "1.87 GiB", "1.00 GiB", "61.8 MiB", "2.93 GiB (18%)"],
      ["decode, `pallas`", "90.2 s", "1.87 GiB", "1.00 GiB", "168.9 MiB", "3.04 GiB (19%)"]]),
    ("The embedded model's build (each build writes its own `report.json`)",
     "`jaxinfer quickstart`", ["2026-11-24", "cpu (2 cores), Python 3.11.7", "0.10.2"],
     ["measure", "value"],
     [["held-out loss", "4.074 nats/token (1.628 bits/char, perplexity 58.8; uniform: 8.32)"],
      ["training", "2.87M tokens seen (1.1 epochs of 2.62M), 412 s; whole build 421 s"],
      ["quickstart, first run / cached", "about 10 min (model build and generation 7 min 6 s, "
       "Medusa heads 3 min) / 17 s"],
      ["size search, fixed 150 s budget", "held-out bits/char 1.64 (d=128), 1.86 (d=192), 2.08 "
       "(d=256); a 2048-token vocabulary 1.80 at d=128"],
      ["learning rate, 600 steps", "3e-3: 1.23 bits/char, 8e-3: 1.28"]]),
    ("Persistent compilation cache", "`python experiments/bench_batch.py` run again; the test "
     "suite", [NA, "cpu (2 cores)", "0.10.2"], ["measure", "value"],
     [["engine, five step shapes (one 128-token lane a step)", "compile 6.4 s cold, 1.4 s "
       "cached; wall 12.2 s / 7.3 s, output byte-identical"],
      ["static path, four shapes", "compile 4.1 s cold, 0.8 s cached"],
      ["the test suite from an empty cache", "12½ min (217 tests) with "
       "`--xla_backend_optimization_level=0`, against 16 min (207 tests) with XLA's default"]]),
    ("The engine's step costs and options (embedded model, batch benchmark workload)",
     "`python experiments/bench_batch.py` and engine-only timing runs",
     ["2026-11-25", "cpu (2 cores)", "0.10.2"], ["measure", "value"],
     [["16-slot decode step", "1.5–1.7 ms"],
      ["step with one prefill lane of 16 / 32 / 64 / 128 tokens", "2.4 / 3.0 / 4.1 / 5.3 ms"],
      ["four lanes of 32 or eight of 16", "5.0–5.3 ms"],
      ["engine-only wall, lanes 4 × 32 / 8 × 16 / 1 × 128 / 2 × 64", "3.76 / 3.90 / 4.07 / 4.23 s"],
      ["16 prompts of 1024 tokens, 4 slots: 4 × 32 / 1 × 128 / 2 × 64", "0.94 / 0.92 / 0.92 s"],
      ["a prompt filling every lane: one lane of 128 / four lanes of 32", "0.97 / 1.09 s"],
      ["`--decode_steps=8` against 1 (96 new tokens, stop string `\\n\\n`)", "1.11–1.26× "
       "throughput; 645 tokens discarded (1.6% of 40305), 115 with 1"],
      ["multi-step decode, one 128-token lane a step", "854 dispatches instead of 1679, 3% "
       "less wall (within noise)"],
      ["output writer thread, 5 ms fsync", "1.19× the throughput of syncing each record in the "
       "loop; no different on a local disk"],
      ["`--speculative=ngram` (auto) on the 512-prompt workload", "policy measured 0.62× and "
       "turned speculation off; 2545 generated tok/s against 4226 without `--speculative` "
       "(exploration on a short job), 30 executables (37 s) against 5 (6 s)"]]),
    ("Optimizations measured and left out", "engine-only timing runs",
     ["2026-11-25", "cpu (2 cores)", "0.10.2"], ["change", "measured"],
     [["gather each slot's pages once per multi-step dispatch", "1.58 against 1.52 ms a step "
       "(8 steps a dispatch), slower at fewer"],
      ["Hydragen: decode attention split into a shared-header matmul plus per-row attention",
       "0.23–0.27 against 0.26 ms a layer"],
      ["greedy pick by max + min-index reduction instead of argmax (kept)", "0.08 against "
       "0.19 ms for 16 rows of 4096 logits"],
      ["speculative verification, 5-token chain / 29-node tree against one token", "0.45 / "
       "1.5 ms against 0.20 ms"]]),
]


def notebook() -> list[str]:
  out = ["## Recorded without a results file", "",
         "Figures from runs that predate their results files, each with what it ran on. They "
         "move into a JSONL file when next measured."]
  for title, command, (date, device, jax), header, rows in NOTEBOOK:
    when = date if date != NA else "date not recorded"
    out += ["", f"### {title}", "", f"{command}; {when}, {device}, jax {jax}.", ""]
    out += table(header, rows)
  return out


# ---------------------------------------------------------------------------------------------

def render(files: dict[str, list[dict]]) -> str:
  body = reproductions(files)
  for name, fn in SECTIONS.items():
    if files.get(name):
      body += [""] + fn(files[name]) + ["", f"Records: [`{name}`]({name})."]
  for name, recs in files.items():
    if name not in SECTIONS and recs:
      body += [""] + sec_generic(name, recs) + ["", f"Records: [`{name}`]({name})."]
  text = "\n".join(body)
  loose = [p.name for p in sorted(RESULTS.glob("*.png")) if f"({p.name})" not in text]
  if loose:
    body += ["", "## Other plots", ""] + [f"![{p}]({p})" for p in loose]
  body += [""] + notebook()
  titles = [line[3:] for line in body if line.startswith("## ")]
  anchor = lambda t: "".join(c for c in t.lower().replace(" ", "-") if c.isalnum() or c in "-_")
  devices = sorted({stamp(r)[1] for recs in files.values() for r in recs})
  where = ("every record so far is from a CPU: nothing here has run on a TPU or a GPU yet"
           if devices == ["cpu"] else "devices in these records: " + ", ".join(devices))
  head = [f"<!-- Generated by `{COMMAND}` from the results files in this folder; do not edit "
          "by hand. -->", "", "# Measured results", "",
          "Every measurement jaxinfer's experiments recorded, one table per results file, each "
          "row with the date, device and jax version of its run; " + where + ". Timings on the "
          "shared 2-core CPU drift by 10–20% between runs: compare ratios taken within one "
          "run.", ""]
  head += [f"- [{t}](#{anchor(t)})" for t in titles]
  return "\n".join(head + [""] + body) + "\n"


def main(argv: list[str]) -> int:
  args = argv[1:]
  if args not in ([], ["--check"]):
    print(f"usage: {COMMAND} [--check]; got {args}", file=sys.stderr)
    return 2
  text = render(load())
  if args == ["--check"]:
    if not PAGE.is_file() or PAGE.read_text() != text:
      print(f"{PAGE} is stale: run {COMMAND}", file=sys.stderr)
      return 1
    return 0
  PAGE.write_text(text)
  print(f"wrote {PAGE}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
