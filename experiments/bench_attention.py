"""Attention kernel throughput against the device's measured ceilings, all in one run.

  python experiments/bench_attention.py            # on a GPU: the full sweep
  python experiments/bench_attention.py --quick    # anywhere (CPU: interpret mode, checks only)

1. Dense causal forward TFLOP/s, bf16, head dim 128, seq 4k..32k: our block-sparse kernel with a
   causal mask vs jax.nn.dot_product_attention (cuDNN, where available, and XLA).
2. Time against block density 0.05..1.0 (random block masks at one length): goal, time within
   1.25x of density x dense time down to density 0.1.
3. Paged decode attention at batch 64, context 8k: achieved HBM bandwidth (K and V bytes read /
   time) as a fraction of the measured ceiling (goal >= 75%).
Results are appended to experiments/results/bench_attention.jsonl with device, jax version, date.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_bool("quick", False, "Small shapes (checks the script end to end; use on CPU).")
flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Dense sweep lengths.")
flags.DEFINE_integer("density_seq_len", 8192, "Length for the density sweep.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_attention.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer.roofline import measure_ceilings, time_fn
  from pallas_kernels.block_sparse_attention import block_sparse_attention, mask_info, masks
  from pallas_kernels.paged_attention import paged_attention

  on_cpu = jax.default_backend() == "cpu"
  quick = FLAGS.quick or on_cpu
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  b, n, kh, h = (1, 2, 1, 32) if quick else (1, 32, 8, 128)
  seq_lens = [256, 512] if quick else [int(s) for s in FLAGS.seq_lens]
  block = 64 if quick else 128
  repeats = 2 if quick else 10
  ceilings = measure_ceilings(matmul_dtype=dtype)
  meta = {"device": ceilings.device_kind, "backend": ceilings.backend, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "dtype": jnp.dtype(dtype).name,
          "ceilings": ceilings.as_dict(), "interpret": on_cpu}
  rows = []

  def emit(row):
    row = {**row, **meta}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "ceilings"}), file=sys.stderr,
          flush=True)

  def qkv(t):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, n, t, h), dtype),
            jax.random.normal(ks[1], (b, kh, t, h), dtype),
            jax.random.normal(ks[2], (b, kh, t, h), dtype))

  # 1. dense causal
  for t in seq_lens:
    q, k, v = qkv(t)
    info = mask_info(masks.Causal((t, t)), block, block)
    ours = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, info))
    flops = 4 * b * n * h * t * t / 2
    seconds = time_fn(lambda: ours(q, k, v), repeats=repeats)
    row = {"bench": "dense_causal", "seq_len": t, "ours_ms": seconds * 1e3,
           "ours_tflops": flops / seconds / 1e12,
           "ours_fraction_of_matmul_peak": flops / seconds / 1e12 / ceilings.matmul_tflops}
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    for impl in (["xla"] if on_cpu else ["cudnn", "xla"]):
      fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation=impl))
      try:
        s = time_fn(lambda: fn(qt, kt, vt), repeats=repeats)
        row[f"{impl}_ms"] = s * 1e3
        row[f"{impl}_tflops"] = flops / s / 1e12
      except Exception as e:  # e.g. cuDNN unavailable for this shape/dtype
        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    emit(row)

  # 2. density sweep (random block masks; the diagonal block always kept)
  t = 512 if quick else FLAGS.density_seq_len
  q, k, v = qkv(t)
  nb = t // block
  rng = np.random.RandomState(0)
  base = None
  for density in [1.0, 0.5, 0.25, 0.1, 0.05]:
    keep = max(1, round(density * nb))
    blocks = np.zeros((nb, nb), bool)
    for i in range(nb):
      blocks[i, rng.choice(nb, keep, replace=False)] = True
    dense = np.kron(blocks, np.ones((block, block), bool))
    info = mask_info(masks.Dense(dense), block, block)
    fn = jax.jit(lambda q, k, v, info=info: block_sparse_attention(q, k, v, info))
    seconds = time_fn(lambda: fn(q, k, v), repeats=repeats)
    base = seconds if density == 1.0 else base
    actual = info.density()
    emit({"bench": "density", "seq_len": t, "density": actual, "ms": seconds * 1e3,
          "time_over_density_x_dense": seconds / (actual * base)})

  # 3. paged decode
  batch, ctx, ps = (4, 512, 16) if quick else (64, 8192, 64)
  pages = ctx // ps
  ks = jax.random.split(jax.random.key(1), 3)
  qd = jax.random.normal(ks[0], (batch, n, h), dtype)
  kp = jax.random.normal(ks[1], (kh, batch * pages, ps, h), dtype)
  vp = jax.random.normal(ks[2], (kh, batch * pages, ps, h), dtype)
  table = jnp.asarray(rng.permutation(batch * pages).reshape(batch, pages), jnp.int32)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  fn = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, lengths, table))
  seconds = time_fn(lambda: fn(qd, kp, vp), repeats=repeats)
  bytes_read = 2 * kp.size * kp.dtype.itemsize
  emit({"bench": "paged_decode", "batch": batch, "context": ctx, "page_size": ps,
        "ms": seconds * 1e3, "gbps": bytes_read / seconds / 1e9,
        "fraction_of_measured_bandwidth": bytes_read / seconds / 1e9 / ceilings.bandwidth_gbps})

  output.append_jsonl(FLAGS.results, rows)


if __name__ == "__main__":
  app.run(main)
