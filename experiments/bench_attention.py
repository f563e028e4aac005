"""Attention kernel throughput against the device's measured ceilings, all in one run.

  python experiments/bench_attention.py            # on a GPU: the full sweep
  python experiments/bench_attention.py --quick    # anywhere (CPU: interpret mode, checks only)

1. Dense causal forward TFLOP/s, bf16, head dim 128, seq 4k..32k: our block-sparse kernel with a
   causal mask vs jax.nn.dot_product_attention (cuDNN, where available, and XLA).
2. Time against block density 0.05..1.0 (random block masks at one length): goal, time within
   1.25x of density x dense time down to density 0.1.
3. Paged decode attention at batch 64, context 8k: achieved HBM bandwidth (K and V bytes read /
   time) as a fraction of the measured ceiling (goal >= 75%).
jax's own kernels for the same jobs run side by side (`jax_*` fields): on GPU its Triton flash
attention (mha) and its paged and split-K decode kernels; on TPU splash and its paged kernel; on
CPU all of them interpreted (checks only). Results are appended to
experiments/results/bench_attention.jsonl with device, jax version, date.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import sys
from pathlib import Path

from absl import app, flags

from jaxinfer import output

flags.DEFINE_bool("quick", False, "Small shapes (checks the script end to end; use on CPU).")
flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Dense sweep lengths.")
flags.DEFINE_integer("density_seq_len", 8192, "Length for the density sweep.")
flags.DEFINE_list("benches", ["dense", "density", "paged"], "Which of the three to run.")
flags.DEFINE_string("results", str(Path(__file__).parent / "results" / "bench_attention.jsonl"),
                    "Results file (JSON lines, appended).")
FLAGS = flags.FLAGS


def upstream_kernels(job: str, platform: str, q, k, v, lengths=None, table=None):
  """{name: (fn, args)}: jax's own kernels for `job` on `platform`, over our inputs (re-laid out
  here, outside the timing; q pre-scaled where a kernel takes no scale); CPU interprets all.
  "dense": causal prefill, q (B,N,T,H), k/v (B,K,T,H): Triton mha on GPU ((B,T,N,H), no GQA, so
  kv heads repeated), splash on TPU (vmapped over the batch). "decode": q (B,N,H), page pools
  (K,P,ps,H): the paged kernels (GPU, TPU), and on GPU the split-K decode kernel over the same
  pages gathered into a contiguous (B,S,K,H) cache."""
  import jax
  import jax.numpy as jnp
  h, interpret, out = q.shape[-1], platform == "cpu", {}
  gpu, tpu = platform in ("gpu", "cpu"), platform in ("tpu", "cpu")
  if gpu:
    from jax.experimental.pallas.ops.gpu import attention, decode_attention, paged_attention
  if tpu:
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import paged_attention as tpu_paged
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if job == "dense" and gpu:
    bthn = lambda x: jnp.repeat(x, q.shape[1] // x.shape[1], axis=1).transpose(0, 2, 1, 3)
    fn = functools.partial(attention.mha, segment_ids=None, sm_scale=h**-0.5, causal=True,
                           interpret=interpret)
    out["jax_triton_mha"] = fn, (bthn(q), bthn(k), bthn(v))
  if job == "dense" and tpu:
    n, t, block = q.shape[1], q.shape[2], min(512, q.shape[2])
    kernel = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([sa.CausalMask((t, t))] * n), interpret=interpret,
        block_sizes=sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block))
    out["jax_splash"] = jax.jit(lambda q, k, v: jax.vmap(kernel)(q * h**-0.5, k, v)), (q, k, v)
  if job == "decode" and gpu:
    out["jax_gpu_paged"] = jax.jit(lambda q, k, v: paged_attention.paged_attention(
        q * h**-0.5, k, v, table, lengths, k_splits=16, interpret=interpret)), (q, k, v)
    contiguous = lambda pool: pool[:, table].reshape(pool.shape[0], table.shape[0], -1,
                                                     h).transpose(1, 2, 0, 3)
    out["jax_gpu_decode"] = (jax.jit(lambda q, k, v: decode_attention.gqa(
        q, k, v, kv_seq_len=lengths, k_splits=16, interpret=interpret)),
        (q, contiguous(k), contiguous(v)))
  if job == "decode" and tpu:
    def paged(q, k, v):  # TPU interpret mode is set where the kernel is traced and run
      with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        return tpu_paged.paged_attention(q * h**-0.5, k, v, lengths, table,
                                         pages_per_compute_block=8)
    out["jax_tpu_paged"] = paged, (q, k, v)
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxinfer.roofline import measure_ceilings, time_fn
  from pallas_kernels.block_sparse_attention import block_sparse_attention, mask_info, masks
  from pallas_kernels.paged_attention import paged_attention

  platform = jax.default_backend()
  on_cpu = platform == "cpu"
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

  def emit(row):  # appended at once: a later failure or timeout keeps the rows so far
    row = {**row, **meta}
    output.append_jsonl(FLAGS.results, [row])
    print(json.dumps({k: v for k, v in row.items() if k != "ceilings"}), file=sys.stderr,
          flush=True)

  def measure(row, name, fn, inputs, *, flops=None, bytes_read=None, prefix=None):
    """Times fn(*inputs) into row[f"{prefix}ms"] etc. (prefix defaults to f"{name}_"); a failure
    (e.g. cuDNN or an upstream kernel without this shape) is recorded, not raised."""
    p = f"{name}_" if prefix is None else prefix
    try:
      s = time_fn(lambda: fn(*inputs), repeats=repeats)
    except Exception as e:
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
      return
    row[f"{p}ms"] = s * 1e3
    if flops:
      row[f"{p}tflops"] = flops / s / 1e12
      row[f"{p}fraction_of_matmul_peak"] = flops / s / 1e12 / ceilings.matmul_tflops
    if bytes_read:
      row[f"{p}gbps"] = bytes_read / s / 1e9
      row[f"{p}fraction_of_measured_bandwidth"] = bytes_read / s / 1e9 / ceilings.bandwidth_gbps

  def upstream(row, job, *args, **kw):
    try:
      kernels = upstream_kernels(job, platform, *args)
    except Exception as e:  # an API change in this jax version
      row["jax_error"] = f"{type(e).__name__}: {str(e)[:200]}"
      return
    for name, (fn, inputs) in kernels.items():
      measure(row, name, fn, inputs, **kw)

  def qkv(t):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, n, t, h), dtype),
            jax.random.normal(ks[1], (b, kh, t, h), dtype),
            jax.random.normal(ks[2], (b, kh, t, h), dtype))

  # 1. dense causal
  for t in seq_lens if "dense" in FLAGS.benches else []:
    q, k, v = qkv(t)
    info = mask_info(masks.Causal((t, t)), block, block)
    ours = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, info))
    flops = 4 * b * n * h * t * t / 2
    row = {"bench": "dense_causal", "seq_len": t}
    measure(row, "ours", ours, (q, k, v), flops=flops)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    for impl in (["xla"] if on_cpu else ["cudnn", "xla"]):
      fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation=impl))
      measure(row, impl, fn, (qt, kt, vt), flops=flops)
    upstream(row, "dense", q, k, v, flops=flops)
    emit(row)

  # 2. density sweep (random block masks; the diagonal block always kept)
  rng = np.random.RandomState(0)
  if "density" in FLAGS.benches:
    t = 512 if quick else FLAGS.density_seq_len
    q, k, v = qkv(t)
    nb = t // block
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
      emit({"bench": "density", "seq_len": t, "requested_density": density, "density": actual,
            "ms": seconds * 1e3, "time_over_density_x_dense": seconds / (actual * base)})

  # 3. paged decode
  if "paged" in FLAGS.benches:
    batch, ctx, ps = (4, 512, 16) if quick else (64, 8192, 64)
    pages = ctx // ps
    ks = jax.random.split(jax.random.key(1), 3)
    qd = jax.random.normal(ks[0], (batch, n, h), dtype)
    kp = jax.random.normal(ks[1], (kh, batch * pages, ps, h), dtype)
    vp = jax.random.normal(ks[2], (kh, batch * pages, ps, h), dtype)
    table = jnp.asarray(rng.permutation(batch * pages).reshape(batch, pages), jnp.int32)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    fn = jax.jit(lambda q, kp, vp: paged_attention(q, kp, vp, lengths, table))
    bytes_read = 2 * kp.size * kp.dtype.itemsize
    row = {"bench": "paged_decode", "batch": batch, "context": ctx, "page_size": ps}
    measure(row, "ours", fn, (qd, kp, vp), bytes_read=bytes_read, prefix="")
    upstream(row, "decode", qd, kp, vp, lengths, table, bytes_read=bytes_read)
    emit(row)


if __name__ == "__main__":
  app.run(main)
