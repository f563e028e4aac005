"""Speculative batch generation: draft a tree per row, verify every row's tree in one target
forward (the tree-verification kernel), accept with a lossless rule, commit the accepted path's
K/V, repeat — all on the device, `steps_per_sync` verification steps per host round trip.

B rows, T tree nodes, S cache positions per row (pages of the row's own), V vocabulary.
Rows have their own prompt lengths and accept different numbers of tokens per step (ragged);
each row's committed length, pending root token and outputs live in device arrays.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.generation import RowRequest, RowResult, next_pow2
from jaxinfer.kv_cache import PagedKVCache, TreeKVCache, commit_path
from jaxinfer.sampling import SamplingParams, sample, target_probs
from jaxinfer.speculative import acceptance
from jaxinfer.speculative.proposers import Context, DraftModel, NGram, Recycling
from pallas_kernels.tree_attention import ancestor_matrix, pack_ancestors

_DRAFT_SALT, _VERIFY_SALT = 1 << 20, 1 << 21


@struct.dataclass
class SpecState:
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  history: jax.Array  # (B, S) tokens by position; the root at `length`
  length: jax.Array  # (B,) committed tokens in the cache (= the root's position)
  out: jax.Array  # (B, O) generated tokens
  num_generated: jax.Array  # (B,)
  max_new: jax.Array  # (B,)
  done: jax.Array  # (B,)
  keys: jax.Array  # (B,) request keys
  step: jax.Array  # () verification steps so far
  proposer: Any
  accepted_hist: jax.Array  # (T,) verifications (of live rows) by accepted drafts
  emitted: jax.Array  # () tokens emitted by verifications


@dataclasses.dataclass
class SpecStats:
  verify_steps: int = 0  # row-verifications (one per live row per step)
  emitted: int = 0
  accepted_hist: np.ndarray | None = None
  prefill_s: float = 0.0
  decode_s: float = 0.0
  compile_s: float = 0.0
  compilations: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0

  @property
  def mean_accepted_tokens(self) -> float:
    """tau: tokens per target forward per row, counting the bonus token."""
    return self.emitted / self.verify_steps if self.verify_steps else 0.0

  def per_depth_acceptance(self) -> list[float]:
    """P(draft at depth d accepted | depth d - 1 accepted), d = 1..T-1."""
    h = self.accepted_hist
    reached = h[::-1].cumsum()[::-1]  # verifications with >= d accepted
    return [float(reached[d] / reached[d - 1]) if reached[d - 1] else 0.0
            for d in range(1, len(h))]


def _step(params, draft_params, state: SpecState, sampling: SamplingParams, page_table,
          parents_tree, eos_ids, *, cfg, proposer, rule, implementation, mesh, rules):
  b = state.length.shape[0]
  t = proposer.tree_size
  live = ~state.done
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, state.step))(state.keys)
  ctx = Context(state.history, state.length, sampling,
                jax.vmap(lambda k: jax.random.fold_in(k, _DRAFT_SALT))(step_keys))
  if isinstance(proposer, DraftModel):
    pstate, draft = proposer.propose(draft_params, state.proposer, ctx)
  else:
    pstate, draft = proposer.propose(state.proposer, ctx)
  parents = jnp.broadcast_to(draft.parents, (b, t))
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1  # (B,T)
  cache = TreeKVCache(state.k, state.v, page_table, state.length, pack_ancestors(parents))
  hidden, cache = M.forward(params, draft.tokens, state.length[:, None] + depth, cfg, cache,
                            kv_source="cache", implementation=implementation, mesh=mesh,
                            rules=rules)
  logits = M.logits(params, hidden)  # (B,T,V)
  p = jax.vmap(lambda l: target_probs(l, sampling), in_axes=1, out_axes=1)(logits)
  verdict = acceptance.verify(
      jax.vmap(lambda k: jax.random.fold_in(k, _VERIFY_SALT))(step_keys), p, draft.tokens,
      parents, draft.q, greedy=sampling.temperature <= 0, rule=rule)
  n_acc = verdict.num_accepted
  k_new = commit_path(cache.k, page_table, state.length, verdict.path, n_acc)
  v_new = commit_path(cache.v, page_table, state.length, verdict.path, n_acc)

  # Emitted: the accepted drafts, then the next token; cut at EOS and at the budget.
  path_tokens = jnp.take_along_axis(draft.tokens, verdict.path, axis=1)  # (B,T); [:,0] = root
  d = jnp.arange(t)[None, :]
  emitted = jnp.where(d < n_acc[:, None], jnp.roll(path_tokens, -1, axis=1),
                      verdict.next_token[:, None])  # (B,T): first n_acc + 1 are real
  count = n_acc + 1
  is_eos = jnp.isin(emitted, eos_ids) & (d < count[:, None])
  first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1), t)
  room = state.max_new - state.num_generated
  n_emit = jnp.where(live, jnp.minimum(jnp.minimum(count, first_eos + 1), room), 0)
  rows = jnp.arange(b)[:, None]
  out = state.out.at[rows, jnp.where(d < n_emit[:, None], state.num_generated[:, None] + d,
                                     state.out.shape[1])].set(emitted, mode="drop")
  # history: accepted drafts and the next token follow the root.
  hist = state.history.at[rows, jnp.where((d < count[:, None]) & live[:, None],
                                          state.length[:, None] + 1 + d,
                                          state.history.shape[1])].set(emitted, mode="drop")
  new_length = jnp.where(live, state.length + count, state.length)
  done = state.done | (live & ((first_eos < count) | (state.num_generated + n_emit
                                                       >= state.max_new)))
  if isinstance(proposer, Recycling):
    pstate = proposer.update(pstate, draft.tokens, logits, ctx, new_length)
  hist_acc = state.accepted_hist + jnp.zeros_like(state.accepted_hist).at[n_acc].add(
      live.astype(jnp.int32))
  return SpecState(k_new, v_new, hist, new_length, out, state.num_generated + n_emit,
                   state.max_new, done, state.keys, state.step + 1, pstate, hist_acc,
                   state.emitted + jnp.sum(jnp.where(live, count, 0)))


def _chunk(params, draft_params, state, sampling, page_table, parents_tree, eos_ids, *,
           num_steps, **kw):
  def cond(c):
    i, s = c
    return (i < num_steps) & ~jnp.all(s.done)

  def body(c):
    i, s = c
    return i + 1, _step(params, draft_params, s, sampling, page_table, parents_tree, eos_ids, **kw)

  return jax.lax.while_loop(cond, body, (0, state))[1]


def _prefill(params, draft_params, k, v, history, prompt_len, page_table, sampling, keys, *, cfg,
             proposer, max_len, implementation, mesh, rules):
  """Target (and draft) prefill; the first token, sampled as plain decoding samples it."""
  width = history.shape[1]
  pos = jnp.arange(width)[None, :]
  positions = jnp.where(pos < prompt_len[:, None], pos, max_len)  # padding: dropped
  cache = PagedKVCache(k, v, page_table)
  hidden, cache = M.forward(params, history, positions, cfg, cache, kv_source="cache",
                            implementation=implementation, mesh=mesh, rules=rules)
  last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
  first = sample(M.logits(params, last), sampling,
                 jax.vmap(lambda kk: jax.random.fold_in(kk, 0))(keys))
  pstate = ()
  if isinstance(proposer, DraftModel):
    pstate = proposer.prefill(draft_params, history, prompt_len, max_len)
  return cache.k, cache.v, first.astype(jnp.int32), pstate


class SpeculativeGenerator:
  """Batched speculative generation with one proposer; the interface of `Generator`."""

  def __init__(self, cfg: ModelConfig, params: M.Transformer, proposer, *,
               draft_params: M.Transformer | None = None, rule: str = acceptance.EXACT,
               implementation: str = "xla", steps_per_sync: int = 16, page_size: int = 16,
               mesh=None, rules=None):
    from jaxinfer.sharding import DEFAULT_RULES
    if cfg.sliding_window is not None:
      raise ValueError("speculative decoding: sliding-window models are not supported yet")
    if isinstance(proposer, DraftModel) and draft_params is None:
      raise ValueError("speculative decoding: a draft model proposer needs draft_params")
    if isinstance(proposer, DraftModel) and proposer.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative decoding: the draft's vocabulary ({proposer.cfg.vocab_size})"
                       f" differs from the target's ({cfg.vocab_size})")
    self.cfg, self.params, self.proposer = cfg, params, proposer
    self.draft_params = draft_params
    self.rule, self.implementation = rule, implementation
    self.steps_per_sync, self.page_size = steps_per_sync, page_size
    self.mesh, self.rules = mesh, rules or DEFAULT_RULES
    self.stats = SpecStats(accepted_hist=np.zeros(proposer.tree_size, np.int64))
    self._compiled: dict = {}
    self._adjacency = (proposer.init_adjacency(cfg.vocab_size)
                       if isinstance(proposer, Recycling) else None)

  def _run(self, name, fn, *args):
    key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args[2:]))
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = jax.jit(fn).lower(*args).compile()
      self.stats.compile_s += time.perf_counter() - t0
      self.stats.compilations += 1
    return self._compiled[key](*args)

  def generate(self, rows: Sequence[RowRequest],
               should_stop: Callable[[int, list[int]], bool] | None = None) -> list[RowResult]:
    if not rows:
      return []
    cfg, t = self.cfg, self.proposer.tree_size
    n = len(rows)
    b = n
    width = next_pow2(max(len(r.prompt_ids) for r in rows), 16)
    o = next_pow2(max(r.max_new_tokens for r in rows), 16)
    ps = self.page_size
    max_len = -(-(width + o + t) // ps) * ps  # room for the last tree
    m = max_len // ps
    history = np.zeros((b, max_len), np.int32)
    prompt_len = np.zeros((b,), np.int32)
    max_new = np.zeros((b,), np.int32)
    sp = {"temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
          "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32)}
    for i, r in enumerate(rows):
      history[i, :len(r.prompt_ids)] = r.prompt_ids
      prompt_len[i] = len(r.prompt_ids)
      max_new[i] = r.max_new_tokens
      for f in sp:
        sp[f][i] = getattr(r, f)
    keys = jnp.stack([r.key for r in rows])
    sampling = SamplingParams(**{f: jnp.asarray(x) for f, x in sp.items()})
    page_table = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
    k, v = PagedKVCache.init_pools(cfg, b * m, ps)
    kw = dict(cfg=cfg, proposer=self.proposer, implementation=self.implementation,
              mesh=self.mesh, rules=self.rules)

    t0 = time.perf_counter()
    c0 = self.stats.compile_s
    k, v, first, pstate = self._run(
        "prefill", partial(_prefill, max_len=max_len, **kw), self.params, self.draft_params, k, v,
        jnp.asarray(history[:, :width]), jnp.asarray(prompt_len), page_table, sampling, keys)
    if isinstance(self.proposer, Recycling):
      pstate = self._adjacency
    hist = jnp.asarray(history).at[jnp.arange(b), jnp.asarray(prompt_len)].set(first)
    out = jnp.zeros((b, o), jnp.int32).at[:, 0].set(first)
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    done = (jnp.asarray(max_new) <= 1) | jnp.isin(first, eos)
    state = SpecState(k, v, hist, jnp.asarray(prompt_len), out, jnp.ones((b,), jnp.int32),
                      jnp.asarray(max_new), done, keys, jnp.zeros((), jnp.int32), pstate,
                      jnp.zeros((t,), jnp.int32), jnp.zeros((), jnp.int32))
    host_done = np.asarray(state.done)
    t1 = time.perf_counter()
    self.stats.prefill_s += t1 - t0 - (self.stats.compile_s - c0)
    self.stats.prefill_tokens += int(prompt_len.sum())

    chunk = partial(_chunk, num_steps=self.steps_per_sync, rule=self.rule, **kw)
    while not host_done.all():
      c0 = self.stats.compile_s
      t2 = time.perf_counter()
      state = self._run("decode", chunk, self.params, self.draft_params, state, sampling,
                        page_table, jnp.zeros((t,), jnp.int32), eos)
      host_done = np.asarray(state.done)
      self.stats.decode_s += time.perf_counter() - t2 - (self.stats.compile_s - c0)
      if should_stop is not None:
        toks, counts = np.asarray(state.out), np.asarray(state.num_generated)
        newly = [i for i in range(n) if not host_done[i]
                 and should_stop(i, [int(x) for x in toks[i, :counts[i]]])]
        if newly:
          host_done = host_done.copy()
          host_done[newly] = True
          state = state.replace(done=jnp.asarray(host_done))
    if isinstance(self.proposer, Recycling):
      self._adjacency = state.proposer  # what it learned carries over to the next batch
    toks, counts = np.asarray(state.out), np.asarray(state.num_generated)
    eos_set = set(int(e) for e in cfg.eos_token_ids)
    self.stats.accepted_hist = self.stats.accepted_hist + np.asarray(state.accepted_hist)
    self.stats.verify_steps = int(self.stats.accepted_hist.sum())
    self.stats.emitted += int(state.emitted)
    self.stats.decode_tokens += int(sum(max(0, c - 1) for c in counts))
    results = []
    for i in range(n):
      ids = [int(x) for x in toks[i, :counts[i]]]
      results.append(RowResult(ids, bool(ids) and ids[-1] in eos_set))
    return results
