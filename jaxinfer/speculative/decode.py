"""Speculative decoding in static batches (the static scheduler's): draft a tree per row,
verify every row's tree in one target forward (the tree-verification kernel), accept with a
lossless rule, commit the accepted path's K/V, repeat — all on the device, `steps_per_sync`
verification steps per host round trip.

B rows, T tree nodes, S cache positions per row (pages of the row's own), V vocabulary. Rows
have their own prompt lengths and accept different numbers of tokens per step (ragged); each
row's committed length, pending root token and outputs live in device arrays. A batch's rows
are prefilled whole and together, and run until every one is done. (Continuous batching with
speculation is the paged engine's: `jaxinfer.engine`.)

This module holds `SpeculativeGenerator`: the engine's policy (`engine.policy`, speculate with
which tree or decode plainly) per batch, compilation and layout of the steps, and plain
decoding. The device steps are `steps`, one batch's host loop `batch`, the measurements
`stats`; the proposers implement `protocol.Proposer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as M
from jaxinfer.compilation_cache import call_compiled
from jaxinfer.config import ModelConfig
from jaxinfer.engine.policy import Plain, TreePolicy, ladder
from jaxinfer.generation import Generator, RowRequest, RowResult, next_pow2
from jaxinfer.kv_cache import PagedKVCache
from jaxinfer.runtime import Runtime
from jaxinfer.speculative import acceptance
from jaxinfer.speculative.batch import Batch
from jaxinfer.speculative.protocol import Weights, check_fits
from jaxinfer.speculative.stats import SpecStats
from jaxinfer.speculative.steps import SpecState, _draft_only, state_shardings


class SpeculativeGenerator:
  """Batched speculative generation with one proposer; the interface of `Generator`."""

  def __init__(self, cfg: ModelConfig, params: M.Transformer, proposer, *,
               draft_params: M.Transformer | None = None, rule: str = acceptance.EXACT,
               runtime: Runtime = Runtime(), steps_per_sync: int = 16, page_size: int = 16,
               policy: str = "auto", explore_every: int = 8, measure_split: bool = True,
               max_shrinks: int = 3):
    """policy "auto": each batch speculates with the proposer's tree or one of up to
    `max_shrinks` successively halved trees (`Proposer.shrink`), or decodes plainly (the static
    `Generator`), whichever measured fastest (the engine's `TreePolicy`, a batch as a dispatch):
    speculation that stops paying (large batches, compute-bound devices) shrinks its trees or
    turns itself off; "always": speculate every batch with the proposer's own tree.
    measure_split: once, after compilation, time the drafting part of a step alone
    (stats.draft_share).
    runtime: the target's mesh (one replica's), sharding rules, attention implementation and
    sparsity (dense, or sinks_window: StreamingLLM's sinks plus a sliding window, in prefill,
    verification and plain decoding alike, and in a draft model's and EAGLE's and Hydra++'s
    draft layers over their own caches)."""
    sparsity = runtime.sparsity
    check_fits(proposer, cfg, sparsity)
    proposer.validate(cfg, draft_params)
    proposer = proposer.with_sparsity(sparsity)  # its drafts attend as the target does
    self.measure_split = measure_split
    self._plain = Generator(cfg, params, runtime)
    self.cfg, self.params, self.proposer = cfg, params, proposer
    self.draft_params = draft_params
    self.rule, self.runtime = rule, runtime
    self.steps_per_sync, self.page_size = steps_per_sync, page_size
    self.stats = SpecStats(accepted_hist=np.zeros(proposer.max_depth + 1, np.int64))
    # the proposer and its smaller trees, largest first, then (policy "auto") plain decoding;
    # a batch is timed alone and compiles in its first run only
    self.ladder = ladder(proposer, policy, max_shrinks)
    self.policy = TreePolicy(self.ladder, policy, explore_every, hold=1, min_measured=1)
    self._compiled: dict = {}
    # a proposer state every row shares (Token Recycling's adjacency), carried between batches
    self._shared = proposer.init_shared(cfg)

  @property
  def timings(self):
    """The plain Generator's timing record, for the job's metrics."""
    from jaxinfer.generation import Timings
    st = self.stats
    return Timings(prefill_s=st.prefill_s, decode_s=st.decode_s, compile_s=st.compile_s,
                   prefill_tokens=st.prefill_tokens, decode_tokens=st.decode_tokens,
                   compilations=st.compilations, decode_steps=st.steps,
                   row_steps=st.verify_steps)

  def _run(self, name, fn, *args):
    """fn (a name per proposer and function) compiled once per argument shapes, then run."""
    key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
    return call_compiled(self._compiled, key, jax.jit(self._placed(fn)), args, self.stats)

  def _placed(self, fn):
    """fn, a state it returns laid out as every state is on this generator's mesh (so each
    compiled step takes the state the last one returned)."""
    mesh, rules = self.runtime.mesh, self.runtime.rules
    if mesh is None or mesh.size == 1:
      return fn

    def placed(*args):
      out = fn(*args)
      if isinstance(out, SpecState):
        out = jax.lax.with_sharding_constraint(
            out, state_shardings(out, mesh, rules, self.proposer))
      return out
    return placed

  def _place(self, state: SpecState) -> SpecState:
    """A state built on the host, laid out as `_placed` lays states out."""
    where = state_shardings(state, self.runtime.mesh, self.runtime.rules, self.proposer)
    return state if where is None else jax.device_put(state, where)

  def _measure_split(self, state, sampling, step_s: float, level: int, greedy: bool) -> None:
    """The draft / verify time split: `steps_per_sync` proposals alone, timed on this batch's
    last state, against this batch's measured time per full step."""
    st = self.stats
    fn = partial(_draft_only, num_steps=self.steps_per_sync, proposer=self.ladder[level],
                 greedy_only=greedy)
    args = (self.params, self.draft_params, state, sampling)
    name = ("draft_only", level, greedy)
    self._run(name, fn, *args).block_until_ready()  # compile (not timed)
    times = []
    for _ in range(3):  # the fastest of three: a busy host only ever slows a run down
      t0 = time.perf_counter()
      self._run(name, fn, *args).block_until_ready()
      times.append((time.perf_counter() - t0) / self.steps_per_sync)
    # (the step time is one measurement; on a busy host drafting alone can outlast it)
    draft_s = min(min(times), step_s)
    st.draft_ms_per_step, st.step_ms = 1e3 * draft_s, 1e3 * step_s
    st.draft_share = min(1.0, draft_s / max(step_s, 1e-12))
    st.split_tree = self.ladder[level].tree_size

  def _generate_plain(self, rows, should_stop, on_result):
    """Plain decoding of the batch (the static `Generator`), counted in this generator's
    stats; returns the results, the decode steps run and the prefill's seconds."""
    tm = self._plain.timings
    before = dataclasses.replace(tm)
    results = self._plain.generate(rows, should_stop)
    if on_result is not None:
      for i, res in enumerate(results):
        on_result(i, res)
    st = self.stats
    for f in ("prefill_tokens", "decode_tokens", "compile_s", "compilations", "prefill_s",
              "decode_s"):
      setattr(st, f, getattr(st, f) + getattr(tm, f) - getattr(before, f))
    return results, tm.decode_steps - before.decode_steps, tm.prefill_s - before.prefill_s

  def generate(self, rows: Sequence[RowRequest],
               should_stop: Callable[[int, list[int]], bool] | None = None,
               on_result: Callable[[int, RowResult], None] | None = None) -> list[RowResult]:
    """Every row's result (in order), all rows in one static batch; `on_result(i, result)` is
    also called as row i finishes."""
    if not rows:
      return []
    with self._on_device():
      return self._generate(rows, should_stop, on_result)

  def _on_device(self):
    """New arrays on this generator's device (a replica's one-device mesh), in this thread."""
    mesh = self.runtime.mesh
    if mesh is not None and mesh.devices.size == 1:
      return jax.default_device(mesh.devices.flat[0])
    return contextlib.nullcontext()

  def _generate(self, rows, should_stop, on_result) -> list[RowResult]:
    """One batch at the ladder level the policy picks. The policy is told its decoding time in
    wall time (host work included, prefill and compilation not; none if it compiled) and its
    acceptance; the draft / verify split is timed once, after the first measured speculative
    batch, outside that time."""
    level = self.policy.pick()
    st = self.stats
    t0, compile_s, tokens, compilations = (time.perf_counter(), st.compile_s, st.decode_tokens,
                                           st.compilations)
    batch = None if isinstance(self.ladder[level], Plain) else Batch(
        self, rows, should_stop, on_result, level)
    if batch is None:
      results, steps, prefill_s = self._generate_plain(rows, should_stop, on_result)
    else:
      results, steps, prefill_s = batch.run(), batch.steps, batch.prefill_s
    decode_s = time.perf_counter() - t0 - (st.compile_s - compile_s) - prefill_s
    measured = st.compilations == compilations  # a batch that compiled is not a measurement
    new = st.decode_tokens - tokens
    # (plain decoding: a live row's step is a token)
    self.policy.record(level, new, new if batch is None else int(batch.hist.sum()), steps,
                       decode_s if measured else None,
                       accepted=None if batch is None else batch.hist)
    if batch is not None and measured and steps and st.draft_share is None and self.measure_split:
      self._measure_split(batch.state, batch.sampling, batch.decode_s / steps, level,
                          batch.greedy)
    return results

  def _geometry(self, prompt_len: int, max_new: int, tree_size: int) -> tuple[int, int]:
    """(output buffer length, positions per row) for rows up to these lengths."""
    o = next_pow2(max_new, 16)
    width = next_pow2(prompt_len, 16)
    return o, -(-(width + o + tree_size) // self.page_size) * self.page_size  # the last tree

  def memory_bytes(self, max_prompt_len: int, max_new_tokens: int, rows: int,
                   per_device: bool = False) -> int:
    """Device memory a batch of `rows` requests up to these lengths holds at its peak: the
    speculative state of the largest tree (every row's pages, the proposer's caches, per-row
    buffers). per_device: what one device of the mesh holds of it (rows that do not split over
    fsdp are whole on each device)."""
    from jaxinfer.sharding import device_bytes
    o, max_len = self._geometry(max_prompt_len, max_new_tokens, self.proposer.tree_size)
    shapes = jax.eval_shape(lambda: self._empty_state(rows, max_len, o, jax.random.key(0),
                                                      self.proposer))
    rules = self.runtime.rules
    mesh = self.runtime.mesh if per_device else None
    return device_bytes(shapes, state_shardings(shapes, mesh, rules, self.proposer))

  def _new_state(self, b: int, max_len: int, out_len: int, key: jax.Array, proposer,
                 level: int) -> SpecState:
    """`_empty_state`, made by a compiled step where it lives (on a mesh each device makes only
    its own part), so that nothing compiles outside the counted steps."""
    make = lambda key, shared: self._empty_state(b, max_len, out_len, key, proposer, shared)
    return self._run(("empty", level, b, max_len, out_len), make, key, self._shared)

  def _empty_state(self, b: int, max_len: int, out_len: int, key: jax.Array,
                   proposer, shared=None) -> SpecState:
    """b empty rows (done) over zeroed pages: a batch is admitted into it (shared: a shared
    proposer state, default this generator's)."""
    cfg, ps = self.cfg, self.page_size
    shared = self._shared if shared is None else shared
    k, v = PagedKVCache.init_pools(cfg, b * (max_len // ps), ps)
    pstate = proposer.init_state(Weights(self.draft_params, self.params), cfg, b, max_len,
                                 shared)
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    return SpecState(
        k=k, v=v, history=zeros(b, max_len), length=zeros(b), out=zeros(b, out_len),
        num_generated=zeros(b), max_new=zeros(b), done=jnp.ones((b,), bool),
        keys=jnp.stack([key] * b), step=zeros(), proposer=pstate,
        accepted_hist=zeros(proposer.max_depth + 1), emitted=zeros())
