"""Speculative decoding inside the engine: each slot's decode row is a draft tree of T tokens,
verified in the engine's mixed step beside the prompt lanes (SARATHI with trees), over the
engine's one page pool (shared prompt pages read by reference, never copied).

S slots, T tree nodes, L positions per sequence (its pages), G lanes of Q prompt tokens.
A row accepts a varying number of drafts per step, so its length, its tokens by position (what
a lookup proposer reads) and its output count live on the device (`Drafting`); the host admits
prompts into slots, lays out lanes and page tables and reads back what each step emitted.
A step computes only as much of the trees as the rows' drafts reach (`Draft.limit`,
`prefixes`): with no row drafting, one token per row, a plain step. A proposer with a draft layer
or a draft model of its own (`Proposer.paged_layers`) keeps its K/V in the engine's page layout,
written from the lanes' tokens or hidden states, and from the plain engine's steps' (`feed`)
while the auto policy decodes plainly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import model as M
from jaxinfer.kv_cache import MixedPagedKVCache, commit_path
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams
from jaxinfer.speculative.protocol import Context, Draft, Prompt, Verified, Weights, put_rows
from jaxinfer.speculative.verdict import DRAFT_SALT, emit, judge
from pallas_kernels.tree_attention import ancestor_matrix, pack_ancestors


@struct.dataclass
class Drafting:
  """The device side of speculation in S slots."""

  history: jax.Array  # (S, L) tokens by position; the root (last committed token) at `length`
  length: jax.Array  # (S,) the root's position (tokens before it are in the cache)
  num_generated: jax.Array  # (S,)
  max_new: jax.Array  # (S,)
  done: jax.Array  # (S,) the row ended (EOS or its budget): it writes and emits nothing more
  # (S,) the row was verified since its admission (a proposer that `drafts_from_hidden` has
  # its state only then)
  primed: jax.Array
  verified: jax.Array  # () tree nodes the target computed for live rows, every step so far
  proposer: Any  # the proposer's state (one row per slot, or one shared value)


def whole(state, runtime: Runtime):
  """The state (`Drafting`, or a proposer's) whole on each of the replica's devices (one layout
  from step to step)."""
  return jax.tree_util.tree_map(lambda x: runtime.constrain(x, (None,) * x.ndim), state)


def feed(params, draft_params, layer, tokens, hidden, next_tokens, positions, pages, *,
         proposer, runtime: Runtime):
  """A `paged_layers` proposer's state `layer` after the target computed `hidden` (G, Q, D) over
  `tokens` (G, Q) at `positions` (G, Q) (out of range: nothing), `next_tokens` (G, Q) the token
  after each, through page tables `pages` (G, M): its layers' K/V written there
  (`Proposer.lanes`), whole on the replica. The plain engine's steps feed it so
  (`engine.engine_step`)."""
  return whole(proposer.lanes(Weights(draft_params, params), layer, tokens, hidden, next_tokens,
                              positions, pages), runtime)


def flush(state: Drafting, params, draft_params, pages, *, proposer,
          runtime: Runtime) -> Drafting:
  """Rows turning from trees to the plain engine's steps: each one's pending pairs (what its
  last verification accepted) written to a `paged_layers` proposer's pages through its table in
  `pages` (S, M) (-1: a row not turning, nothing written)."""
  pstate = proposer.flush(Weights(draft_params, params), state.proposer, pages)
  return whole(state.replace(proposer=pstate), runtime)


def init_drafting(cfg, proposer, num_slots: int, max_len: int, shared, draft_params, *,
                  pages: tuple[int, int], runtime: Runtime) -> Drafting:
  """The state of `num_slots` free slots of `max_len` positions; `pages`: the pool's (number,
  size), for a proposer with `paged_layers`."""
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  weights = Weights(draft_params, None)
  if proposer.paged_layers:
    rows = proposer.init_pages(weights, cfg, num_slots, *pages)
  else:
    rows = proposer.init_state(weights, cfg, num_slots, max_len, shared)
  return whole(Drafting(zeros(num_slots, max_len), zeros(num_slots), zeros(num_slots),
                        zeros(num_slots), jnp.ones((num_slots,), bool),
                        jnp.zeros((num_slots,), bool), zeros(), rows), runtime)


def admit(state: Drafting, params, draft_params, slots, prompts, prompt_len, generated, max_new,
          pages=None, *, cfg, proposer, runtime: Runtime) -> Drafting:
  """Rows start in `slots` (k,) (past the end: padding): their tokens so far (k, W) by
  position, of which the last `generated` are output (a row that decoded plainly until now),
  the root at the last (its K/V are written by the row's first verification). A proposer that
  `drafts_from_hidden` gets zeros for the hidden state: the row drafts nothing until verified;
  draft layers in the engine's pages (a draft model's too) have the prompt's K/V from its lanes
  and what the row decoded plainly from the plain steps that fed them; `pages` (k, M): the
  tables of rows whose context they lack, which a draft model writes now from their tokens
  (`Prompt.pages`)."""
  k, w = prompts.shape
  hist = jnp.pad(prompts, ((0, 0), (0, state.history.shape[1] - w)))
  prompt = Prompt(None, jnp.zeros((k, cfg.embed), cfg.jnp_dtype), prompts, prompt_len,
                  jnp.zeros((k,), jnp.int32), slots, max_len=state.history.shape[1],
                  pages=pages)
  put = lambda old, new: put_rows(old, new, slots)
  return whole(state.replace(
      history=put(state.history, hist), length=put(state.length, prompt_len - 1),
      num_generated=put(state.num_generated, generated), max_new=put(state.max_new, max_new),
      done=put(state.done, jnp.zeros((k,), bool)),
      primed=put(state.primed, jnp.zeros((k,), bool)),
      proposer=proposer.admit(Weights(draft_params, params), state.proposer, prompt)), runtime)


def prefixes(proposer) -> tuple[tuple[int, int], ...]:
  """(nodes, the depth they reach) of the tree prefixes a step verifies, smallest first: a step
  computes the smallest that reaches every live row's `Draft.limit`, down to the root alone (a
  plain step) when no row drafts. Tree nodes come breadth-first, so a prefix is a tree; a
  chain's are 1, 2, 3, 5, 9, ... nodes and the whole chain."""
  t = proposer.tree_size
  if not proposer.is_chain:
    return ((1, 0), (t, proposer.max_depth))
  sizes = {n for n in (1, 2, 3) if n < t} | {1 + (1 << i) for i in range(2, t.bit_length())
                                             if 1 + (1 << i) < t}
  return tuple((n, n - 1) for n in sorted(sizes | {t}))


def _lanes(weights, pstate, tokens, hidden, next_tokens, positions, table, *, proposer):
  """A `paged_layers` proposer's state after the lanes' tokens (G * Q,) (hidden states: the
  target's over them, or None where `layers_read_hidden` is not set) through their tables."""
  if not (tokens.shape[0] and proposer.paged_layers):
    return pstate
  g = table.shape[0]
  hidden = None if hidden is None else hidden.reshape(g, -1, hidden.shape[-1])
  return proposer.lanes(weights, pstate, tokens.reshape(g, -1), hidden,
                        next_tokens.reshape(g, -1), positions.reshape(g, -1), table)


@struct.dataclass
class _Next:
  """The next step's drafts, proposed after the last step (or before the first)."""

  proposer: Any  # the proposer's state after drafting
  draft: Draft  # limit: how deep each live row tries (0: a row not live, or drafting nothing)
  keys: jax.Array  # (S,) the step's keys
  width: jax.Array  # () the index of the smallest prefix that reaches every row's limit


def _propose(params, draft_params, state: Drafting, decode_table, active, sampling, key_data, *,
             proposer, sizes, greedy_only: bool) -> _Next:
  s, t = state.length.shape[0], proposer.tree_size
  live = active & ~state.done
  keys = jax.vmap(jax.random.wrap_key_data)(key_data)
  # keyed by each request's own progress: a request samples what it would alone
  step_keys = jax.vmap(jax.random.fold_in)(keys, state.num_generated)
  pages = jnp.where(live[:, None], decode_table, -1) if proposer.paged_layers else None
  ctx = Context(state.history, state.length, sampling,
                jax.vmap(lambda key: jax.random.fold_in(key, DRAFT_SALT))(step_keys), pages,
                greedy_only)
  pstate, draft = proposer.draft(Weights(draft_params, params), state.proposer, ctx)
  believed = proposer.max_depth if draft.limit is None else draft.limit
  limit = jnp.where(live & (state.primed | (not proposer.drafts_from_hidden)), believed, 0)
  draft = draft.replace(parents=jnp.broadcast_to(draft.parents, (s, t)), limit=limit)
  reach = jnp.asarray([d for _, d in sizes])
  return _Next(pstate, draft, step_keys, jnp.sum(reach < jnp.max(limit)))


def _verify(params, draft_params, k, v, state: Drafting, nxt: _Next, n: int, lane_tokens,
            lane_positions, lane_next, decode_table, chunk_table, active, sampling, eos_ids, *,
            cfg, proposer, rule, runtime: Runtime, greedy_only: bool = False):
  """One step: the target over the first `n` nodes of every live row's tree and the lanes (the
  prompt token after each: `lane_next`), its verdict, the accepted path's K/V committed;
  (k, v, state, emitted (S, T), counts (S,))."""
  s, t = nxt.draft.tokens.shape
  live = active & ~state.done
  d = nxt.draft
  draft = d.replace(tokens=d.tokens[:, :n], parents=d.parents[:, :n],
                    q=None if d.q is None else d.q[:, :n])
  depth = jnp.sum(ancestor_matrix(draft.parents), axis=-1, dtype=jnp.int32) - 1
  end = decode_table.shape[1] * k[0].shape[2]  # out of range: nothing written
  tree_pos = jnp.where(live[:, None], state.length[:, None] + depth, end)
  tokens = jnp.concatenate([draft.tokens.reshape(-1), lane_tokens])
  positions = jnp.concatenate([tree_pos.reshape(-1), lane_positions])
  cache = MixedPagedKVCache(k, v, decode_table, chunk_table, state.length,
                            pack_ancestors(draft.parents))
  hidden, cache = M.forward(params, tokens[None], positions[None], cfg, cache, kv_source="cache",
                            runtime=runtime)
  weights, pstate = Weights(draft_params, params), nxt.proposer
  if proposer.layers_read_hidden:
    pstate = _lanes(weights, pstate, lane_tokens, hidden[0, s * n:], lane_next, lane_positions,
                    chunk_table, proposer=proposer)
  hidden = hidden[0, :s * n].reshape(s, n, -1)
  logits = M.logits(params, hidden, runtime)  # (S, n, V)
  verdict = judge(logits, draft, draft.parents, sampling, nxt.keys, rule, greedy_only, runtime)
  n_acc = jnp.where(live, verdict.num_accepted, 0)
  k_new, v_new = cache.k, cache.v
  if not proposer.is_chain:  # the accepted path's K/V to consecutive positions
    k_new = commit_path(k_new, decode_table, state.length, verdict.path, n_acc)
    v_new = commit_path(v_new, decode_table, state.length, verdict.path, n_acc)
  # the rows' bookkeeping whole on each device: split as the kernels split rows, its counters
  # were sums across devices accumulated in the steps' loops, which libtpu's compiler crashed on
  emitted, n_emit, hist, length, done, num_generated, verified = runtime.replicated(partial(
      _account, n=n))(state.replace(proposer=()), draft, verdict, eos_ids, live)
  pstate = proposer.observe(weights, pstate, Verified(
      draft.tokens, hidden, logits, verdict.path, n_acc, verdict.next_token, state.length, live))
  state = Drafting(hist, length, num_generated, state.max_new, done, state.primed | live,
                   verified, pstate)
  return k_new, v_new, state, jnp.pad(emitted, ((0, 0), (0, t - n))), n_emit


def _account(state: Drafting, draft: Draft, verdict, eos_ids, live, *, n: int):
  """`emit`'s outputs, the rows' generated counts and the tree nodes verified so far after a
  step that verified `n` nodes of each live row's tree."""
  emitted, n_emit, hist, length, done = emit(state, draft, verdict, eos_ids, live)
  return (emitted, n_emit, hist, length, done, state.num_generated + n_emit,
          state.verified + n * jnp.sum(live, dtype=jnp.int32))


def steps(params, draft_params, k, v, state: Drafting, decode_table, active, sampling, key_data,
          eos_ids, num_steps, waiting, *, max_steps, cfg, proposer, rule, runtime: Runtime,
          greedy_only: bool = False):
  """Up to `num_steps` (<= max_steps) verification steps with no lanes in one dispatch, every
  live slot (`active` and not done) verifying a draft tree, as much of it as any row's
  `Draft.limit` reaches (`prefixes`). With requests `waiting` for a slot it ends after the first
  step in which an active row ends, and runs none when one had already ended: the host learns of
  a row's end a dispatch late, and its slot should be refilled rather than left idle for a whole
  dispatch (with none waiting, only when no row is live). Returns (k, v, state, emitted
  (max_steps, S, T), counts (max_steps, S)); steps not run emit nothing.

  Each prefix runs in a loop of its own, for as long as the next step needs that prefix: the
  pools are updated in place in loops, where a conditional's branches would copy them.
  greedy_only: every slot is known to be greedy (the engine compiles its steps for runs of
  greedy requests apart, without the sampling machinery: `sampling.jit_variants`)."""
  s, t = decode_table.shape[0], proposer.tree_size
  no_lanes = jnp.zeros((0,), jnp.int32)
  no_chunks = jnp.zeros((0, decode_table.shape[1]), jnp.int32)
  sizes = prefixes(proposer)
  propose = partial(_propose, params, draft_params, decode_table=decode_table, active=active,
                    sampling=sampling, key_data=key_data, proposer=proposer, sizes=sizes,
                    greedy_only=greedy_only)

  def go(c):
    i, _, _, st, _, _, _ = c
    return (i < num_steps) & jnp.any(active & ~st.done) & ~(waiting & jnp.any(active & st.done))

  def width(j, n):
    def body(c):
      i, k, v, st, nxt, out, counts = c
      k, v, st, emitted, count = _verify(
          params, draft_params, k, v, st, nxt, n, no_lanes, no_lanes, no_lanes, decode_table,
          no_chunks, active, sampling, eos_ids, cfg=cfg, proposer=proposer, rule=rule,
          runtime=runtime, greedy_only=greedy_only)
      st = whole(st, runtime)
      return i + 1, k, v, st, propose(st), out.at[i].set(emitted), counts.at[i].set(count)
    return lambda c: jax.lax.while_loop(lambda c: go(c) & (c[4].width == j), body, c)

  def body(c):
    for j, (n, _) in enumerate(sizes):
      c = width(j, n)(c)
    return c

  init = (0, k, v, state, propose(state), jnp.zeros((max_steps, s, t), jnp.int32),
          jnp.zeros((max_steps, s), jnp.int32))
  _, k, v, state, _, out, counts = jax.lax.while_loop(go, body, init)
  # (the loop's carry may leave split as a kernel split rows: the next dispatch expects it whole)
  return k, v, whole(state, runtime), out, counts


def step(params, draft_params, k, v, state: Drafting, lane_tokens, lane_positions, lane_next,
         decode_table, chunk_table, active, sampling: SamplingParams, key_data, eos_ids, *, cfg,
         proposer, rule, runtime: Runtime, greedy_only: bool = False):
  """One mixed step: every live slot (`active` and not done) verifies its whole draft tree
  (rows' limits cut what is tried, not what is computed: a step that prefills is rare, and one
  form of it keeps its tracing and its temporaries small); lanes of prompt tokens are prefilled
  beside (`lane_next`: the prompt token after each). Returns (k, v, state, emitted (1, S, T),
  counts (1, S)): one step of what `steps` returns; greedy_only as in `steps`."""
  if not proposer.layers_read_hidden:  # the lanes first: a row may draft over them
    state = state.replace(proposer=_lanes(
        Weights(draft_params, params), state.proposer, lane_tokens, None, lane_next,
        lane_positions, chunk_table, proposer=proposer))
  nxt = _propose(params, draft_params, state, decode_table, active, sampling, key_data,
                 proposer=proposer, sizes=prefixes(proposer)[-1:], greedy_only=greedy_only)
  k, v, state, emitted, count = _verify(
      params, draft_params, k, v, state, nxt, proposer.tree_size, lane_tokens, lane_positions,
      lane_next, decode_table, chunk_table, active, sampling, eos_ids, cfg=cfg,
      proposer=proposer, rule=rule, runtime=runtime, greedy_only=greedy_only)
  return k, v, whole(state, runtime), emitted[None], count[None]
