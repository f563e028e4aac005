"""The benchmark scripts a GPU session runs, exercised end to end on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def test_bench_vs_transformers_runs_both_sides_on_the_same_weights(tmp_path, tiny_model_dir):
  """The engine and transformers' generate decode the same greedy completions (float32) from
  the one Hugging Face directory the script writes, each side timed in its own process."""
  results = tmp_path / "r.jsonl"
  proc = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_vs_transformers.py"),
                         f"--model={tiny_model_dir}", "--batch_sizes=3", "--prompt_len=8",
                         "--new_tokens=6", "--repeats=1", f"--results={results}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = map(json.loads, results.read_text().splitlines())
  assert row["identical_completions"] == "3/3" and row["batch"] == 3
  assert row["jaxinfer_tokens_per_second"] > 0 and row["transformers_tokens_per_second"] > 0
  assert row["speedup"] > 0 and 0 < row["fraction_of_measured_bandwidth"]


def test_bench_speculative_measures_speedup_and_verify_cost(tmp_path, tiny_model_dir):
  """Speculation against plain decoding side by side (outputs identical), and the cost of the
  target's forward over T tokens against one, per batch size."""
  results = tmp_path / "r.jsonl"
  proc = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_speculative.py"),
                         f"--model={tiny_model_dir}", "--methods=ngram", "--batch_sizes=2",
                         "--prompt_tokens=16", "--max_new_tokens=8", "--repeats=1",
                         "--num_prompts=2",
                         f"--results={results}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = map(json.loads, results.read_text().splitlines())
  ngram = row["methods"]["ngram"]
  assert ngram["identical_to_plain"] == "2/2" and ngram["tau"] >= 1.0 and ngram["speedup"] > 0
  assert set(row["verify_cost"]) == {"1", "5"} and row["verify_cost"]["1"] == 1.0
  assert row["verify_cost"]["5"] > 0 and row["params"] > 0


def test_mikv_attention_reads_old_kv_evicted_or_rounded():
  """bench_kv_cache's MiKV measurement: with old KV evicted its attention is the sinks + window
  mask's; with every key recent it is plain causal attention; with none, attention over K and V
  rounded per token and kv head. (In a process of its own: the script defines absl flags.)"""
  check = """
import jax, numpy as np
from jaxinfer.attention import attention_reference
import bench_kv_cache as bench
q, k, v = (jax.random.normal(jax.random.key(i), (2, 40, heads, 16))
           for i, heads in enumerate((4, 2, 2)))
pos = jax.numpy.broadcast_to(jax.numpy.arange(40), (2, 40))
same = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
same(bench.mixed_precision_chunk(None, 8, 3)(q, k, v, pos),
     attention_reference(q, k, v, pos, pos, window=8, sinks=3))
same(bench.mixed_precision_chunk(4, 40, 0)(q, k, v, pos), attention_reference(q, k, v, pos, pos))
low = bench.mixed_precision_chunk(4, 0, 0)(q, k, v, pos)
same(low, attention_reference(q, bench.rounded(k, 4), bench.rounded(v, 4), pos, pos))
assert float(abs(low - attention_reference(q, k, v, pos, pos)).max()) > 1e-3
print("ok")
"""
  proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                        timeout=300, cwd=EXPERIMENTS)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
