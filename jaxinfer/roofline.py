"""The device's own ceilings, measured in the same run as a benchmark so results can be stated
as fractions of them: memory bandwidth (a large on-device elementwise pass) and peak matmul
FLOP/s (a large square matmul in the benchmark's dtype), each the best of several timings."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def time_fn(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
  """Median seconds per call; `fn` must return JAX arrays (they are waited on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Ceilings:
  bandwidth_gbps: float  # GB/s, bytes read + written
  matmul_tflops: float
  matmul_dtype: str
  backend: str
  device_kind: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _best_seconds(fn: Callable[[], object], rounds: int, calls: int, warm_s: float) -> float:
  """Shortest seconds per call over `rounds` timings of `calls` back-to-back calls, after `warm_s`
  seconds of calls (a ceiling is a best case: a GPU's clocks rise under load, and one call's
  launch hides behind the previous call's run)."""
  end = time.perf_counter() + warm_s
  jax.block_until_ready(fn())
  while time.perf_counter() < end:
    jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready([fn() for _ in range(calls)])
    best = min(best, (time.perf_counter() - t0) / calls)
  return best


def measure_ceilings(matmul_dtype=jnp.bfloat16, copy_bytes: int | None = None,
                     matmul_n: int | None = None) -> Ceilings:
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  copy_bytes = copy_bytes or (256 * 2**20 if on_cpu else 4 * 2**30)
  matmul_n = matmul_n or (1024 if on_cpu else 8192)
  rounds, calls, warm_s = (3, 1, 0.0) if on_cpu else (10, 5, 0.5)

  x = jnp.ones((copy_bytes // 4,), jnp.float32)
  scale = jax.jit(lambda x: x * 1.0001)  # one read + one write per element; not elided
  t = _best_seconds(lambda: scale(x), rounds, calls, warm_s)
  bandwidth = 2 * copy_bytes / t / 1e9
  del x

  a = jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), jnp.float32).astype(matmul_dtype)
  mm = jax.jit(lambda a: a @ a)  # output in the input's dtype, as a model's matmuls
  t = _best_seconds(lambda: mm(a), rounds, calls, warm_s)
  tflops = 2 * matmul_n**3 / t / 1e12
  return Ceilings(round(bandwidth, 1), round(tflops, 2), jnp.dtype(matmul_dtype).name, backend,
                  jax.devices()[0].device_kind)
