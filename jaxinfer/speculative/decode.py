"""Speculative batch generation: draft a tree per row, verify every row's tree in one target
forward (the tree-verification kernel), accept with a lossless rule, commit the accepted path's
K/V, repeat — all on the device, `steps_per_sync` verification steps per host round trip.

B rows (slots), T tree nodes, S cache positions per row (pages of the row's own), V vocabulary.
Rows have their own prompt lengths and accept different numbers of tokens per step (ragged);
each row's committed length, pending root token and outputs live in device arrays. Rows are
admitted into free slots of a running state (prefilled into the slot's pages, the proposer's
state for the row reset), so with more requests than slots a finished row's slot is refilled at
the next host round trip (continuous batching).
"""

from __future__ import annotations

import contextlib
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
from jaxinfer.engine.pages import page_keys
from jaxinfer.generation import Generator, RowRequest, RowResult, next_pow2
from jaxinfer.kv_cache import KVCache, PagedKVCache, TreeKVCache, commit_path
from jaxinfer.sampling import SamplingParams, argmax, distribution, sample
from jaxinfer.sparsity import DENSE, Sparsity
from jaxinfer.speculative import acceptance
from jaxinfer.speculative.proposers import (Context, DraftModel, Eagle, EagleState, Hydra,
                                            Medusa, Recycling, shrink)
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


def state_shardings(state: SpecState, mesh, rules, proposer) -> SpecState | None:
  """Where a state's arrays live on a replica's mesh (None off one): rows over the batch axes
  (`data`/`fsdp`) with their pages (a slot owns pages [b*M, (b+1)*M)) and their draft caches,
  KV heads over `model`; Token Recycling's adjacency (shared by every row) and the counters
  whole. Rows that do not divide over the batch axes stay whole."""
  from jaxinfer.kv_cache import CACHE_AXES
  from jaxinfer.sharding import rows_split
  if mesh is None or mesh.size == 1:
    return None
  b = state.length.shape[0]
  rows = "batch" if rows_split(b, mesh, rules) else None
  at = lambda x, axes: rules.sharding(mesh, axes, x.shape)
  by_row = lambda x: at(x, (rows,) + (None,) * (x.ndim - 1))
  whole = lambda x: at(x, (None,) * x.ndim)
  pool = lambda x: at(x, ("kv_heads", rows, None, "head_dim"))
  cache_axes = tuple(rows if a == "batch" else a for a in CACHE_AXES)

  def proposer_leaf(x):
    if isinstance(proposer, Recycling):
      return whole(x)
    if isinstance(x, KVCache):
      return jax.tree_util.tree_map(lambda y: at(y, cache_axes), x)
    return by_row(x)

  return SpecState(
      k=tuple(map(pool, state.k)), v=tuple(map(pool, state.v)),
      **{f: by_row(getattr(state, f)) for f in ("history", "length", "out", "num_generated",
                                                "max_new", "done", "keys")},
      step=whole(state.step), accepted_hist=whole(state.accepted_hist),
      emitted=whole(state.emitted),
      proposer=jax.tree_util.tree_map(proposer_leaf, state.proposer,
                                      is_leaf=lambda x: isinstance(x, KVCache)))


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
  prefill_tokens: int = 0  # computed
  prefill_tokens_saved: int = 0  # prompt tokens whose K/V were copied from another row's
  prefill_chunks: int = 0  # chunks of long admissions run before the admission itself
  steps: int = 0  # batched verification steps
  host_syncs: int = 0  # host round trips while decoding
  row_slots: int = 0  # steps x rows
  spec_batches: int = 0  # batches that speculated
  plain_batches: int = 0  # ... that decoded plainly (policy "auto")
  # measured generation speeds (moving averages): output tokens after each row's first per
  # second of prefill and decoding
  plain_tps: float | None = None
  full_tree: int = 0  # the proposer's tree size (tokens verified per row and step)
  tree_tps: dict = dataclasses.field(default_factory=dict)  # tree size -> measured tokens/s
  tree_batches: dict = dataclasses.field(default_factory=dict)  # tree size -> batches
  draft_ms_per_step: float | None = None  # drafting alone, timed once (after compilation)
  step_ms: float | None = None  # a whole step (draft + verify + accept + commit), same batch
  draft_share: float | None = None
  split_tree: int | None = None  # the tree size the split was measured with

  @classmethod
  def merge(cls, stats: Sequence["SpecStats"]) -> "SpecStats":
    """Replicas' stats as one: counts and times summed, measured speeds averaged."""
    if len(stats) == 1:
      return stats[0]
    total = lambda f: sum(getattr(s, f) for s in stats)
    mean = lambda xs: float(np.mean(xs)) if xs else None
    sizes = {n for s in stats for n in s.tree_batches}
    split = next((s for s in stats if s.draft_share is not None), stats[0])
    return cls(
        **{f: total(f) for f in ("verify_steps", "emitted", "prefill_s", "decode_s",
                                  "compile_s", "compilations", "decode_tokens",
                                  "prefill_tokens", "prefill_tokens_saved",
                                  "prefill_chunks", "steps",
                                  "host_syncs", "row_slots", "spec_batches", "plain_batches")},
        accepted_hist=sum(s.accepted_hist for s in stats),
        plain_tps=mean([s.plain_tps for s in stats if s.plain_tps is not None]),
        full_tree=stats[0].full_tree,
        tree_tps={n: mean([s.tree_tps[n] for s in stats if n in s.tree_tps])
                  for n in sizes if any(n in s.tree_tps for s in stats)},
        tree_batches={n: sum(s.tree_batches.get(n, 0) for s in stats) for n in sizes},
        draft_ms_per_step=split.draft_ms_per_step, step_ms=split.step_ms,
        draft_share=split.draft_share, split_tree=split.split_tree)

  def since(self, before: "SpecStats") -> "SpecStats":
    """What happened after `before` (a copy of these stats taken earlier): counts and times as
    differences, measured speeds and the draft / verify split as they stand now."""
    counts = ("verify_steps", "emitted", "prefill_s", "decode_s", "compile_s", "compilations",
              "decode_tokens", "prefill_tokens", "prefill_tokens_saved", "prefill_chunks",
              "steps", "host_syncs", "row_slots", "spec_batches", "plain_batches")
    return dataclasses.replace(
        self, **{f: getattr(self, f) - getattr(before, f) for f in counts},
        accepted_hist=self.accepted_hist - before.accepted_hist,
        tree_batches={n: b - before.tree_batches.get(n, 0) for n, b in self.tree_batches.items()
                      if b > before.tree_batches.get(n, 0)})

  @property
  def spec_tps(self) -> float | None:
    """Measured decode tokens/s of the best tree size."""
    return max(self.tree_tps.values()) if self.tree_tps else None

  @property
  def best_tree(self) -> int | None:
    return max(self.tree_tps, key=self.tree_tps.get) if self.tree_tps else None

  def decision(self) -> str:
    ratio = (f"; measured {self.spec_tps / self.plain_tps:.2f}x plain decoding"
             if self.spec_tps and self.plain_tps else "")
    sizes = sorted(self.tree_batches, reverse=True)
    tried = f"; trees of {', '.join(map(str, sizes))} tokens tried" if len(sizes) > 1 else ""
    best = self.best_tree
    trees = (f" with {best}-token trees (shrunk from {self.full_tree})"
             if best is not None and best != self.full_tree else "")
    if not self.plain_batches:
      return "speculating throughout" + trees + tried + ratio
    share = self.spec_batches / (self.spec_batches + self.plain_batches)
    if self.spec_tps and self.plain_tps and self.spec_tps < self.plain_tps:
      return (f"speculation turned itself off ({share:.0%} of batches speculated{tried}"
              f"{ratio})")
    return f"speculating{trees} ({share:.0%} of batches{tried}{ratio})"

  @property
  def mean_accepted_tokens(self) -> float:
    """tau: tokens per target forward per row, counting the bonus token."""
    return self.emitted / self.verify_steps if self.verify_steps else 0.0

  def metrics(self) -> dict:
    return {"mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "accepted_length_histogram": [int(x) for x in self.accepted_hist],
            "per_depth_acceptance": [round(x, 4) for x in self.per_depth_acceptance()],
            "verify_steps": self.verify_steps, "host_syncs": self.host_syncs,
            "prefill_chunks": self.prefill_chunks,
            "occupancy": round(self.verify_steps / self.row_slots, 4) if self.row_slots else 0.0,
            "speculation": self.decision(), "speculative_batches": self.spec_batches,
            "plain_batches": self.plain_batches,
            "tree_sizes": {str(n): {"batches": self.tree_batches[n],
                                    "tokens_per_second": (None if n not in self.tree_tps
                                                          else round(self.tree_tps[n], 1))}
                           for n in sorted(self.tree_batches, reverse=True)},
            "draft_verify_split": None if self.draft_share is None else {
                "draft_ms_per_step": round(self.draft_ms_per_step, 4),
                "verify_ms_per_step": round(self.step_ms - self.draft_ms_per_step, 4),
                "step_ms": round(self.step_ms, 4), "draft_share": round(self.draft_share, 4),
                "tree_size": self.split_tree}}

  def per_depth_acceptance(self) -> list[float]:
    """P(draft at depth d accepted | depth d - 1 accepted), d = 1..T-1."""
    h = self.accepted_hist
    reached = h[::-1].cumsum()[::-1]  # verifications with >= d accepted
    return [float(reached[d] / reached[d - 1]) if reached[d - 1] else 0.0
            for d in range(1, len(h))]


def _propose(params, draft_params, state: SpecState, sampling: SamplingParams, proposer):
  # Per row, keyed by its own progress: a request samples the same tokens whatever else shares
  # its batch and whenever it was admitted.
  step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.num_generated)
  ctx = Context(state.history, state.length, sampling,
                jax.vmap(lambda k: jax.random.fold_in(k, _DRAFT_SALT))(step_keys))
  if isinstance(proposer, Eagle):
    pstate, draft = proposer.propose((draft_params, params), state.proposer, ctx)
  elif isinstance(proposer, Hydra):
    pstate, draft = proposer.propose((draft_params, params), state.proposer, ctx)
  elif isinstance(proposer, (DraftModel, Medusa)):
    pstate, draft = proposer.propose(draft_params, state.proposer, ctx)
  else:
    pstate, draft = proposer.propose(state.proposer, ctx)
  return step_keys, pstate, draft


def _draft_only(params, draft_params, state: SpecState, sampling, *, num_steps, proposer):
  """`num_steps` proposals from the same state (the drafting part of a step, timed alone)."""
  def body(i, carry):
    pstate, acc = carry
    # Each proposal reads the last one's proposer state and a value that depends on its tokens
    # (acc is never negative, but the compiler cannot know): nothing is hoisted out of the loop.
    s = state.replace(num_generated=state.num_generated + i, proposer=pstate,
                      length=jnp.where(acc < 0, state.length + 1, state.length))
    _, pstate, draft = _propose(params, draft_params, s, sampling, proposer)
    return pstate, acc + jnp.sum(draft.tokens)

  return jax.lax.fori_loop(0, num_steps, body, (state.proposer, jnp.zeros((), jnp.int32)))[1]


def _step(params, draft_params, state: SpecState, sampling: SamplingParams, page_table, eos_ids,
          *, cfg, proposer, rule, implementation, mesh, rules, sparsity=DENSE):
  b = state.length.shape[0]
  t = proposer.tree_size
  live = ~state.done
  step_keys, pstate, draft = _propose(params, draft_params, state, sampling, proposer)
  parents = jnp.broadcast_to(draft.parents, (b, t))
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1  # (B,T)
  cache = TreeKVCache(state.k, state.v, page_table, state.length, pack_ancestors(parents),
                      contiguous=True)
  hidden, cache = M.forward(params, draft.tokens, state.length[:, None] + depth, cfg, cache,
                            kv_source="cache", implementation=implementation,
                            sparsity=sparsity, mesh=mesh, rules=rules)
  logits = M.logits(params, hidden)  # (B,T,V)
  greedy = sampling.temperature <= 0
  verify_keys = jax.vmap(lambda k: jax.random.fold_in(k, _VERIFY_SALT))(step_keys)

  def sampled(_):  # the full rule on distributions (greedy rows among them follow the argmax)
    p = distribution(logits, sampling)  # (B,T,V)
    return acceptance.verify(verify_keys, p, draft.tokens, parents, draft.q, greedy=greedy,
                             rule=rule)

  def all_greedy(_):
    if rule == acceptance.TYPICAL:
      return sampled(None)
    return acceptance.verify_greedy(draft.tokens, parents, argmax(logits))

  verdict = jax.lax.cond(jnp.all(greedy), all_greedy, sampled, None)
  n_acc = verdict.num_accepted
  if getattr(proposer, "is_chain", proposer.max_depth == t - 1):  # already in place
    k_new, v_new = cache.k, cache.v
  else:
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
    pstate = proposer.update(pstate, draft.tokens, logits)
  elif isinstance(proposer, Hydra) and proposer.prefix is not None:
    pstate = proposer.update_prefix(pstate, hidden, draft.tokens, verdict.path, n_acc,
                                    verdict.next_token, state.length, live)
  elif isinstance(proposer, (Medusa, Hydra)):
    pstate = jnp.where(live[:, None], proposer.update(pstate, hidden, verdict.path, n_acc),
                       pstate)
  elif isinstance(proposer, Eagle):
    pstate = proposer.update(pstate, hidden, draft.tokens, verdict.path, n_acc,
                             verdict.next_token, state.length, live)
  hist_acc = state.accepted_hist + jnp.zeros_like(state.accepted_hist).at[n_acc].add(
      live.astype(jnp.int32))
  return SpecState(k_new, v_new, hist, new_length, out, state.num_generated + n_emit,
                   state.max_new, done, state.keys, state.step + 1, pstate, hist_acc,
                   state.emitted + jnp.sum(jnp.where(live, count, 0)))


def _chunk(params, draft_params, state, sampling, page_table, eos_ids, min_done, num_steps,
           **kw):
  """Up to `num_steps` (traced) steps; ends early once `min_done` rows are done (a slot to
  refill)."""
  def cond(c):
    i, s = c
    return (i < num_steps) & (jnp.sum(s.done) < min_done)

  def body(c):
    i, s = c
    return i + 1, _step(params, draft_params, s, sampling, page_table, eos_ids, **kw)

  return jax.lax.while_loop(cond, body, (0, state))[1]


def _proposer_prefill(params, draft_params, hidden, last, history, prompt_len, first, pstate,
                      start=None, copy_src=None, *, proposer, max_len):
  """The proposer's state for freshly prefilled rows (`hidden`: the target's over the prompts
  from position `start` on, `last`: at each prompt's last token). pstate: the running state's
  (Recycling's adjacency; with `copy_src`, the pages of the draft's own cache (a draft model's,
  EAGLE's or Hydra++'s layer's) that hold each new row's prefix, copied as the target's are)."""
  cache = None
  if copy_src is not None and isinstance(pstate, (EagleState, KVCache)):
    cache = jax.tree_util.tree_map(lambda x: _gather_pages(x, copy_src),
                                   pstate.cache if isinstance(pstate, EagleState) else pstate)
  if isinstance(proposer, DraftModel):  # the prompt tokens the target computed, from start
    idx = (0 if start is None else start[:, None]) + jnp.arange(hidden.shape[1])[None, :]
    tokens = jnp.take_along_axis(history, jnp.minimum(idx, history.shape[1] - 1), axis=1)
    return proposer.prefill(draft_params, tokens, prompt_len, max_len, start, cache)
  if isinstance(proposer, Recycling):
    return pstate
  if isinstance(proposer, Hydra) and proposer.prefix is not None:
    return proposer.prefill((draft_params, params), hidden, prompt_len, max_len, start, cache)
  if isinstance(proposer, (Medusa, Hydra)):
    return last  # the hidden state that predicted the first token
  if isinstance(proposer, Eagle):
    return proposer.prefill((draft_params, params), hidden, history, prompt_len, first, max_len,
                            start, cache)
  return ()


def _gather_pages(cache: jax.Array, pages: jax.Array) -> jax.Array:
  """Rows of a contiguous cache (K, B, S, H) made of the pages `pages` (k, M) of its (K, B*M,
  S/M, H) view -> (K, k, S, H)."""
  kh, b, s, h = cache.shape
  k, m = pages.shape
  return cache.reshape(kh, b * m, s // m, h)[:, pages.reshape(-1)].reshape(kh, k, s, h)


def _put_rows(old, new, slots):
  """old's rows `slots` := new's rows, leaf by leaf (rows are axis 1 of a KVCache's buffers,
  axis 0 elsewhere); slots past the end are dropped."""
  def put(o, n, axis=0):
    n = n if n.dtype == o.dtype else n.astype(o.dtype)
    return o.at[(slice(None),) * axis + (slots,)].set(n, mode="drop")

  def leaf(o, n):
    if isinstance(o, KVCache):
      return jax.tree_util.tree_map(lambda a, b: put(a, b, 1), o, n)
    return put(o, n)

  return jax.tree_util.tree_map(leaf, old, new, is_leaf=lambda x: isinstance(x, KVCache))


def _copy_pages(pool: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """pool[:, dst] := pool[:, src] (every source read before any write); dst past the pool's end
  is dropped."""
  return pool.at[:, dst.reshape(-1)].set(pool[:, src.reshape(-1)], mode="drop")


def _slot_pages(state: SpecState, slots, start, end, width: int, copy_src, copy_dst, copy: bool,
                max_len: int, page_size: int):
  """(positions (k, width): start + j for each row's tokens before `end`, the rest and padding
  rows' (slots past the end) out of range, so never written; the paged cache over the slots'
  own pages, after copying pages copy_src -> copy_dst when `copy`)."""
  b, m = state.length.shape[0], max_len // page_size
  real = slots < b
  page_table = jnp.where(real[:, None], slots[:, None] * m + jnp.arange(m)[None, :], 0)
  pos = start[:, None] + jnp.arange(width)[None, :]
  positions = jnp.where((pos < end[:, None]) & real[:, None], pos, max_len)
  k_pools, v_pools = state.k, state.v
  if copy:
    k_pools = tuple(_copy_pages(x, copy_src, copy_dst) for x in k_pools)
    v_pools = tuple(_copy_pages(x, copy_src, copy_dst) for x in v_pools)
  return positions, PagedKVCache(k_pools, v_pools, page_table.astype(jnp.int32))


def _admit(params, draft_params, state: SpecState, tokens, start, history, prompt_len, max_new,
           sampling, keys, eos_ids, slots, copy_src, copy_dst, *, cfg, proposer, max_len,
           page_size, from_cache, implementation, mesh, rules, sparsity=DENSE) -> SpecState:
  """Prefills k new rows into slots `slots` (k,) of a running state (a slot past the end: a
  padding row, nothing written): the target's K/V straight into the slots' pages, the first
  token sampled as plain decoding samples it, the proposer's state and the row's counters
  reset. history (k, W) holds the prompts; tokens (k, w) the part of each to compute, from
  position start (k,) on.

  from_cache: some rows' first `start` tokens are a prefix another row has computed (prefix
  reuse): its pages are first copied into theirs (copy_src -> copy_dst, (k, M) pool pages; a
  destination past the pool's end copies nothing) and the rest of the prompt attends to them
  through the cache. Otherwise start is 0 and the prompt attends to itself."""
  k = tokens.shape[0]
  # Padding sits at out-of-range positions, after every real token, and is never written; the
  # prompt's K/V land in the slot's pages.
  positions, cache = _slot_pages(state, slots, start, prompt_len, tokens.shape[1], copy_src,
                                 copy_dst, from_cache, max_len, page_size)
  hidden, cache = M.forward(params, tokens, positions, cfg, cache,
                            kv_source="cache" if from_cache else "chunk",
                            implementation=implementation, sparsity=sparsity, mesh=mesh,
                            rules=rules)
  last = jnp.take_along_axis(hidden, (prompt_len - start - 1)[:, None, None], axis=1)[:, 0]
  first = sample(M.logits(params, last), sampling,
                 jax.vmap(lambda kk: jax.random.fold_in(kk, 0))(keys)).astype(jnp.int32)
  pstate = _proposer_prefill(params, draft_params, hidden, last, history, prompt_len, first,
                             state.proposer, start, copy_src if from_cache else None,
                             proposer=proposer, max_len=max_len)
  if not isinstance(proposer, Recycling):  # (its adjacency is shared by every row)
    pstate = _put_rows(state.proposer, pstate, slots)
  rows = jnp.arange(k)
  hist = jnp.pad(history, ((0, 0), (0, max_len - history.shape[1]))).at[rows, prompt_len].set(
      first)
  out = jnp.zeros((k, state.out.shape[1]), jnp.int32).at[:, 0].set(first)
  done = (max_new <= 1) | jnp.isin(first, eos_ids)
  put = lambda old, new: _put_rows(old, new, slots)
  return state.replace(
      k=cache.k, v=cache.v, history=put(state.history, hist), length=put(state.length,
                                                                           prompt_len),
      out=put(state.out, out), num_generated=put(state.num_generated, jnp.ones((k,), jnp.int32)),
      max_new=put(state.max_new, max_new), done=put(state.done, done),
      keys=put(state.keys, keys), proposer=pstate)


def _extend(params, draft_params, state: SpecState, tokens, start, end, history, slots,
            copy_src, copy_dst, *, copy, cfg, proposer, max_len, page_size, implementation, mesh,
            rules, sparsity=DENSE) -> SpecState:
  """One chunk of a long admission: the target's K/V for prompt positions [start, end) of each
  of k rows (tokens (k, w), w >= end - start) written into its slot's pages (`slots` (k,); past
  the end: a padding row), attending to what those pages already hold; a draft model extends
  its own cache over the same positions, and a draft layer that reads the target's hidden
  states over the prompt (EAGLE, Hydra++) its cache with their pairs (the token after each is
  known: it is in the prompt). The rows stay done, so no verification reads them; their length
  is set to `end`, so the tree tokens the verification steps between chunks write for them land
  past what is computed, where the next chunk (or the row's admission) overwrites them.

  copy: the first chunk of rows reusing a prefix: copy_src -> copy_dst first, as `_admit`
  copies. copy_src also names the pages the draft's cache rows are read from (the slot's own,
  after the first chunk)."""
  positions, cache = _slot_pages(state, slots, start, end, tokens.shape[1], copy_src, copy_dst,
                                 copy, max_len, page_size)
  hidden, cache = M.forward(params, tokens, positions, cfg, cache, kv_source="cache",
                            implementation=implementation, sparsity=sparsity, mesh=mesh,
                            rules=rules)
  pstate = state.proposer
  if _reads_prompt_features(proposer) or isinstance(proposer, DraftModel):
    # positions < end, as for a prompt ending at end + 1 (a draft layer's pairs: the token after
    # each is in the prompt); nothing is left pending (count 0: the verification steps between
    # chunks feed nothing for these rows)
    rows = _proposer_prefill(params, draft_params, hidden, hidden[:, -1], history, end + 1,
                             jnp.zeros_like(end), pstate, start, copy_src, proposer=proposer,
                             max_len=max_len)
    if isinstance(rows, EagleState):
      rows = rows.replace(start=end, count=jnp.zeros_like(end))
    pstate = _put_rows(pstate, rows, slots)
  return state.replace(k=cache.k, v=cache.v, proposer=pstate,
                       length=state.length.at[slots].set(end, mode="drop"))


def _reads_prompt_features(proposer) -> bool:
  """Whether the proposer's state is built from the target's hidden states over the prompt
  (EAGLE's and Hydra++'s draft layers): a row reusing a prefix then computes the prefix's last
  token again, whose hidden state the draft layer reads with the token after it."""
  return isinstance(proposer, Eagle) or (isinstance(proposer, Hydra)
                                         and proposer.prefix is not None)


class SlotPrefixes:
  """Host index of the full prompt pages resident in the slots' pages: a page's chained key
  (`pages.page_keys`: its tokens and all before them) -> the pool pages holding its K/V. A
  prompt page is never written after its row's prefill (decoding writes past the prompt), so it
  stays valid, even once its row is done, until its slot is refilled."""

  def __init__(self, pages_per_slot: int):
    self.m = pages_per_slot
    self._where: dict[bytes, dict[int, None]] = {}
    self._slot_keys: dict[int, list[bytes]] = {}

  def find(self, keys: Sequence[bytes]) -> list[int]:
    """Pool pages holding the longest run of leading `keys`."""
    found = []
    for key in keys:
      pages = self._where.get(key)
      if not pages:
        break
      found.append(next(iter(pages)))
    return found

  def refill(self, slot: int, keys: Sequence[bytes]) -> None:
    """Slot `slot` now holds a prompt whose full pages have `keys` (its old entries dropped)."""
    for j, key in enumerate(self._slot_keys.pop(slot, ())):
      self._where[key].pop(slot * self.m + j, None)
      if not self._where[key]:
        del self._where[key]
    self._slot_keys[slot] = list(keys)
    for j, key in enumerate(keys):
      self._where.setdefault(key, {})[slot * self.m + j] = None


def _average(old: float | None, new: float) -> float:
  return new if old is None else 0.5 * (old + new)


class SpeculativeGenerator:
  """Batched speculative generation with one proposer; the interface of `Generator`."""

  def __init__(self, cfg: ModelConfig, params: M.Transformer, proposer, *,
               draft_params: M.Transformer | None = None, rule: str = acceptance.EXACT,
               implementation: str = "xla", steps_per_sync: int = 16, page_size: int = 16,
               policy: str = "auto", explore_every: int = 8, mesh=None, rules=None,
               measure_split: bool = True, num_slots: int | None = None,
               max_shrinks: int = 3, prefix_reuse: bool = True, engine_config=None,
               sparsity: Sparsity = DENSE, prefill_chunk: int = 512):
    """policy "auto": each batch speculates or decodes plainly (the continuous-batching engine
    with num_slots, else the static `Generator`), whichever measured faster, and speculates
    with the proposer's tree or one of up to `max_shrinks` successively halved trees
    (`proposers.shrink`), whichever measured fastest: speculation that stops paying (large
    batches, compute-bound devices) shrinks its trees or turns itself off; "always": speculate
    every batch with the proposer's own tree.
    measure_split: once, after compilation, time the drafting part of a step alone
    (stats.draft_share). num_slots: continuous batching, each batch's rows through this many
    slots (None: all rows at once, for plain decoding too).
    prefix_reuse: a row whose prompt starts with full pages another row (in a slot, running or
    done) has computed copies their K/V (and the draft layer's, for EAGLE and Hydra++) instead
    of computing them again.
    engine_config: the continuous-batching engine's for plain decoding with `num_slots`
    (default: num_slots slots, this page size).
    sparsity: the target's attention pattern (dense, or sinks_window: StreamingLLM's sinks plus a
    sliding window, in prefill, verification and plain decoding alike, and in a draft model's
    and EAGLE's and Hydra++'s draft layers over their own caches).
    prefill_chunk: a row admitted with more prompt tokens than this to compute prefills them
    this many at a time (the target's and a draft layer's caches), one verification step of
    the running rows between chunks, and is admitted (its first token sampled) with the last
    chunk: a long prompt neither stalls the other rows for its whole prefill nor needs
    activations for all of it at once."""
    from jaxinfer.sharding import DEFAULT_RULES
    if sparsity.dynamic:
      raise ValueError(f"speculative decoding: {sparsity} sparsity needs whole-prompt prefill "
                       f"(use sinks_window or dense)")
    for window, what in ((cfg.sliding_window, "the model's sliding window"),
                         (sparsity.window, f"the {sparsity} window")):
      if window is not None and proposer.tree_size > window:
        raise ValueError(f"speculative decoding: the draft tree ({proposer.tree_size} tokens) "
                         f"must fit {what} ({window})")
    if isinstance(proposer, (DraftModel, Medusa, Eagle, Hydra)) and draft_params is None:
      raise ValueError(f"speculative decoding: the {proposer.name} proposer needs draft_params")
    if isinstance(proposer, Hydra) and (proposer.prefix is None) != (
        draft_params.prefix is None):
      raise ValueError("speculative decoding: Hydra heads with a prefix layer need "
                       "Hydra(prefix=prefix_config(cfg)), and only they")
    if isinstance(proposer, DraftModel) and proposer.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative decoding: the draft's vocabulary ({proposer.cfg.vocab_size})"
                       f" differs from the target's ({cfg.vocab_size})")
    if policy not in ("auto", "always"):
      raise ValueError(f"speculative decoding: policy must be auto or always, got {policy!r}")
    if isinstance(proposer, (DraftModel, Eagle, Hydra)):  # drafts attend as the target does
      proposer = dataclasses.replace(proposer, sparsity=sparsity)
    if prefill_chunk < 1:
      raise ValueError(f"speculative decoding: prefill_chunk must be >= 1, got {prefill_chunk}")
    self.prefill_chunk = prefill_chunk
    if num_slots is not None and num_slots < 1:
      raise ValueError(f"speculative decoding: num_slots must be >= 1, got {num_slots}")
    self.policy, self.explore_every = policy, explore_every
    self.num_slots = num_slots
    self._reserved = (0, 0)  # (prompt, new tokens) every batch's slots have room for
    self.measure_split = measure_split
    self.prefix_reuse = prefix_reuse
    self._batches = 0
    self._fresh = 0  # executables compiled so far
    self._plain = Generator(cfg, params, mesh, rules or DEFAULT_RULES,
                            implementation=implementation,
                            sparsity=sparsity)  # (without num_slots)
    self.engine_config = engine_config
    self._engine, self._engine_len = None, 0  # (with num_slots: built when first needed)
    self.cfg, self.params, self.proposer = cfg, params, proposer
    self.draft_params = draft_params
    self.rule, self.implementation, self.sparsity = rule, implementation, sparsity
    self.steps_per_sync, self.page_size = steps_per_sync, page_size
    self.mesh, self.rules = mesh, rules or DEFAULT_RULES
    self.stats = SpecStats(accepted_hist=np.zeros(proposer.max_depth + 1, np.int64),
                           full_tree=proposer.tree_size)
    # the proposer and its smaller trees, largest first (policy "auto" picks among them)
    self.ladder = [proposer]
    while policy == "auto" and len(self.ladder) <= max_shrinks:
      smaller = shrink(self.ladder[-1])
      if smaller is None or smaller.tree_size >= self.ladder[-1].tree_size:
        break
      self.ladder.append(smaller)
    self._last: dict[int | str, int] = {}  # mode -> the batch that last ran it
    self._compiled: dict = {}
    self._adjacency = (proposer.init_adjacency(cfg.vocab_size)
                       if isinstance(proposer, Recycling) else None)

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
    if key not in self._compiled:
      self._fresh += 1
      t0 = time.perf_counter()
      self._compiled[key] = jax.jit(self._placed(fn)).lower(*args).compile()
      self.stats.compile_s += time.perf_counter() - t0
      self.stats.compilations += 1
    return self._compiled[key](*args)

  def _placed(self, fn):
    """fn, a state it returns laid out as every state is on this generator's mesh (so each
    compiled step takes the state the last one returned)."""
    if self.mesh is None or self.mesh.size == 1:
      return fn

    def placed(*args):
      out = fn(*args)
      if isinstance(out, SpecState):
        out = jax.lax.with_sharding_constraint(
            out, state_shardings(out, self.mesh, self.rules, self.proposer))
      return out
    return placed

  def _place(self, state: SpecState) -> SpecState:
    """A state built on the host, laid out as `_placed` lays states out."""
    where = state_shardings(state, self.mesh, self.rules, self.proposer)
    return state if where is None else jax.device_put(state, where)

  def _measure_split(self, state, sampling, step_s: float, level: int) -> None:
    """The draft / verify time split: `steps_per_sync` proposals alone, timed on this batch's
    last state, against this batch's measured time per full step."""
    st = self.stats
    fn = partial(_draft_only, num_steps=self.steps_per_sync, proposer=self.ladder[level])
    args = (self.params, self.draft_params, state, sampling)
    name = ("draft_only", level)
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

  @property
  def _tps(self) -> dict[int, float]:
    """Ladder level -> measured decode tokens/s (of its tree size)."""
    measured = self.stats.tree_tps
    return {i: measured[p.tree_size] for i, p in enumerate(self.ladder)
            if p.tree_size in measured}

  @property
  def exploring(self) -> int | str | None:
    """The mode policy "auto" still has to measure before it can pick (see `_pick`), or None
    once it has measured all it will (always None for policy "always")."""
    st, tps = self.stats, self._tps
    if self.policy == "always":
      return None
    if 0 not in tps:
      return 0
    if st.plain_tps is None:
      return "plain"
    deepest = max(tps)
    if deepest + 1 < len(self.ladder) and (deepest == 0 or tps[deepest] < st.plain_tps
                                           or tps[deepest] > tps[deepest - 1]):
      return deepest + 1
    return None

  @property
  def compiling_next(self) -> bool:
    """Whether the next batch is the first of the mode the policy will pick (it compiles: a
    small batch will do); later batches are measured."""
    mode = self.exploring if self.policy == "auto" else 0
    return mode is not None and mode not in self._last

  def _choose(self) -> int | str:
    mode = self._pick()
    self._last[mode] = self._batches
    return mode

  def _pick(self) -> int | str:
    """Per batch: a ladder level (speculate with that tree) or "plain", whichever measured
    fastest. The proposer's own tree and plain decoding are measured first; then ever smaller
    trees while the smallest measured one still loses to plain decoding or beat the one before
    it (the first smaller tree is always tried). Every slower mode is re-tried now and then,
    less often the more it lost by, so a change is noticed at a bounded cost. Each mode's first
    batch (compilation) is not a measurement."""
    st, tps = self.stats, self._tps
    self._batches += 1
    if self.policy == "always":
      return 0
    explore = self.exploring
    if explore is not None:
      return explore
    modes: dict[int | str, float] = {**tps, "plain": st.plain_tps}
    best = max(modes, key=lambda m: modes[m])
    # the most overdue of the modes whose re-try interval has passed, else the fastest
    overdue = {m: (self._batches - self._last.get(m, 0)) / min(256, self.explore_every * (
        modes[best] / max(modes[m], 1e-9))**2) for m in modes if m != best}
    late = max(overdue, key=lambda m: overdue[m], default=None)
    return late if late is not None and overdue[late] >= 1 else best

  def _generate_plain(self, rows, should_stop, on_result):
    """Plain decoding: with `num_slots`, through the continuous-batching engine (its paged
    cache, chunked prefill and prefix sharing; samples as the static `Generator` draws them);
    otherwise in static batches."""
    if self.num_slots is None:
      return self._generate_static(rows, should_stop, on_result)
    from jaxinfer.engine import EngineRequest
    need = max([len(r.prompt_ids) + r.max_new_tokens for r in rows] + [sum(self._reserved)])
    if self._engine is None or self._engine_len < need:
      from jaxinfer.engine import Engine, EngineConfig
      ecfg = self.engine_config or EngineConfig(num_slots=self.num_slots,
                                                page_size=self.page_size)
      self._engine = Engine(self.cfg, self.params, ecfg, need, self.mesh, self.rules,
                            implementation=self.implementation, sparsity=self.sparsity)
      self._engine_len = need
    eng = self._engine
    before = dataclasses.replace(eng.stats)
    reqs = [EngineRequest(i, list(r.prompt_ids), r.max_new_tokens,
                          np.asarray(jax.random.key_data(r.key)), r.temperature, r.top_k,
                          r.top_p, r.min_p) for i, r in enumerate(rows)]
    results: list[RowResult | None] = [None] * len(rows)

    def done(res):
      results[res.uid] = RowResult(res.tokens, res.finished_by_eos)
      if on_result is not None:
        on_result(res.uid, results[res.uid])

    after = eng.run(reqs, done, should_stop)

    def delta(f):  # the engine decodes each request's first token too: counted with its prefill
      d = getattr(after, f) - getattr(before, f)  # here, as the static and speculative paths do
      return d - len(rows) if f == "decode_tokens" else d

    self._count_plain(delta, {"prefill_s": "mixed_busy_s", "decode_s": "decode_busy_s",
                              "prefill_tokens_saved": "prefill_tokens_saved"},
                      delta("busy_s"))
    return results

  def _generate_static(self, rows, should_stop, on_result):
    tm = self._plain.timings
    before = dataclasses.replace(tm)
    results = self._plain.generate(rows, should_stop)
    if on_result is not None:
      for i, res in enumerate(results):
        on_result(i, res)
    delta = lambda f: getattr(tm, f) - getattr(before, f)
    self._count_plain(delta, {"prefill_s": "prefill_s", "decode_s": "decode_s"},
                      delta("prefill_s") + delta("decode_s"))
    return results

  def _count_plain(self, delta: Callable[[str], float], names: dict[str, str],
                   busy_s: float) -> None:
    """Adds a plain batch to the stats: `delta(counter)`, the growth of the plain decoder's
    counter; `names`, our counters -> its, besides those of the same name; its speed unless it
    compiled (no measurement)."""
    st = self.stats
    names = {f: f for f in ("prefill_tokens", "decode_tokens", "compile_s",
                            "compilations")} | names
    for ours, theirs in names.items():
      setattr(st, ours, getattr(st, ours) + delta(theirs))
    st.plain_batches += 1
    if not delta("compilations"):
      st.plain_tps = _average(st.plain_tps, delta("decode_tokens") / max(busy_s, 1e-9))

  def reserve(self, max_prompt_len: int, max_new_tokens: int) -> None:
    """Sizes every later batch's slots for at least these lengths, so that batches of one job
    share their compiled steps (continuous batching: set it for the job's longest request)."""
    self._reserved = (max_prompt_len, max_new_tokens)

  def generate(self, rows: Sequence[RowRequest],
               should_stop: Callable[[int, list[int]], bool] | None = None,
               on_result: Callable[[int, RowResult], None] | None = None) -> list[RowResult]:
    """Every row's result (in order); `on_result(i, result)` is also called as row i finishes.

    With `num_slots` (continuous batching) the rows run in that many slots, a finished row's
    slot refilled with the next row at the next host round trip; otherwise all rows at once."""
    if not rows:
      return []
    with self._on_device():
      return self._generate(rows, should_stop, on_result)

  def _on_device(self):
    """New arrays on this generator's device (a replica's one-device mesh), in this thread."""
    if self.mesh is not None and self.mesh.devices.size == 1:
      return jax.default_device(self.mesh.devices.flat[0])
    return contextlib.nullcontext()

  def _generate(self, rows, should_stop, on_result) -> list[RowResult]:
    mode = self._choose()
    if mode == "plain":
      return self._generate_plain(rows, should_stop, on_result)
    return self._generate_spec(rows, should_stop, on_result, mode)

  def _geometry(self, prompt_len: int, max_new: int, tree_size: int) -> tuple[int, int]:
    """(output buffer length, positions per slot) for rows up to these lengths (and at least
    the reserved ones)."""
    o = next_pow2(max(max_new, self._reserved[1]), 16)
    width = next_pow2(max(prompt_len, self._reserved[0]), 16)
    return o, -(-(width + o + tree_size) // self.page_size) * self.page_size  # the last tree

  def memory_bytes(self, max_prompt_len: int, max_new_tokens: int, rows: int,
                   per_device: bool = False) -> int:
    """Device memory a batch of `rows` requests up to these lengths holds at its peak: the
    speculative state of the largest tree (every slot's pages, the proposer's caches, per-row
    buffers) plus, with slots and policy "auto", the plain-decoding engine's page pool.
    per_device: what one device of the mesh holds of it (slots that do not split over fsdp are
    whole on each device; the engine's pool splits over `model` only)."""
    from jaxinfer.kv_cache import POOL_AXES
    from jaxinfer.sharding import device_bytes
    b = self.num_slots or rows
    o, max_len = self._geometry(max_prompt_len, max_new_tokens, self.proposer.tree_size)
    shapes = jax.eval_shape(lambda: self._empty_state(b, max_len, o, jax.random.key(0),
                                                      self.proposer))
    mesh = self.mesh if per_device else None
    total = device_bytes(shapes, state_shardings(shapes, mesh, self.rules, self.proposer))
    if self.num_slots is not None and self.policy == "auto":
      from jaxinfer.engine import EngineConfig
      from jaxinfer.engine.engine import pool_pages_for
      ecfg = self.engine_config or EngineConfig(num_slots=b, page_size=self.page_size)
      pages = pool_pages_for(ecfg, -(-(max_prompt_len + max_new_tokens) // ecfg.page_size))
      layer = jax.ShapeDtypeStruct(
          PagedKVCache.pool_shape(self.cfg, pages, ecfg.page_size), self.cfg.jnp_dtype)
      where = (None if mesh is None or mesh.size == 1 else
               self.rules.sharding(mesh, POOL_AXES, layer.shape))
      total += 2 * self.cfg.num_layers * device_bytes(layer, where)
    return total

  def _new_state(self, b: int, max_len: int, out_len: int, key: jax.Array, proposer,
                 level: int) -> SpecState:
    """`_empty_state`, made where it lives: on a mesh each device makes only its own part."""
    if self.mesh is None or self.mesh.size == 1:
      return self._empty_state(b, max_len, out_len, key, proposer)
    make = lambda key, adjacency: self._empty_state(b, max_len, out_len, key, proposer,
                                                    adjacency)
    return self._run(("empty", level, b, max_len, out_len), make, key, self._adjacency)

  def _empty_state(self, b: int, max_len: int, out_len: int, key: jax.Array,
                   proposer, adjacency=None) -> SpecState:
    """b free slots (done) over zeroed pages: rows are admitted into it (adjacency: Token
    Recycling's, default this generator's)."""
    cfg, ps = self.cfg, self.page_size
    adjacency = self._adjacency if adjacency is None else adjacency
    k, v = PagedKVCache.init_pools(cfg, b * (max_len // ps), ps)
    w = 16
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    shapes = jax.eval_shape(
        partial(_proposer_prefill, proposer=proposer, max_len=max_len), self.params,
        self.draft_params, spec((b, w, cfg.embed), cfg.jnp_dtype),
        spec((b, cfg.embed), cfg.jnp_dtype), spec((b, w), jnp.int32),
        spec((b,), jnp.int32), spec((b,), jnp.int32), adjacency)
    pstate = (adjacency if isinstance(proposer, Recycling) else
              jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    return SpecState(
        k=k, v=v, history=zeros(b, max_len), length=zeros(b), out=zeros(b, out_len),
        num_generated=zeros(b), max_new=zeros(b), done=jnp.ones((b,), bool),
        keys=jnp.stack([key] * b), step=zeros(), proposer=pstate,
        accepted_hist=zeros(proposer.max_depth + 1), emitted=zeros())

  def _generate_spec(self, rows, should_stop, on_result, level: int) -> list[RowResult]:
    proposer = self.ladder[level]
    cfg, t, ps = self.cfg, proposer.tree_size, self.page_size
    n = len(rows)
    b = n if self.num_slots is None else self.num_slots
    o, max_len = self._geometry(max(len(r.prompt_ids) for r in rows),
                                max(r.max_new_tokens for r in rows), t)
    m = max_len // ps
    page_table = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
    kw = dict(cfg=cfg, proposer=proposer, implementation=self.implementation,
              sparsity=self.sparsity, mesh=self.mesh, rules=self.rules)
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    eos_set = set(int(e) for e in cfg.eos_token_ids)
    admit = partial(_admit, max_len=max_len, page_size=ps, **kw)
    chunk = partial(_chunk, rule=self.rule, **kw)
    extend = partial(_extend, max_len=max_len, page_size=ps, **kw)
    fields = ("temperature", "top_k", "top_p", "min_p")
    sp = {"temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
          "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32)}
    to_device = lambda d: SamplingParams(**{f: jnp.asarray(d[f]) for f in fields})

    state = self._new_state(b, max_len, o, rows[0].key, proposer, level)
    sharing = self.prefix_reuse
    # the prefix's last token computed again: its hidden state feeds the draft layer
    recompute = int(_reads_prompt_features(proposer))
    prefixes = SlotPrefixes(m)
    sampling = to_device(sp)
    slot_row: list[int | None] = [None] * b
    pending = list(range(n))[::-1]  # popped from the end: in order
    results: list[RowResult | None] = [None] * n
    host_done = np.ones(b, bool)
    st = self.stats
    prefill_s = decode_s = 0.0
    new_tokens = syncs = 0
    fresh = self._fresh
    c = self.prefill_chunk
    # A long admission (rows with more than `c` prompt tokens to compute) runs in chunks of c
    # tokens per row, one verification step of the other rows between chunks; its slots are
    # held (not free, not live) until its last chunk admits the rows. One at a time.
    group = None

    def admit_rows(take, slots, found_of, first, keys_of, from_start=None):
      """Admits rows `take` into `slots`: computes each prompt from `from_start` (default: its
      first position not reused), copying reused pages unless a long admission's chunks have
      (they computed from `first` on); samples the first tokens; offers the prompts' pages
      (`keys_of`) for reuse and counts the prefill. Returns the new state."""
      chunked = from_start is not None
      k = min(b, next_pow2(len(take)))  # a few admission sizes; padding rows write nothing
      begin = list(from_start) if chunked else first
      w = next_pow2(max(len(rows[i].prompt_ids) - f for i, f in zip(take, begin)), 16)
      hw = next_pow2(max(len(rows[i].prompt_ids) for i in take), 16)
      toks, hist = np.zeros((k, w), np.int32), np.zeros((k, hw), np.int32)
      start, plen, mnew = np.zeros(k, np.int32), np.ones(k, np.int32), np.ones(k, np.int32)
      copy_src = np.zeros((k, m), np.int32)
      copy_dst = np.full((k, m), b * m, np.int32)  # past the pool: no copy
      slot_ids = np.full(k, b, np.int32)
      msp = {f: np.zeros(k, sp[f].dtype) for f in fields}
      msp["top_p"][:] = 1.0
      for j, (i, s, found) in enumerate(zip(take, slots, found_of)):
        r = rows[i]
        hist[j, :len(r.prompt_ids)] = r.prompt_ids
        toks[j, :len(r.prompt_ids) - begin[j]] = r.prompt_ids[begin[j]:]
        start[j], plen[j], mnew[j], slot_ids[j] = begin[j], len(r.prompt_ids), \
            r.max_new_tokens, s
        if chunked:  # the draft layer's cache continues in the slot's own pages
          copy_src[j] = s * m + np.arange(m)
        else:
          copy_src[j, :len(found)] = found
          copy_dst[j, :len(found)] = s * m + np.arange(len(found))
        slot_row[s] = i
        for f in fields:
          msp[f][j] = sp[f][s] = getattr(r, f)
      keys = jnp.stack([rows[i].key for i in take] + [rows[take[0]].key] * (k - len(take)))
      from_cache = bool(start.any())
      new = self._run(("admit", level, from_cache), partial(admit, from_cache=from_cache),
                      self.params, self.draft_params, state, toks if from_cache else hist,
                      start, hist, plen, mnew, to_device(msp), keys, eos, slot_ids, copy_src,
                      copy_dst)
      for s, pkeys in zip(slots, keys_of):
        prefixes.refill(s, pkeys)
      st.prefill_tokens += sum(len(rows[i].prompt_ids) for i in take) - sum(first)
      st.prefill_tokens_saved += sum(first)
      return new

    def extend_rows(g):
      """The next chunk of long admission `g`: c more prompt tokens for each of its rows with
      more than c left (the rest wait for the admission itself)."""
      take, slots, found_of, frontier = g["take"], g["slots"], g["found"], g["frontier"]
      k = min(b, next_pow2(len(take)))
      hw = next_pow2(max(len(rows[i].prompt_ids) for i in take), 16)
      toks, hist = np.zeros((k, c), np.int32), np.zeros((k, hw), np.int32)
      start, end = np.zeros(k, np.int32), np.zeros(k, np.int32)
      copy_src = np.zeros((k, m), np.int32)
      copy_dst = np.full((k, m), b * m, np.int32)
      slot_ids = np.full(k, b, np.int32)
      copy = g["frontier"] == g["first"] and any(found_of)  # the first chunk (all advance)
      for j, (i, s, found) in enumerate(zip(take, slots, found_of)):
        ids = rows[i].prompt_ids
        hist[j, :len(ids)] = ids
        f = frontier[j]
        e = f + c if len(ids) - f > c else f  # short enough now: waits for the admission
        toks[j, :e - f] = ids[f:e]
        start[j], end[j], slot_ids[j] = f, e, s
        copy_src[j] = s * m + np.arange(m)
        if copy:
          copy_src[j, :len(found)] = found
          copy_dst[j, :len(found)] = s * m + np.arange(len(found))
        frontier[j] = e
      return self._run(("extend", level, copy), partial(extend, copy=copy), self.params,
                       self.draft_params, state, toks, start, end, hist, slot_ids, copy_src,
                       copy_dst)

    while True:
      held = set() if group is None else set(group["slots"])
      finished = [s for s in range(b) if slot_row[s] is not None and host_done[s]]
      if finished:
        toks, counts = np.asarray(state.out), np.asarray(state.num_generated)
        for s in finished:
          i, slot_row[s] = slot_row[s], None
          ids = [int(x) for x in toks[s, :counts[s]]]
          results[i] = RowResult(ids, bool(ids) and ids[-1] in eos_set)
          new_tokens += max(0, len(ids) - 1)
          if on_result is not None:
            on_result(i, results[i])
      free = [s for s in range(b) if slot_row[s] is None and s not in held]
      if pending and free:
        take, starts, keys_of, computing, first, long_rows = [], [], [], set(), [], []
        while pending and len(take) < len(free):
          r = rows[pending[-1]]
          plen = len(r.prompt_ids)
          pkeys = page_keys(r.prompt_ids, ps, plen // ps) if sharing else []
          # the last prompt token is always computed (it samples the first output token)
          shareable = pkeys[:(plen - 1) // ps]
          found = prefixes.find(shareable)
          if take and len(found) < len(shareable) and shareable[len(found)] in computing:
            break  # an earlier row of this admission computes more of its prefix: next one
          begin = max(0, len(found) * ps - recompute)  # the first position computed
          long = plen - begin > c
          if long and group is not None:
            break  # one long admission at a time
          computing.update(pkeys)
          first.append(begin)
          long_rows.append(long)
          take.append(pending.pop())
          starts.append(found)
          keys_of.append(pkeys)
        slots = free[:len(take)]
        now = [j for j, long in enumerate(long_rows) if not long]
        later = [j for j, long in enumerate(long_rows) if long]
        t0, c1 = time.perf_counter(), st.compile_s
        if now:
          pick = lambda xs: [xs[j] for j in now]
          state = admit_rows(pick(take), pick(slots), pick(starts), pick(first), pick(keys_of))
          sampling = to_device(sp)
          host_done = np.asarray(state.done)
        if later:
          pick = lambda xs: [xs[j] for j in later]
          for s in pick(slots):  # its chunks overwrite the slot's pages: nothing to reuse now
            prefixes.refill(s, [])
          group = {"take": pick(take), "slots": pick(slots), "found": pick(starts),
                   "first": pick(first), "keys": pick(keys_of), "frontier": pick(first)}
        prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
        if now:
          continue  # rows done at their first token are delivered before decoding
      if group is not None:
        t0, c1 = time.perf_counter(), st.compile_s
        g = group
        if all(len(rows[i].prompt_ids) - f <= c for i, f in zip(g["take"], g["frontier"])):
          state = admit_rows(g["take"], g["slots"], g["found"], g["first"], g["keys"],
                             g["frontier"])
          sampling = to_device(sp)
          host_done = np.asarray(state.done)
          group = None
          prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
          continue
        state = extend_rows(g)
        st.prefill_chunks += 1
        prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
      live = [s for s in range(b) if slot_row[s] is not None and not host_done[s]]
      if not live:
        if group is not None:
          continue
        break
      # With requests waiting, hand back as soon as one more row is done (its slot refilled);
      # during a long admission, after one step (its next chunk follows).
      min_done = b - len(live) + 1 if pending else b
      t0, c1 = time.perf_counter(), st.compile_s
      state = self._run(("decode", level), chunk, self.params, self.draft_params, state, sampling,
                        page_table, eos, np.int32(min_done),
                        np.int32(1 if group is not None else self.steps_per_sync))
      host_done = np.asarray(state.done)
      decode_s += time.perf_counter() - t0 - (st.compile_s - c1)
      syncs += 1
      if should_stop is not None:
        toks, counts = np.asarray(state.out), np.asarray(state.num_generated)
        newly = [s for s in live if not host_done[s]
                 and should_stop(slot_row[s], [int(x) for x in toks[s, :counts[s]]])]
        if newly:
          host_done = host_done.copy()
          host_done[newly] = True
          state = self._place(state.replace(done=jnp.asarray(host_done)))
    if isinstance(proposer, Recycling):
      self._adjacency = state.proposer  # what it learned carries over to the next batch
    steps = int(state.step)
    hist = np.asarray(state.accepted_hist)  # (a smaller tree: fewer depths)
    st.accepted_hist[:len(hist)] += hist
    st.verify_steps = int(st.accepted_hist.sum())
    st.emitted += int(state.emitted)
    st.steps += steps
    st.row_slots += steps * b
    st.decode_tokens += new_tokens
    st.decode_s += decode_s
    st.prefill_s += prefill_s
    st.host_syncs += syncs
    st.spec_batches += 1
    st.tree_batches[t] = st.tree_batches.get(t, 0) + 1
    if self._fresh == fresh:  # not the first run of a fresh executable (slow)
      st.tree_tps[t] = _average(st.tree_tps.get(t), new_tokens / max(prefill_s + decode_s,
                                                                     1e-9))
      if st.draft_share is None and self.measure_split and steps:
        self._measure_split(state, sampling, decode_s / steps, level)
    return results
