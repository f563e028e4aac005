"""One engine replica: the scheduler's plans executed by jitted, fixed-shape steps.

S slots, G lanes of Q prompt tokens, M pages per sequence, P pages in the pool, V vocab.
A plan is one mixed step (decodes and prompt chunks) or up to `decode_steps` decode-only steps
run in one dispatch (a loop on the device). The KV page pools are donated to every dispatch and
updated in place; it returns one sampled token per slot and step (meaningful for the slots that
sampled). Speculating, a slot's decode row is a draft tree and a dispatch returns what each
step emitted per slot (`engine.speculate`), unless the policy picked plain decoding for it: then
it runs the plain steps above.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer import model as M
from jaxinfer.compilation_cache import call_compiled
from jaxinfer.config import ModelConfig
from jaxinfer.engine import policy, speculate
from jaxinfer.engine.pages import PagePool
from jaxinfer.engine.scheduler import (EngineRequest, EngineResult, Scheduler, StepPlan,
                                        lane_length)
from jaxinfer.kv_cache import MixedPagedKVCache, PagedKVCache
from jaxinfer.kv_quant import check_kv_cache_dtype, kv_copy_pages
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams, all_greedy, jit_variants, sample
from jaxinfer.speculative.protocol import check_fits


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  num_slots: int = 16
  chunk_size: int = 32  # Q: prompt tokens per lane per step
  chunk_lanes: int = 4  # G: lanes per step (a prompt may fill several)
  page_size: int = 16
  kv_pages: int | None = None  # P; None: every slot's longest request, plus 50% for prefixes
  steps_ahead: int = 1  # steps launched beyond the one whose tokens the host waits for
  decode_steps: int = 8  # most decode-only steps run in one dispatch (none prefilling)
  kv_cache_dtype: str | None = None  # "int8": pools of int8 K/V with per-token-head scales
  waves: bool = False  # static batching: S requests at a time, the next S once all have ended

  def __post_init__(self):
    for name in ("num_slots", "chunk_size", "chunk_lanes", "page_size", "decode_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"EngineConfig: {name} must be >= 1, got {getattr(self, name)}")
    if self.kv_pages is not None and self.kv_pages < 1:
      raise ValueError(f"EngineConfig: kv_pages must be >= 1, got {self.kv_pages}")
    if self.steps_ahead < 0:
      raise ValueError(f"EngineConfig: steps_ahead must be >= 0, got {self.steps_ahead}")
    try:
      check_kv_cache_dtype(self.kv_cache_dtype, self.page_size)
    except ValueError as e:
      raise ValueError(f"EngineConfig: {e}") from None


@dataclasses.dataclass
class EngineStats:
  steps: int = 0  # device steps (a decode-only dispatch runs up to decode_steps)
  dispatches: int = 0
  busy_s: float = 0.0
  compile_s: float = 0.0
  compilations: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0
  lane_tokens: int = 0  # prefill tokens computed in lanes (the rest: prompts' last tokens)
  prefill_tokens_saved: int = 0
  occupancy_sum: float = 0.0
  peak_pages: int = 0
  pool_pages: int = 0
  mixed_busy_s: float = 0.0  # steps that prefilled (and decoded)
  decode_busy_s: float = 0.0  # steps that only decoded
  pure_decode_tokens: int = 0
  decode_tokens_discarded: int = 0  # decoded after their sequence's EOS or stop string
  row_steps: int = 0  # speculating: verifications of live rows (tokens per one: tau)
  # speculating: verifications by tokens emitted less one (accepted drafts, but a request's
  # last verification counts only what it kept)
  accepted_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.int64))
  # speculating: tokens the target computed for those verifications (a row's tree as deep as
  # its drafts reach, `speculate.prefixes`; one for a plain step)
  verified_nodes: int = 0

  @property
  def mean_occupancy(self) -> float:
    return self.occupancy_sum / self.steps if self.steps else 0.0


def whole_lanes(runtime: Runtime):
  """The dynamic sparsity pattern a run's prompts are prefilled with, each in a lane of its own
  (`MixedPagedKVCache.whole`); None: prompts are prefilled in chunks."""
  return runtime.sparsity if runtime.sparsity.dynamic else None


def engine_step(params, k, v, last_token, tokens, from_device, positions, decode_table,
                chunk_table, sample_index, sampled, key_data, temperature, top_k, top_p, min_p,
                next_tokens=None, draft_params=None, layer=(), *, cfg, runtime, feed=None,
                greedy_only=False):
  """One mixed step: S decode rows (each slot's next token) beside G lanes of prompt tokens;
  returns the pools, the last tokens, the sampled tokens (S,) and `layer`.

  feed (a speculating engine's draft layers in the pages, `speculate.feed`): `layer` (their
  state) after reading every token computed here, the target's hidden state there and the token
  after it (`next_tokens` for the lanes', the sampled token for a decode row's).
  greedy_only: every slot is known to be greedy (`sampling.sample`)."""
  s = decode_table.shape[0]
  # Decode rows (the first S) feed the token this slot sampled at the previous step, or a
  # prompt's last token (a slot's first step).
  device_tokens = jnp.pad(last_token, (0, tokens.shape[0] - s))
  tokens = jnp.where(from_device, device_tokens, tokens)
  cache = MixedPagedKVCache(k, v, decode_table, chunk_table, whole=whole_lanes(runtime))
  hidden, cache = M.forward(params, tokens[None], positions[None], cfg, cache, kv_source="cache",
                            runtime=runtime)
  logits = M.logits(params, hidden[0, :s], runtime)  # (S, V): each slot's next token
  keys = jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(
      key_data, sample_index)
  tok = sample(logits, SamplingParams(temperature, top_k, top_p, min_p), keys, greedy_only)
  if feed is not None:
    g = chunk_table.shape[0]
    if g:
      layer = feed(params, draft_params, layer, tokens[s:].reshape(g, -1),
                   hidden[0, s:].reshape(g, -1, hidden.shape[-1]),
                   next_tokens[s:].reshape(g, -1), positions[s:].reshape(g, -1), chunk_table)
    # (rows not sampled: out of range)
    layer = feed(params, draft_params, layer, tokens[:s, None], hidden[0, :s, None],
                 tok[:, None], positions[:s, None], decode_table)
  # the last tokens keep one layout (whole) from step to step, whatever the kernels' sharding
  return (cache.k, cache.v, runtime.constrain(jnp.where(sampled, tok, last_token), (None,)), tok,
          layer)


def engine_decode(params, k, v, last_token, tokens, from_device, positions, decode_table,
                  sample_index, sampled, key_data, temperature, top_k, top_p, min_p, num_steps,
                  draft_params=None, layer=(), *, max_steps, cfg, runtime, feed=None,
                  greedy_only=False):
  """`num_steps` (<= max_steps) decode-only steps in one dispatch: each slot that samples feeds
  its last token (the first step: `tokens` where not `from_device`, a prompt's last token) at
  its next position and samples its next output index; returns the pools, the last tokens,
  every step's tokens (max_steps, S) (rows past num_steps are zeros) and `layer`, fed each
  step's hidden states as `engine_step` feeds it (greedy_only too)."""
  s, no_chunks = decode_table.shape[0], jnp.zeros((0, decode_table.shape[1]), jnp.int32)
  sp = SamplingParams(temperature, top_k, top_p, min_p)
  wrap = jax.vmap(jax.random.wrap_key_data)

  def step(i, carry):
    k, v, last, out, layer = carry
    cache = MixedPagedKVCache(k, v, decode_table, no_chunks)
    pos = positions + jnp.where(sampled, i, 0)  # the rest stay out of range (nothing written)
    hidden, cache = M.forward(params, last[None], pos[None], cfg, cache, kv_source="cache",
                              runtime=runtime)
    keys = jax.vmap(jax.random.fold_in)(wrap(key_data), sample_index + i)
    tok = sample(M.logits(params, hidden[0], runtime), sp, keys, greedy_only)
    if feed is not None:
      layer = feed(params, draft_params, layer, last[:, None], hidden[0, :, None],
                   tok[:, None], pos[:, None], decode_table)
    return cache.k, cache.v, jnp.where(sampled, tok, last), out.at[i].set(tok), layer

  out = jnp.zeros((max_steps, s), jnp.int32)
  last = jnp.where(from_device, last_token, tokens)
  k, v, last, out, layer = jax.lax.fori_loop(0, num_steps, step, (k, v, last, out, layer))
  # whole on every device, as the host reads them (a kernel splitting rows over an axis that
  # spans processes would leave each process only its rows)
  return k, v, runtime.constrain(last, (None,)), runtime.constrain(out, (None, None)), layer


def copy_pages(k, v, src, dst):
  """The pools with pages `dst` := pages `src` (S,) (a `dst` past the pool: nothing): a prompt
  prefilled whole shares its partial last page so (`scheduler._Seq.copy`)."""
  copy = lambda pools: tuple(kv_copy_pages(pool, src, dst) for pool in pools)
  return copy(k), copy(v)


def pool_pages_for(cfg: EngineConfig, max_pages_per_request: int) -> int:
  return cfg.kv_pages or int(cfg.num_slots * max_pages_per_request * 1.5) + 1


class Engine:
  """Runs requests to completion with continuous batching on one replica (a mesh of the
  fsdp/model axes, or one device).

  With a `proposer` each slot's decode row is a draft tree it proposes, verified with the
  acceptance `rule` (`engine.speculate`). `speculation` "always" verifies its tree every step;
  "auto" picks its tree, a smaller one or plain decoding per dispatch, by measured speed
  (`engine.policy`). Plain decoding runs the plain engine's own steps, the host planning each
  dispatch's steps exactly (they also feed a draft layer in the engine's pages, which must read
  every token); between trees and plain decoding the host first reads every dispatch in flight
  (it must know each row's progress)."""

  def __init__(self, model_cfg: ModelConfig, params: M.Transformer, cfg: EngineConfig,
               max_len: int, runtime: Runtime = Runtime(), proposer=None, rule: str = "exact",
               speculation: str = "auto", draft_params=None):
    if proposer is not None and runtime.sparsity.dynamic:
      raise ValueError(f"Engine: speculation under {runtime.sparsity} is not built (its "
                       f"verification steps would prefill prompts in chunks)")
    if proposer is not None:
      proposer.validate(model_cfg, draft_params)
      check_fits(proposer, model_cfg, runtime.sparsity)
      proposer = proposer.attend_as(runtime)  # a draft model attends as the target
    self.model_cfg, self.params, self.cfg, self.runtime = model_cfg, params, cfg, runtime
    self.proposer, self.draft_params = proposer, draft_params
    ps = cfg.page_size
    self.max_len = max_len
    self.tree_size = None if proposer is None else proposer.tree_size
    self.max_pages = max(1, -(-(max_len + (self.tree_size or 0)) // ps))
    self.plain_pages = max(1, -(-max_len // ps))  # a plain step's table (no tree beyond)
    self.num_pool_pages = pool_pages_for(cfg, self.max_pages)
    self.k, self.v = PagedKVCache.init_pools(model_cfg, self.num_pool_pages, ps, runtime.mesh,
                                             runtime.rules, cfg.kv_cache_dtype)
    self.last_token = jnp.zeros((cfg.num_slots,), jnp.int32)
    # kept from run to run with the pools it describes: a later run reuses the prompt pages an
    # earlier one cached (until they are evicted)
    self.pool = PagePool(self.num_pool_pages, ps)
    self.stats = EngineStats(pool_pages=self.num_pool_pages)
    self._greedy = True  # this run's requests are all greedy (`_run`)
    self._step = jit_variants(partial(engine_step, cfg=model_cfg, runtime=runtime), (1, 2, 3))
    self._decode = jit_variants(partial(engine_decode, max_steps=cfg.decode_steps,
                                        cfg=model_cfg, runtime=runtime), (1, 2, 3))
    self._copy = jax.jit(copy_pages, donate_argnums=(0, 1))
    self._compiled: dict[tuple[int, int] | str, Callable] = {}
    if proposer is not None:
      self._init_speculation(rule, speculation)

  def _init_speculation(self, rule: str, speculation: str) -> None:
    proposer, model_cfg, runtime = self.proposer, self.model_cfg, self.runtime
    self.ladder = policy.ladder(proposer, speculation)
    self.policy = policy.TreePolicy(self.ladder, speculation)
    kw = lambda p: dict(cfg=model_cfg, proposer=p, rule=rule, runtime=runtime)
    trees = [p for p in self.ladder if not isinstance(p, policy.Plain)]  # levels 0, 1, ...
    # A draft layer in the pages: once trees may run, the plain steps feed it every token they
    # compute (`_feeding`); with the auto policy only from the moment it would try a tree, and
    # trees then wait until every row whose context was computed unfed (`_unfed`) has ended (a
    # draft model's: such a row is caught up from its tokens when it turns to trees)
    self._feeding = proposer.paged_layers and speculation == "always"
    self._unfed: set = set()
    if proposer.paged_layers:
      feed = partial(speculate.feed, proposer=proposer, runtime=runtime)
      self._fed_step = jit_variants(partial(engine_step, cfg=model_cfg, runtime=runtime,
                                            feed=feed), (1, 2, 3, 18))
      self._fed_decode = jit_variants(partial(engine_decode, max_steps=self.cfg.decode_steps,
                                              cfg=model_cfg, runtime=runtime, feed=feed),
                                      (1, 2, 3, 17))
      self._flush = jax.jit(partial(speculate.flush, proposer=proposer, runtime=runtime),
                            donate_argnums=0)
    self._tree_step = [jit_variants(partial(speculate.step, **kw(p)), (2, 3, 4)) for p in trees]
    self._tree_steps = [jit_variants(partial(speculate.steps, max_steps=self.cfg.decode_steps,
                                             **kw(p)), (2, 3, 4)) for p in trees]
    self._trees = None  # the last plan launched verified trees (None: none yet)
    self._tree_admit = jax.jit(partial(speculate.admit, cfg=model_cfg, proposer=proposer,
                                       runtime=runtime), donate_argnums=0)
    self.eos = np.asarray(model_cfg.eos_token_ids or (-1,), np.int32)
    # over the engine's life: seconds of dispatches read and tokens they emitted (the policy's
    # work in sight: `_work_s`); this run's: tokens still in its requests' budgets, and its
    # finished requests' tokens and budgets
    self._life_s, self._life_tokens, self._budget, self._finished = 0.0, 0, 0, [0, 0]
    self._last_read = None  # (level, mixed?) of the dispatch read last (None: it compiled)
    history = self.max_pages * self.cfg.page_size
    init = partial(speculate.init_drafting, model_cfg, proposer, self.cfg.num_slots, history,
                   pages=(self.num_pool_pages, self.cfg.page_size), runtime=runtime)
    # whole on the replica's devices, as every step returns it (kept from run to run: a shared
    # proposer state keeps learning)
    where = None if runtime.mesh is None else NamedSharding(runtime.mesh, PartitionSpec())
    self.drafting = self._call("init", jax.jit(init, out_shardings=where),
                               proposer.init_shared(model_cfg), self.draft_params)

  def _call(self, shape, fn, *args):
    """fn compiled once per `shape` (counted in the stats), then run."""
    return call_compiled(self._compiled, shape, fn, args, self.stats)

  def reset_prefix_cache(self) -> None:
    """Forgets every cached prompt page (the next run computes its prompts afresh)."""
    self.pool = PagePool(self.num_pool_pages, self.cfg.page_size)

  def pool_bytes(self) -> int:
    return PagedKVCache.pool_bytes(self.model_cfg, self.num_pool_pages, self.cfg.page_size,
                                   self.cfg.kv_cache_dtype)

  def _launch(self, plan: StepPlan) -> jax.Array:
    """Starts a plan's steps; returns their sampled tokens (a device array, not waited on)."""
    if plan.copies:
      src = np.zeros(self.cfg.num_slots, np.int32)
      dst = np.full(self.cfg.num_slots, self.num_pool_pages, np.int32)  # (past it: nothing)
      src[:len(plan.copies)], dst[:len(plan.copies)] = zip(*plan.copies)
      self.k, self.v = self._call("copy", self._copy, self.k, self.v, src, dst)
    if plan.tree:
      return self._launch_trees(plan)
    m, greedy = self.plain_pages, self._greedy  # (attention reads every page of a table)
    layer = self.proposer is not None and self._feeding
    if plan.num_prefill:  # one mixed step; a shape per lane count and length
      fn = (self._fed_step if layer else self._step)[greedy]
      shape = (len(plan.chunk_table), len(plan.tokens), greedy) + ("fed",) * layer
      args = (self.params, self.k, self.v, self.last_token, plan.tokens, plan.from_device,
              plan.positions, plan.decode_table[:, :m], plan.chunk_table[:, :m],
              plan.sample_index, plan.sampled, plan.key_data)
    else:  # decode-only steps
      fn = (self._fed_decode if layer else self._decode)[greedy]
      shape = ("decode", greedy) + ("fed",) * layer
      args = (self.params, self.k, self.v, self.last_token, plan.tokens, plan.from_device,
              plan.positions, plan.decode_table[:, :m], plan.sample_index, plan.sampled,
              plan.key_data)
    args += (plan.sampling["temperature"], plan.sampling["top_k"], plan.sampling["top_p"],
             plan.sampling["min_p"])
    if not plan.num_prefill:
      args += (np.int32(plan.num_steps),)
    elif layer:
      args += (plan.next_tokens,)
    if layer:  # the draft layer's state, fed what the steps compute
      args += (self.draft_params, self.drafting.proposer)
    self.k, self.v, self.last_token, tok, fed = self._call(shape, fn, *args)
    if layer:
      self.drafting = self.drafting.replace(proposer=fed)
    return tok

  def _launch_trees(self, plan: StepPlan) -> tuple[jax.Array, jax.Array]:
    """Speculating: admits the plan's new rows, then starts its steps; returns what they
    emitted ((steps, S, T) tokens, (steps, S) counts; device arrays, not waited on)."""
    s, level = self.cfg.num_slots, plan.level
    if plan.admits:
      self._admit_rows(plan.admits)
    sampling, greedy = SamplingParams(**plan.sampling), self._greedy
    if plan.num_prefill:
      args = (self.params, self.draft_params, self.k, self.v, self.drafting, plan.tokens[s:],
              plan.positions[s:], plan.next_tokens[s:], plan.decode_table, plan.chunk_table,
              plan.sampled, sampling, plan.key_data, self.eos)
      shape = ("tree", level, greedy, len(plan.chunk_table), len(plan.tokens))
      self.k, self.v, self.drafting, emitted, counts = self._call(
          shape, self._tree_step[level][greedy], *args)
      return emitted, counts
    args = (self.params, self.draft_params, self.k, self.v, self.drafting, plan.decode_table,
            plan.sampled, sampling, plan.key_data, self.eos, np.int32(plan.num_steps),
            np.bool_(plan.waiting))
    self.k, self.v, self.drafting, emitted, counts = self._call(
        ("trees", level, greedy), self._tree_steps[level][greedy], *args)
    return emitted, counts

  def _measure(self, plan: StepPlan, tokens, elapsed: float, compiled: bool) -> None:
    """Speculating: what a plan's steps emitted into its plan and the stats (trees: counts
    (steps, S) in `tokens`; plain decoding: one token per row and step), and for the policy
    (the acceptance of its drafts; its time if the dispatch was timed alone)."""
    st, depths = self.stats, self.proposer.max_depth + 1
    if len(st.accepted_hist) != depths:  # (a new call's stats)
      st.accepted_hist = np.zeros(depths, np.int64)
    hist = None
    if plan.tree:
      counts = tokens[1]
      plan.num_decode = int(counts.sum())
      ran = 1 if plan.num_prefill else int(counts.any(axis=1).sum())
      st.occupancy_sum += (ran - plan.num_steps) * plan.active / self.cfg.num_slots
      plan.num_steps = ran
      row_steps = int((counts > 0).sum())
      hist = np.bincount(counts[counts > 0] - 1, minlength=depths)
      st.accepted_hist += hist
    else:
      ran, row_steps = plan.num_steps, plan.num_decode
      st.accepted_hist[0] += row_steps
      st.verified_nodes += row_steps
    st.row_steps += row_steps
    # timed alone (the wall time since the last read): after a dispatch of the same kind and
    # tree, neither compiling. A decode-only dispatch of trees that ran no step (a row had
    # ended in the one before) is timed too: the host's round trip it costs is the trees'.
    kind = (plan.level, bool(plan.num_prefill))
    timed = (not compiled and self._last_read == kind
             and (plan.num_decode or not plan.num_prefill))
    self.policy.record(plan.level, plan.num_decode, row_steps, ran, elapsed if timed else None,
                       mixed=bool(plan.num_prefill), accepted=hist if row_steps else None)
    self._last_read = None if compiled else kind

  def _admit_rows(self, seqs) -> None:
    """Sequences taking their slots, or turning from plain decoding to trees: their tokens so
    far and budgets onto the device (a few padded shapes: rows and width in powers of two)."""
    s, width = self.cfg.num_slots, self.drafting.history.shape[1]
    so_far = [seq.req.prompt_ids + seq.generated for seq in seqs]  # (generated: plainly)
    k = min(s, 1 << (len(seqs) - 1).bit_length())
    w = min(width, max(16, 1 << (max(map(len, so_far)) - 1).bit_length()))
    slots, prompts = np.full(k, s, np.int32), np.zeros((k, w), np.int32)
    lengths, generated, max_new = (np.ones(k, np.int32), np.zeros(k, np.int32),
                                   np.ones(k, np.int32))
    for j, (seq, ids) in enumerate(zip(seqs, so_far)):
      slots[j], lengths[j], max_new[j] = seq.slot, len(ids), seq.req.max_new_tokens
      generated[j] = len(seq.generated)
      prompts[j, :len(ids)] = ids
    pages = None  # rows begun unfed, caught up from their tokens (`Proposer.layers_read_hidden`)
    if self._unfed.intersection(seqs):
      pages = np.full((k, self.max_pages), -1, np.int32)
      for j, seq in enumerate(seqs):
        if seq in self._unfed:
          pages[j, :len(seq.pages)] = seq.pages
      self._unfed.difference_update(seqs)
    self.drafting = self._call(("admit", k, w) + ("caught up",) * (pages is not None),
                               self._tree_admit, self.drafting, self.params, self.draft_params,
                               slots, prompts, lengths, generated, max_new, pages)

  def _flush_rows(self, seqs) -> None:
    """Rows turning from trees to plain steps: what their last verification left pending for
    the draft layer, written to its pages (`speculate.flush`)."""
    if not seqs:
      return
    pages = np.full((self.cfg.num_slots, self.max_pages), -1, np.int32)
    for seq in seqs:
      pages[seq.slot, :len(seq.pages)] = seq.pages
    self.drafting = self._call("flush", self._flush, self.drafting, self.params,
                               self.draft_params, pages)

  def _plan(self, sched: Scheduler, drain: Callable[[], None] | None) -> StepPlan | None:
    """The next step's plan; speculating, its rows verify the tree the policy picks, or decode
    plainly. Between the two, every dispatch in flight is first read (`drain` reads one)."""
    work_s = None if self.proposer is None else self._work_s()
    if self.proposer is not None and self.proposer.paged_layers:
      self._feed_once_trees_pay(sched, work_s)
    lanes, g, q = sched.schedule()
    if self.proposer is None or not (lanes or sched.running):
      return sched.layout(lanes, g, q)
    level = self.policy.pick(mixed=bool(lanes), live=sched.running, work_s=work_s,
                             hold_trees=bool(self._unfed) and self.proposer.layers_read_hidden)
    tree = not isinstance(self.ladder[level], policy.Plain)
    drained = False
    if tree != self._trees and self._trees is not None:
      while drain is not None and sched.unread:
        drain()
        drained = True
      if not tree and self.proposer.paged_layers:
        self._flush_rows([seq for seq in sched.order if seq.slot is not None and seq.tree])
    plan = sched.layout(lanes, g, q, tree)
    if plan is None and drained:  # every row it had ended meanwhile (and it had no lanes)
      return self._plan(sched, None)
    if plan is not None:  # (a pick whose plan is dropped was never dispatched)
      plan.level, self._trees = level, tree
      self.policy.dispatches[level] += 1
    return plan

  def _feed_once_trees_pay(self, sched: Scheduler, work_s: float) -> None:
    """A draft layer in the pages: the plain steps start to feed it once the policy would try a
    tree. Prompt pages computed before are then no longer shared (the layer lacks their K/V),
    and the rows begun before (`_unfed`) hold trees back until they end, or (a draft model's,
    `Proposer.layers_read_hidden`) are caught up from their tokens as they turn to trees."""
    if not self._feeding and self.policy.wants_trees(work_s):
      self._feeding = True
      self.pool.forget_prefixes()
      self._unfed = set(sched.order)
    elif self._unfed:
      self._unfed &= set(sched.order)

  def _work_s(self) -> float:
    """Seconds of work in sight for the policy: what is left of this run's budgets, scaled by
    the share of their budgets that this run's finished requests used, at the engine's measured
    seconds per token; or what it has run so far, whichever is larger."""
    per_token = self._life_s / max(self._life_tokens, 1)
    used, budgets = self._finished
    share = used / budgets if budgets else 1.0
    return max(self._budget * share * per_token, self._life_s)

  @property
  def max_shapes(self) -> int:
    """Step shapes this engine can compile: decode-only, G lanes of each length 16..chunk_size,
    and (G > 1) one lane of G * chunk_size, each twice (runs of greedy requests only, and the
    rest: `jit_variants`); speculating, those for each level of the ladder, the device state's
    set-up, admissions of 1, 2, 4, ... rows of prompts 16, 32, ... wide and, for a draft layer in
    the pages, the flush of rows turning to plain steps. Whole prompts (no speculation): a lane
    of each width 16, 32, ... up to the longest prompt, and the copy of a partial page."""
    if whole_lanes(self.runtime):
      widest = lane_length(self.max_pages * self.cfg.page_size, None)
      return 2 * (1 + (widest // 16).bit_length()) + 1
    lengths = {lane_length(t, self.cfg.chunk_size) for t in range(1, self.cfg.chunk_size + 1)}
    steps = 2 * (1 + len(lengths) + (self.cfg.chunk_lanes > 1))
    if self.proposer is None:
      return steps
    doublings = lambda n, start: (-(-n // start) - 1).bit_length() + 1  # start, 2 start, .., n
    # a draft layer in the pages: plain steps that feed it and (auto) ones that do not, a flush;
    # a draft model's, admissions that catch rows up too
    fed = self.proposer.paged_layers and self.policy.policy == "auto"
    admits = (doublings(self.cfg.num_slots, 1) * doublings(self.drafting.history.shape[1], 16)
              * (1 + (fed and not self.proposer.layers_read_hidden)))
    return steps * (len(self.ladder) + fed) + 1 + admits + self.proposer.paged_layers

  def run(self, requests: Iterable[EngineRequest], on_result: Callable[[EngineResult], None],
          should_stop: Callable[[int, list[int]], bool] | None = None,
          on_step: Callable[[EngineStats], None] | None = None) -> EngineStats:
    """Generates every request, calling `on_result` as each finishes (in completion order).
    Prompt pages cached by earlier runs are reused; a run that fails forgets them all."""
    pool = self.pool
    pool.peak_in_use = pool.in_use
    sched = self._scheduler(requests)  # (a request refused here has touched nothing)
    try:
      return self._run(pool, sched, on_result, should_stop, on_step)
    except BaseException:
      self.reset_prefix_cache()  # the failed run's references are lost
      raise

  def _scheduler(self, requests: Iterable[EngineRequest]) -> Scheduler:
    """A scheduler holding every request, each checked (ValueError naming it)."""
    sched = Scheduler(self.cfg.num_slots, self.cfg.chunk_lanes, self.cfg.chunk_size,
                      self.cfg.page_size, self.max_pages, self.pool, self.model_cfg.eos_token_ids,
                      self.cfg.decode_steps, self.tree_size,
                      0 if self.proposer is None else self.proposer.feature_lookahead,
                      whole_prompts=whole_lanes(self.runtime) is not None, waves=self.cfg.waves)
    uids = set()
    for req in requests:
      if req.uid in uids:
        raise ValueError(f"request {req.uid}: another request of this run has that uid")
      uids.add(req.uid)
      if len(req.prompt_ids) + req.max_new_tokens > self.max_len:
        raise ValueError(f"request {req.uid}: {len(req.prompt_ids)} prompt + "
                         f"{req.max_new_tokens} new tokens exceed the engine's max_len "
                         f"({self.max_len})")
      sched.add(req)
    return sched

  def _run(self, pool, sched, on_result, should_stop, on_step) -> EngineStats:
    requests = list(sched.pending)
    self._greedy = all_greedy(requests)
    # speculating: uid -> its budget (the policy's work in sight)
    budgets = {} if self.proposer is None else {r.uid: r.max_new_tokens for r in requests}
    self._budget = sum(budgets.values())
    self._finished = [0, 0]  # this run's finished requests: tokens they took, their budgets
    st = self.stats
    before = dataclasses.replace(st)  # (the counters below add this run's to earlier runs')
    # (the device counts in int32 for the engine's life: the run's difference, modulo 2^32)
    tree_nodes = None if self.proposer is None else np.uint32(self.drafting.verified)
    # Steps run ahead of the host: step t+1+ahead is planned and launched before step t's
    # tokens are read, so host work overlaps device work and the device has a step queued.
    ahead = self.cfg.steps_ahead
    inflight: collections.deque[tuple[StepPlan, jax.Array, bool]] = collections.deque()
    t_last, c_last = time.perf_counter(), st.compile_s  # at the last read

    def read() -> None:
      """Waits for the oldest dispatch in flight and takes its tokens; its time is the wall time
      since the last read, less any compilation in it."""
      nonlocal t_last, c_last
      prev, tok, compiled = inflight.popleft()
      tokens = jax.tree_util.tree_map(np.asarray, tok)  # waits for that step
      now = time.perf_counter()
      elapsed = now - t_last - (st.compile_s - c_last)
      compiled = compiled or st.compile_s != c_last
      t_last, c_last = now, st.compile_s
      if self.proposer is not None:
        self._measure(prev, tokens, elapsed, compiled)
        self._life_s += elapsed
        self._life_tokens += prev.num_decode
      st.busy_s += elapsed
      if prev.num_prefill:
        st.mixed_busy_s += elapsed
      else:
        st.decode_busy_s += elapsed
        st.pure_decode_tokens += prev.num_decode
      st.steps += prev.num_steps
      st.dispatches += 1
      st.decode_tokens += prev.num_decode
      taken = sched.tokens_taken
      results = sched.commit(prev, tokens, should_stop)
      if self.proposer is not None:  # work in sight: the tokens taken, and what ends left over
        ended = [(len(r.tokens), budgets.pop(r.uid)) for r in results]
        self._budget -= sched.tokens_taken - taken + sum(b - n for n, b in ended)
        self._finished[0] += sum(n for n, _ in ended)
        self._finished[1] += sum(b for _, b in ended)
      for result in results:
        on_result(result)
      if on_step is not None:
        on_step(st)

    while True:
      compiles = st.compile_s
      plan = self._plan(sched, read if inflight else None)
      if plan is not None:
        inflight.append((plan, self._launch(plan), st.compile_s != compiles))
        if self.proposer is not None and st.compile_s != compiles:
          self.policy.compiled(plan.level, st.compile_s - compiles)
        st.occupancy_sum += plan.num_steps * plan.active / self.cfg.num_slots
      if plan is None or len(inflight) > ahead:
        if not inflight:
          if sched.idle():
            break
          raise RuntimeError("engine: requests remain but nothing can run (scheduler stalled)")
        read()
      st.prefill_tokens = before.prefill_tokens + sched.prefill_tokens_computed
      st.lane_tokens = before.lane_tokens + sched.lane_tokens
      st.decode_tokens_discarded = before.decode_tokens_discarded + sched.tokens_discarded
      st.prefill_tokens_saved = before.prefill_tokens_saved + sched.prefill_tokens_saved
      st.peak_pages = max(st.peak_pages, pool.peak_in_use)
    if tree_nodes is not None:
      st.verified_nodes += int(np.uint32(self.drafting.verified) - tree_nodes)
    return st
