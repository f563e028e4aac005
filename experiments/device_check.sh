#!/usr/bin/env bash
# Everything a session with a GPU (H100/H200) measures, in one call of under 8 minutes, the
# quickest and steadiest measurements first (a step the budget does not reach is skipped):
#   1. bench_attention.py: paged decode, dense causal, block density; jax's own kernels alongside
#   2. bench_decode.py on preset:llama3-8b (random weights), batch 1, in bfloat16 and with int8 /
#      int4:g128 weights (QUANT_FORMATS) in one process, each format's row written when measured
#   3. engine_on_device.py: the engine through the Pallas kernels against XLA
#   4. the kernel tests compiled for the GPU (Triton), not interpreted
#   5. bench_vs_transformers.py at its planned sizes (8B, batch 64/128/256), if torch is there
# then a summary against the targets, each ratio taken against the ceilings (HBM bandwidth, matmul
# peak) that the same benchmark process measured.
#
#   bash experiments/device_check.sh                 # from the repository root; OUT=./device_out
#   OUT=/tmp/x DEVICE_CHECK_BUDGET_S=300 bash experiments/device_check.sh
#   WHEELS=.whl bash experiments/device_check.sh      # first installs .whl/*.whl (offline)
#   ARCHIVE=/tmp/dc.tgz bash experiments/device_check.sh  # $OUT packed in one file after each step
#
# A dry run on a CPU (benchmarks in their quick / interpret forms, a tiny model):
#   TEST_PLATFORMS=cpu DECODE_ARGS="--model=preset:tiny --prompt_len=8 --new_tokens=8" \
#     VS_ARGS="--model=preset:tiny --batch_sizes=2 --prompt_len=8 --new_tokens=4" \
#     QUANT_FORMATS=none,int8,int4:g16 bash experiments/device_check.sh
#
# The repository is the working directory and jax is preinstalled (no network: nothing is
# installed; PYTHONPATH=. instead; a missing or failed WHEELS install is recorded as the step
# "wheels", and only what needs those packages fails). Each step has its own timeout, cut to
# what is left of the budget; a failed or timed-out step is recorded and the next one runs.
# Under $OUT: one log per step, steps.tsv (step, exit code, seconds; 124 = timed out), results/
# (experiments/results/'s files with this run's rows appended: copy them back), among them
# results/device_check.jsonl (the steps, the kernel tests and the summary against the targets,
# with device, jax version and date; the benchmarks' rows are in their own files).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_out}
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/kernel_tests.xml" "$OUT/engine_on_device.json"  # (a rerun's are its own)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
RESERVE=20  # seconds kept for the rows and the summary
START=$SECONDS
TEST_PLATFORMS=${TEST_PLATFORMS:-cuda,cpu}
KERNEL_TESTS=${KERNEL_TESTS:-tests/test_paged_attention.py tests/test_tree_attention.py \
tests/test_block_sparse_attention.py \
tests/test_kv_cache_int8.py::test_kernels_read_pools_of_several_heads_a_row[gpu]}
DECODE_ARGS=${DECODE_ARGS:---model=preset:llama3-8b}
VS_ARGS=${VS_ARGS:---model=preset:llama3-8b --dtype=bfloat16 --batch_sizes=64,128,256}
QUANT_FORMATS=${QUANT_FORMATS:-none,int8,int4:g128}
RESULTS="$OUT/results"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
pack() {  # $OUT (logs, results) as one file, for a caller that takes few files back
  [ -z "${ARCHIVE:-}" ] && return
  tar czf "$ARCHIVE.part" -C "$OUT" . && mv "$ARCHIVE.part" "$ARCHIVE"
}

if [ -n "${WHEELS:-}" ]; then  # packages the machine lacks (e.g. qwix), as wheels: no network
  SITE=${TMPDIR:-/tmp}/device_check_site
  if compgen -G "$WHEELS/*.whl" > /dev/null && "$PY" -m pip install -q --no-index --no-deps \
      --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "== wheels: no $WHEELS/*.whl, or their install failed (wheels.log); going on without"
    printf 'wheels\t1\t0\n' >> "$STEPS"
  fi
fi

DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
DEVICE=${DEVICE:-no nvidia-smi}
JAX_VERSION=$($PY -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "not importable")
RUN_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "device_check: $DEVICE, jax $JAX_VERSION, $RUN_DATE, budget ${BUDGET}s, out $OUT"

# results/ starts as a copy of experiments/results/; rows past these counts are this run's.
declare -A BEFORE
for f in bench_attention bench_decode bench_vs_transformers device_check; do
  if [ -f "experiments/results/$f.jsonl" ] && [ ! -f "$RESULTS/$f.jsonl" ]; then
    cp "experiments/results/$f.jsonl" "$RESULTS/$f.jsonl"
  fi
  touch "$RESULTS/$f.jsonl"
  BEFORE[$f]=$(wc -l < "$RESULTS/$f.jsonl")
done

step() {  # step NAME LIMIT_S CMD...: CMD under min(LIMIT_S, budget left), output to NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - RESERVE - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: skipped, budget spent"
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    return
  fi
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  echo "   exit $rc after $((SECONDS - t0))s$( ((rc == 124)) && echo ' (timed out)')"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  pack
}

# 0. what is installed, and that jax sees the GPU
step env 60 bash -c "nvidia-smi; $PY -V; $PY -m pip list 2>/dev/null | grep -iE \
'^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy|absl|pytest|hypothesis|torch|transformers) '; \
JAX_PLATFORMS=$TEST_PLATFORMS $PY -c 'import jax; print(jax.default_backend(), jax.devices())'"

# 1, 2. the attention benchmarks, one process per part (a crash or timeout costs only its part),
# and 8B decode at batch 1 (random weights): bfloat16 first, then each quantized format against it
attention() {  # attention PART LIMIT_S
  step "bench_attention_$1" "$2" "$PY" experiments/bench_attention.py --benches="$1" \
    --results="$RESULTS/bench_attention.jsonl"
}
attention paged 45
attention dense 90
attention density 45
# shellcheck disable=SC2086
step bench_decode 150 "$PY" experiments/bench_decode.py --batch_sizes=1 --new_tokens=64 \
  --repeats=2 $DECODE_ARGS --quantize="$QUANT_FORMATS" --results="$RESULTS/bench_decode.jsonl"

# 3. the engine's steps through the Pallas kernels against XLA's: plain, a dynamic pattern, ngram,
# layerskip (a draft model in the pages); the output is rewritten after each mode
step engine 90 "$PY" experiments/engine_on_device.py --output="$OUT/engine_on_device.json"

# 4. kernel tests on the GPU. tests/conftest.py defaults JAX_PLATFORMS to cpu (interpret mode):
# set here, the default path compiles the kernels with Triton. Compiling dominates (a Triton
# compile per hypothesis example), so with xdist there the tests spread over 8 processes that
# share the GPU (no preallocation); without it they run in one.
PARALLEL=(-p no:xdist)
if $PY -c 'import xdist' > /dev/null 2>&1; then
  PARALLEL=(-n "${TEST_WORKERS:-8}" --dist load)
fi
set -f  # KERNEL_TESTS is a list of test ids, some with [brackets]: no globbing
# shellcheck disable=SC2086
JAX_PLATFORMS=$TEST_PLATFORMS XLA_PYTHON_CLIENT_PREALLOCATE=false step kernel_tests 150 \
  "$PY" -m pytest -o addopts= "${PARALLEL[@]}" -v -rfE -p no:cacheprovider \
  --junitxml="$OUT/kernel_tests.xml" $KERNEL_TESTS
set +f

# 5. jaxinfer vs transformers at the planned sizes, with what is left of the budget; each batch
# size's row is written when done
if $PY -c 'import torch, transformers' > /dev/null 2>&1; then
  # shellcheck disable=SC2086
  step bench_vs_transformers 600 "$PY" experiments/bench_vs_transformers.py --repeats=1 \
    $VS_ARGS --results="$RESULTS/bench_vs_transformers.jsonl"
else
  echo "== bench_vs_transformers: skipped, torch/transformers not installed here"
  printf 'bench_vs_transformers\tno torch\t0\n' >> "$STEPS"
fi

# Rows for device_check.jsonl, and the summary against the targets.
OUT="$OUT" DEVICE="$DEVICE" JAX_VERSION="$JAX_VERSION" RUN_DATE="$RUN_DATE" \
  BEFORE_ATTENTION=${BEFORE[bench_attention]} BEFORE_DECODE=${BEFORE[bench_decode]} \
  BEFORE_VS=${BEFORE[bench_vs_transformers]} "$PY" - <<'EOF'
import json, os, re, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
res = out / "results"
stamp = {"device": os.environ["DEVICE"], "jax": os.environ["JAX_VERSION"],
         "date": os.environ["RUN_DATE"]}


def new_rows(name, before):
  path = res / f"{name}.jsonl"
  lines = path.read_text().splitlines()[int(before):] if path.exists() else []
  return [json.loads(l) for l in lines if l.strip()]


steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
  name, rc, secs = line.split("\t")
  steps[name] = {"exit": rc, "seconds": int(secs)}

rows = [{"step": "steps", "steps": steps}]
tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
junit = out / "kernel_tests.xml"
if junit.exists():
  for case in ET.parse(junit).getroot().iter("testcase"):
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    if bad is not None:
      tests["failed" if bad.tag == "failure" else "errors"] += 1
      tests["failures"].append(f"{case.get('classname')}::{case.get('name')}: "
                               f"{(bad.get('message') or '')[:160]}")
    elif case.find("skipped") is not None:
      tests["skipped"] += 1
    else:
      tests["passed"] += 1
else:  # killed before pytest wrote its report: count the -v lines
  log = out / "kernel_tests.log"
  text = log.read_text(errors="replace") if log.exists() else ""
  seen = {}  # test id -> outcome, from "tests/x.py::t PASSED" or xdist's "PASSED tests/x.py::t"
  for m in re.finditer(r"(tests/\S+::\S+) (PASSED|FAILED|ERROR)|(PASSED|FAILED|ERROR) "
                       r"(tests/\S+::\S+)", text):
    seen.setdefault(m.group(1) or m.group(4), m.group(2) or m.group(3))
  for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("ERROR", "errors")):
    tests[key] = sum(o == word for o in seen.values())
  tests["failures"] = [t for t, o in seen.items() if o != "PASSED"]
  tests["note"] = "no junit report (timed out or crashed); counts from the log"
rows.append({"step": "kernel_tests", **tests})
engine = out / "engine_on_device.json"
if engine.exists():
  rows.append({"step": "engine", **json.loads(engine.read_text())})
attention = new_rows("bench_attention", os.environ["BEFORE_ATTENTION"])
decode = new_rows("bench_decode", os.environ["BEFORE_DECODE"])
vs = new_rows("bench_vs_transformers", os.environ["BEFORE_VS"])


def bw(r, gbps):  # fraction of the HBM bandwidth the same process measured
  return gbps / r["ceilings"]["bandwidth_gbps"]


def peak(r, tflops):  # fraction of the matmul peak the same process measured
  return tflops / r["ceilings"]["matmul_tflops"]


verdict = lambda ok: "PASS" if ok else "FAIL"
lines, summary = [], {}
for r in (r for r in attention if r.get("bench") == "paged_decode"):
  if "gbps" in r:
    f = bw(r, r["gbps"])
    summary["paged_decode_fraction_of_hbm"] = f
    extra = ", ".join(f"{k[:-5]} {bw(r, v):.0%}" for k, v in r.items()
                      if k.startswith("jax_") and k.endswith("_gbps"))
    lines.append(f"paged decode B{r['batch']} ctx {r['context']}: {r['gbps']:.0f} GB/s = "
                 f"{f:.0%} of HBM (goal >= 75%) {verdict(f >= 0.75)}  [jax: {extra or '-'}]")
  else:
    lines.append(f"paged decode: no measurement ({r.get('ours_error', '?')[:100]})")
dense = [r for r in attention if r.get("bench") == "dense_causal"]
for r in dense:
  if "ours_tflops" in r:
    f = peak(r, r["ours_tflops"])
    summary[f"dense_{r['seq_len']}_fraction_of_matmul_peak"] = f
    extra = ", ".join(f"{k[:-7]} {peak(r, v):.0%}" for k, v in r.items()
                      if k.endswith("_tflops") and not k.startswith("ours"))
    lines.append(f"dense causal T={r['seq_len']}: {r['ours_tflops']:.0f} TFLOP/s = {f:.0%} of "
                 f"matmul peak (goal >= 50%) {verdict(f >= 0.5)}  [{extra or '-'}]")
  else:
    lines.append(f"dense causal T={r['seq_len']}: no measurement "
                 f"({r.get('ours_error', '?')[:100]})")
density = [r for r in attention if r.get("bench") == "density"]
if density:
  # "down to density 0.1": the sweep's requested densities (the kept blocks round them)
  asked = lambda r: r.get("requested_density", r["density"])
  worst = max((r["time_over_density_x_dense"] for r in density if asked(r) >= 0.1 - 1e-9),
              default=float("nan"))
  summary["block_sparse_worst_time_over_density_x_dense"] = worst
  each = ", ".join(f"d={r['density']:.2f}: {r['time_over_density_x_dense']:.2f}" for r in density)
  lines.append(f"block-sparse time / (density x dense), density >= 0.1: worst {worst:.2f} "
               f"(goal <= 1.25) {verdict(worst <= 1.25)}  [{each}]")
for r in (r for r in decode if r.get("batch") == 1):
  weights = r.get("weights", "none")
  if weights == "none":
    f = bw(r, r["achieved_gbps"])
    summary.setdefault("decode_8b_batch1_fraction_of_hbm", f)
    lines.append(f"decode {r['model']} batch 1: {r['decode_tokens_per_second']} tok/s, "
                 f"{r['achieved_gbps']} GB/s = {f:.0%} of HBM (goal >= 80% for 8B) "
                 f"{verdict(f >= 0.8)}")
  elif "speedup_vs_unquantized" in r:
    x = r["speedup_vs_unquantized"]
    goal = {"int8": 1.3}.get(weights, 1.6 if weights.startswith("int4") else None)
    summary[f"decode_batch1_{weights}_vs_unquantized"] = x
    lines.append(f"decode {r['model']} batch 1, {weights} weights: {x}x the unquantized step, "
                 f"{r['decode_tokens_per_second']} tok/s"
                 + (f" (goal >= {goal}x) {verdict(x >= goal)}" if goal else ""))
for r in vs:
  lines.append(f"vs transformers B{r['batch']}: {r['jaxinfer_tokens_per_second']:.0f} vs "
               f"{r['transformers_tokens_per_second']:.0f} tok/s (x{r['speedup']}), "
               f"{r['identical_completions']} identical")
rows.append({"step": "summary", **summary})
with open(res / "device_check.jsonl", "a") as f:
  f.write("".join(json.dumps({**r, **stamp}) + "\n" for r in rows))

print(f"\n==== summary: {stamp['device']}, jax {stamp['jax']}, {stamp['date']}")
for name, s in steps.items():
  print(f"  step {name:<26} exit {s['exit']:<8} {s['seconds']:>4}s")
print(f"  kernel tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
      f"errors{' (' + tests['note'] + ')' if 'note' in tests else ''}")
for fail in tests["failures"][:8]:
  print(f"    {fail}")
if engine.exists():
  e = json.loads(engine.read_text())
  print("  engine, Pallas against XLA: " + ", ".join(
      f"{m} {e[m]['identical']} identical ({e[m]['seconds']})" for m in e
      if isinstance(e[m], dict)))
for line in lines or ["no benchmark results"]:
  print(f"  {line}")
print(f"  rows: {res / 'device_check.jsonl'}; logs: {out}")
EOF
pack
echo "device_check: done in $((SECONDS - START))s"
