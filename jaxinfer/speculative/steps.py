"""The speculative generator's device steps, each a pure function jitted by the generator:
`_chunk` (up to N draft-verify-accept-commit steps), `_admit` (a batch's prompts prefilled) and
`_draft_only` (drafting alone, timed).

B rows, T tree nodes, S cache positions per row (pages of the row's own), V vocabulary,
D embed. The proposer is static (a frozen dataclass); everything it does goes through its
protocol (`jaxinfer.speculative.protocol`). So is the target's `runtime` (`jaxinfer.runtime`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import model as M
from jaxinfer.kv_cache import PagedKVCache, TreeKVCache, commit_path
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams, argmax, distribution, sample
from jaxinfer.speculative import acceptance
from jaxinfer.speculative.protocol import Context, Prompt, Verified, Weights
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
  (`data`/`fsdp`) with their pages (a row owns pages [b*M, (b+1)*M)), KV heads over `model`,
  the counters whole; the proposer's state as it lays it out (`Proposer.state_shardings`: its
  rows and draft caches with the rows, a state shared by every row whole). Rows that do not
  divide over the batch axes stay whole."""
  from jaxinfer.sharding import rows_split
  if mesh is None or mesh.size == 1:
    return None
  b = state.length.shape[0]
  rows = "batch" if rows_split(b, mesh, rules) else None
  at = lambda x, axes: rules.sharding(mesh, axes, x.shape)
  by_row = lambda x: at(x, (rows,) + (None,) * (x.ndim - 1))
  whole = lambda x: at(x, (None,) * x.ndim)
  pool = lambda x: at(x, ("kv_heads", rows, None, "head_dim"))
  return SpecState(
      k=tuple(map(pool, state.k)), v=tuple(map(pool, state.v)),
      **{f: by_row(getattr(state, f)) for f in ("history", "length", "out", "num_generated",
                                                "max_new", "done", "keys")},
      step=whole(state.step), accepted_hist=whole(state.accepted_hist),
      emitted=whole(state.emitted),
      proposer=proposer.state_shardings(state.proposer, mesh, rules, rows))


def _propose(params, draft_params, state: SpecState, sampling: SamplingParams, proposer,
             greedy_only: bool = False):
  # Per row, keyed by its own progress: a request samples the same tokens whatever else shares
  # its batch and whenever it was admitted.
  step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.num_generated)
  ctx = Context(state.history, state.length, sampling,
                jax.vmap(lambda k: jax.random.fold_in(k, _DRAFT_SALT))(step_keys),
                greedy_only=greedy_only)
  pstate, draft = proposer.draft(Weights(draft_params, params), state.proposer, ctx)
  return step_keys, pstate, draft


def _draft_only(params, draft_params, state: SpecState, sampling, *, num_steps, proposer,
                greedy_only: bool = False):
  """`num_steps` proposals from the same state (the drafting part of a step, timed alone)."""
  def body(i, carry):
    pstate, acc = carry
    # Each proposal reads the last one's proposer state and a value that depends on its tokens
    # (acc is never negative, but the compiler cannot know): nothing is hoisted out of the loop.
    s = state.replace(num_generated=state.num_generated + i, proposer=pstate,
                      length=jnp.where(acc < 0, state.length + 1, state.length))
    _, pstate, draft = _propose(params, draft_params, s, sampling, proposer, greedy_only)
    return pstate, acc + jnp.sum(draft.tokens)

  return jax.lax.fori_loop(0, num_steps, body, (state.proposer, jnp.zeros((), jnp.int32)))[1]


def _verify(params, state: SpecState, draft, parents, sampling: SamplingParams, step_keys,
            page_table, *, cfg, rule, runtime: Runtime, greedy_only: bool):
  """One target forward over every row's tree (its K/V written past the committed length) and
  the acceptance rule: (hidden (B,T,D), logits (B,T,V), verdict, the cache written)."""
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1  # (B,T)
  cache = TreeKVCache(state.k, state.v, page_table, state.length, pack_ancestors(parents),
                      contiguous=True)
  hidden, cache = M.forward(params, draft.tokens, state.length[:, None] + depth, cfg, cache,
                            kv_source="cache", runtime=runtime)
  logits = M.logits(params, hidden)  # (B,T,V)
  return (hidden, logits, judge(logits, draft, parents, sampling, step_keys, rule, greedy_only),
          cache)


def tried(parents, limit):
  """parents (B,T) with the nodes deeper than each row's `limit` (B,) cut off (parent -1: never
  tried); None: every node."""
  if limit is None:
    return parents
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1
  return jnp.where(depth > limit[:, None], -1, parents)


def judge(logits, draft, parents, sampling: SamplingParams, step_keys, rule: str,
          greedy_only: bool = False):
  """The acceptance rule's verdict on each row's tree given the target's logits (B,T,V); nodes
  deeper than the draft's `limit` are not tried. greedy_only: every row is known to be greedy
  (compiled without the vocabulary sort of sampled acceptance); otherwise the device checks."""
  greedy = sampling.temperature <= 0
  parents = tried(parents, draft.limit)
  verify_keys = jax.vmap(lambda k: jax.random.fold_in(k, _VERIFY_SALT))(step_keys)

  def sampled(_):  # the full rule on distributions (greedy rows among them follow the argmax)
    p = distribution(logits, sampling)  # (B,T,V)
    return acceptance.verify(verify_keys, p, draft.tokens, parents, draft.q, greedy=greedy,
                             rule=rule)

  def all_greedy(_):
    if rule == acceptance.TYPICAL:
      return sampled(None)
    return acceptance.verify_greedy(draft.tokens, parents, argmax(logits))

  if greedy_only:
    return all_greedy(None)
  return jax.lax.cond(jnp.all(greedy), all_greedy, sampled, None)


def emit(state, draft, verdict, eos_ids, live):
  """(emitted (B,T), tokens emitted per row, tokens accepted + 1 per row, history, length,
  done) after a verification: the accepted drafts, then the next token, cut at EOS and at the
  budget (the first `n_emit` of `emitted` are real). `state` has the rows' history, length,
  num_generated, max_new and done."""
  b, t = draft.tokens.shape
  n_acc = verdict.num_accepted
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
  # history: accepted drafts and the next token follow the root.
  hist = state.history.at[rows, jnp.where((d < count[:, None]) & live[:, None],
                                          state.length[:, None] + 1 + d,
                                          state.history.shape[1])].set(emitted, mode="drop")
  new_length = jnp.where(live, state.length + count, state.length)
  done = state.done | (live & ((first_eos < count) | (state.num_generated + n_emit
                                                       >= state.max_new)))
  return emitted, n_emit, count, hist, new_length, done


def _step(params, draft_params, state: SpecState, sampling: SamplingParams, page_table, eos_ids,
          *, cfg, proposer, rule, runtime: Runtime, greedy_only: bool = False):
  b = state.length.shape[0]
  t = proposer.tree_size
  live = ~state.done
  step_keys, pstate, draft = _propose(params, draft_params, state, sampling, proposer,
                                      greedy_only)
  parents = jnp.broadcast_to(draft.parents, (b, t))
  hidden, logits, verdict, cache = _verify(
      params, state, draft, parents, sampling, step_keys, page_table, cfg=cfg, rule=rule,
      runtime=runtime, greedy_only=greedy_only)
  n_acc = verdict.num_accepted
  if proposer.is_chain:  # already in place
    k_new, v_new = cache.k, cache.v
  else:
    k_new = commit_path(cache.k, page_table, state.length, verdict.path, n_acc)
    v_new = commit_path(cache.v, page_table, state.length, verdict.path, n_acc)
  emitted, n_emit, count, hist, new_length, done = emit(state, draft, verdict, eos_ids, live)
  d = jnp.arange(t)[None, :]
  out = state.out.at[jnp.arange(b)[:, None], jnp.where(
      d < n_emit[:, None], state.num_generated[:, None] + d, state.out.shape[1])].set(
          emitted, mode="drop")
  pstate = proposer.observe(Weights(draft_params, params), pstate, Verified(
      draft.tokens, hidden, logits, verdict.path, n_acc, verdict.next_token, state.length, live))
  hist_acc = state.accepted_hist + jnp.zeros_like(state.accepted_hist).at[n_acc].add(
      live.astype(jnp.int32))
  return SpecState(k_new, v_new, hist, new_length, out, state.num_generated + n_emit,
                   state.max_new, done, state.keys, state.step + 1, pstate, hist_acc,
                   state.emitted + jnp.sum(jnp.where(live, count, 0)))


def _chunk(params, draft_params, state, sampling, page_table, eos_ids, num_steps, **kw):
  """Up to `num_steps` (traced) steps; ends early once every row is done. greedy_only (in kw):
  every row is known to be greedy (`judge`)."""
  def cond(c):
    i, s = c
    return (i < num_steps) & ~jnp.all(s.done)

  def body(c):
    i, s = c
    return i + 1, _step(params, draft_params, s, sampling, page_table, eos_ids, **kw)

  return jax.lax.while_loop(cond, body, (0, state))[1]


def _admit(params, draft_params, state: SpecState, history, prompt_len, max_new, sampling, keys,
           eos_ids, *, cfg, proposer, max_len, page_size, runtime: Runtime,
           greedy_only: bool = False) -> SpecState:
  """Prefills the batch's B rows into an empty state: each whole prompt (history (B, W), by
  position) computed into its row's own pages, the first token sampled as plain decoding samples
  it, the proposer's state and the row's counters set."""
  b, w = history.shape
  keys = jnp.stack(keys)  # (one key per row, stacked here rather than by an operation of its own)
  rows = jnp.arange(b)
  m = max_len // page_size
  page_table = (rows[:, None] * m + jnp.arange(m)[None, :]).astype(jnp.int32)
  # Padding sits at out-of-range positions, after every real token, and is never written.
  pos = jnp.arange(w)[None, :]
  positions = jnp.where(pos < prompt_len[:, None], pos, max_len)
  hidden, cache = M.forward(params, history, positions, cfg,
                            PagedKVCache(state.k, state.v, page_table), kv_source="chunk",
                            runtime=runtime)
  last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
  first = sample(M.logits(params, last), sampling,
                 jax.vmap(lambda kk: jax.random.fold_in(kk, 0))(keys),
                 greedy_only).astype(jnp.int32)
  prompt = Prompt(hidden, last, history, prompt_len, first, rows, max_len=max_len)
  pstate = proposer.admit(Weights(draft_params, params), state.proposer, prompt)
  hist = jnp.pad(history, ((0, 0), (0, max_len - w))).at[rows, prompt_len].set(first)
  return state.replace(
      k=cache.k, v=cache.v, history=hist, length=prompt_len,
      out=jnp.zeros_like(state.out).at[:, 0].set(first),
      num_generated=jnp.ones((b,), jnp.int32), max_new=max_new,
      done=(max_new <= 1) | jnp.isin(first, eos_ids), keys=keys, proposer=pstate)
