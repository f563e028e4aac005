"""One engine replica: the scheduler's plans executed by one jitted, fixed-shape step.

S slots, G lanes of Q prompt tokens, M pages per sequence, P pages in the pool, V vocab.
The KV page pools are donated to every step and updated in place; each step returns one sampled
token per slot (meaningful for the slots that sampled).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.engine.pages import PagePool
from jaxinfer.engine.scheduler import EngineRequest, EngineResult, Scheduler, StepPlan
from jaxinfer.kv_cache import MixedPagedKVCache, PagedKVCache
from jaxinfer.sampling import SamplingParams, sample
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules
from jaxinfer.sparsity import DENSE, Sparsity


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  num_slots: int = 16
  chunk_size: int = 128  # Q: prompt tokens per lane per step
  chunk_lanes: int = 1  # G
  page_size: int = 16
  kv_pages: int | None = None  # P; None: every slot's longest request, plus 50% for prefixes

  def __post_init__(self):
    for name in ("num_slots", "chunk_size", "chunk_lanes", "page_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"EngineConfig: {name} must be >= 1, got {getattr(self, name)}")
    if self.kv_pages is not None and self.kv_pages < 1:
      raise ValueError(f"EngineConfig: kv_pages must be >= 1, got {self.kv_pages}")


@dataclasses.dataclass
class EngineStats:
  steps: int = 0
  busy_s: float = 0.0
  compile_s: float = 0.0
  compilations: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0
  prefill_tokens_saved: int = 0
  occupancy_sum: float = 0.0
  peak_pages: int = 0
  pool_pages: int = 0
  mixed_busy_s: float = 0.0  # steps that prefilled (and decoded)
  decode_busy_s: float = 0.0  # steps that only decoded
  pure_decode_tokens: int = 0

  @property
  def mean_occupancy(self) -> float:
    return self.occupancy_sum / self.steps if self.steps else 0.0


def engine_step(params, k, v, last_token, tokens, from_device, positions, decode_table,
                chunk_table, sample_rows, sample_index, sampled, key_data, temperature, top_k,
                top_p, min_p, *, cfg, implementation, sparsity, mesh, rules):
  s = decode_table.shape[0]
  # Decode rows (the first S) feed the token this slot sampled at the previous step.
  device_tokens = jnp.pad(last_token, (0, tokens.shape[0] - s))
  tokens = jnp.where(from_device, device_tokens, tokens)
  cache = MixedPagedKVCache(k, v, decode_table, chunk_table)
  hidden, cache = M.forward(params, tokens[None], positions[None], cfg, cache, kv_source="cache",
                            implementation=implementation, sparsity=sparsity, mesh=mesh,
                            rules=rules)
  logits = M.logits(params, hidden[0, sample_rows])  # (S, V)
  keys = jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(
      key_data, sample_index)
  tok = sample(logits, SamplingParams(temperature, top_k, top_p, min_p), keys)
  return cache.k, cache.v, jnp.where(sampled, tok, last_token), tok


def pool_pages_for(cfg: EngineConfig, max_pages_per_request: int) -> int:
  return cfg.kv_pages or int(cfg.num_slots * max_pages_per_request * 1.5) + 1


class Engine:
  """Runs requests to completion with continuous batching on one replica (a mesh of the
  fsdp/model axes, or one device)."""

  def __init__(self, model_cfg: ModelConfig, params: M.Transformer, cfg: EngineConfig,
               max_len: int, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
               implementation: str = "xla", sparsity: Sparsity = DENSE):
    if sparsity.dynamic:
      raise ValueError(f"Engine: {sparsity} needs whole-prompt prefill; the engine prefills in "
                       f"chunks (use the static Generator)")
    self.model_cfg, self.params, self.cfg = model_cfg, params, cfg
    self.mesh, self.rules = mesh, rules
    ps = cfg.page_size
    self.max_pages = max(1, -(-max_len // ps))
    self.num_pool_pages = pool_pages_for(cfg, self.max_pages)
    self.k, self.v = PagedKVCache.init_pools(model_cfg, self.num_pool_pages, ps, mesh, rules)
    self.last_token = jnp.zeros((cfg.num_slots,), jnp.int32)
    self.stats = EngineStats(pool_pages=self.num_pool_pages)
    step = partial(engine_step, cfg=model_cfg, implementation=implementation, sparsity=sparsity,
                   mesh=mesh, rules=rules)
    self._step = jax.jit(step, donate_argnums=(1, 2, 3))
    self._compiled: dict[int, Callable] = {}

  def pool_bytes(self) -> int:
    return PagedKVCache.pool_bytes(self.model_cfg, self.num_pool_pages, self.cfg.page_size)

  def _launch(self, plan: StepPlan) -> jax.Array:
    """Starts a step; returns its sampled tokens (a device array, not waited on)."""
    args = (self.params, self.k, self.v, self.last_token, plan.tokens, plan.from_device,
            plan.positions, plan.decode_table, plan.chunk_table, plan.sample_rows,
            plan.sample_index, plan.sampled, plan.key_data, plan.sampling["temperature"],
            plan.sampling["top_k"], plan.sampling["top_p"], plan.sampling["min_p"])
    shape = len(plan.tokens)
    if shape not in self._compiled:  # decode-only, plus one per lane length
      t0 = time.perf_counter()
      self._compiled[shape] = self._step.lower(*args).compile()
      self.stats.compile_s += time.perf_counter() - t0
      self.stats.compilations += 1
    self.k, self.v, self.last_token, tok = self._compiled[shape](*args)
    return tok

  @property
  def max_shapes(self) -> int:
    """Step shapes this engine can compile: decode-only and each lane length 16..chunk_size."""
    lengths = {min(self.cfg.chunk_size, max(16, 1 << (t - 1).bit_length()))
               for t in range(1, self.cfg.chunk_size + 1)}
    return 1 + len(lengths)

  def run(self, requests: Iterable[EngineRequest], on_result: Callable[[EngineResult], None],
          should_stop: Callable[[int, list[int]], bool] | None = None,
          on_step: Callable[[EngineStats], None] | None = None) -> EngineStats:
    """Generates every request, calling `on_result` as each finishes (in completion order)."""
    pool = PagePool(self.num_pool_pages, self.cfg.page_size)
    sched = Scheduler(self.cfg.num_slots, self.cfg.chunk_lanes, self.cfg.chunk_size,
                      self.cfg.page_size, self.max_pages, pool, self.model_cfg.eos_token_ids)
    for req in requests:
      sched.add(req)
    st = self.stats
    # One step in flight: step t+1 is planned and launched before step t's tokens are read, so
    # host work overlaps device work.
    inflight: tuple[StepPlan, jax.Array] | None = None
    t_last = time.perf_counter()
    while True:
      plan = sched.plan()
      compiles = st.compile_s
      launched = None if plan is None else (plan, self._launch(plan))
      if inflight is not None:
        prev, tok = inflight
        tokens = np.asarray(tok)  # waits for step t
        now = time.perf_counter()
        elapsed = now - t_last - (st.compile_s - compiles)
        t_last = now
        st.busy_s += elapsed
        if prev.num_prefill:
          st.mixed_busy_s += elapsed
        else:
          st.decode_busy_s += elapsed
          st.pure_decode_tokens += prev.num_decode
        st.steps += 1
        st.decode_tokens += prev.num_decode
        for result in sched.commit(prev, tokens, should_stop):
          on_result(result)
        if on_step is not None:
          on_step(st)
      else:
        t_last = time.perf_counter()
      st.occupancy_sum += sched.active / self.cfg.num_slots if launched else 0.0
      st.prefill_tokens = sched.prefill_tokens_computed
      st.prefill_tokens_saved = sched.prefill_tokens_saved
      st.peak_pages = max(st.peak_pages, pool.peak_in_use)
      inflight = launched
      if inflight is None:
        if sched.idle():
          break
        raise RuntimeError("engine: requests remain but nothing can run (scheduler stalled)")
    return st
