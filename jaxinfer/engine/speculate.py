"""Speculative decoding inside the engine: each slot's decode row is a draft tree of T tokens,
verified in the engine's mixed step beside the prompt lanes (SARATHI with trees), over the
engine's one page pool (shared prompt pages read by reference, never copied).

S slots, T tree nodes, L positions per sequence (its pages), G lanes of Q prompt tokens.
A row accepts a varying number of drafts per step, so its length, its tokens by position (what
a lookup proposer reads) and its output count live on the device (`Drafting`); the host admits
prompts into slots, lays out lanes and page tables and reads back what each step emitted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import model as M
from jaxinfer.kv_cache import MixedPagedKVCache, commit_path
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams
from jaxinfer.speculative.protocol import Context, Prompt, Verified, Weights, put_rows
from jaxinfer.speculative.steps import _DRAFT_SALT, emit, judge
from pallas_kernels.tree_attention import ancestor_matrix, pack_ancestors


@struct.dataclass
class Drafting:
  """The device side of speculation in S slots."""

  history: jax.Array  # (S, L) tokens by position; the root (last committed token) at `length`
  length: jax.Array  # (S,) the root's position (tokens before it are in the cache)
  num_generated: jax.Array  # (S,)
  max_new: jax.Array  # (S,)
  done: jax.Array  # (S,) the row ended (EOS or its budget): it writes and emits nothing more
  proposer: Any  # the proposer's state (one row per slot, or one shared value)


def whole(state: Drafting, runtime: Runtime) -> Drafting:
  """The state whole on each of the replica's devices (one layout from step to step)."""
  return jax.tree_util.tree_map(lambda x: runtime.constrain(x, (None,) * x.ndim), state)


def init_drafting(cfg, proposer, num_slots: int, max_len: int, shared, *,
                  runtime: Runtime) -> Drafting:
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  return whole(Drafting(zeros(num_slots, max_len), zeros(num_slots), zeros(num_slots),
                        zeros(num_slots), jnp.ones((num_slots,), bool),
                        proposer.init_state(Weights(None, None), cfg, num_slots, max_len,
                                            shared)), runtime)


def admit(state: Drafting, slots, prompts, prompt_len, generated, max_new, *, proposer,
          runtime: Runtime) -> Drafting:
  """Rows start in `slots` (k,) (past the end: padding): their tokens so far (k, W) by
  position, of which the last `generated` are output (a row that decoded plainly until now),
  the root at the last (its K/V are written by the row's first verification)."""
  k, w = prompts.shape
  hist = jnp.pad(prompts, ((0, 0), (0, state.history.shape[1] - w)))
  prompt = Prompt(None, None, prompts, prompt_len, jnp.zeros((k,), jnp.int32), slots,
                  max_len=state.history.shape[1])
  put = lambda old, new: put_rows(old, new, slots)
  return whole(Drafting(put(state.history, hist), put(state.length, prompt_len - 1),
                        put(state.num_generated, generated),
                        put(state.max_new, max_new), put(state.done, jnp.zeros((k,), bool)),
                        proposer.admit(Weights(None, None), state.proposer, prompt)), runtime)


def step(params, k, v, state: Drafting, lane_tokens, lane_positions, decode_table, chunk_table,
         active, sampling: SamplingParams, key_data, eos_ids, *, cfg, proposer, rule,
         runtime: Runtime):
  """One mixed step: every live slot (`active` and not done) verifies a draft tree; lanes of
  prompt tokens are prefilled beside. Returns (k, v, state, emitted (S, T), counts (S,))."""
  s, t = decode_table.shape[0], proposer.tree_size
  live = active & ~state.done
  keys = jax.vmap(jax.random.wrap_key_data)(key_data)
  # keyed by each request's own progress, as the speculative generator keys its rows
  step_keys = jax.vmap(jax.random.fold_in)(keys, state.num_generated)
  ctx = Context(state.history, state.length, sampling,
                jax.vmap(lambda key: jax.random.fold_in(key, _DRAFT_SALT))(step_keys))
  weights = Weights(None, params)
  pstate, draft = proposer.draft(weights, state.proposer, ctx)
  parents = jnp.broadcast_to(draft.parents, (s, t))
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1
  end = decode_table.shape[1] * k[0].shape[2]  # out of range: nothing written
  tree_pos = jnp.where(live[:, None], state.length[:, None] + depth, end)
  tokens = jnp.concatenate([draft.tokens.reshape(-1), lane_tokens])
  positions = jnp.concatenate([tree_pos.reshape(-1), lane_positions])
  cache = MixedPagedKVCache(k, v, decode_table, chunk_table, state.length,
                            pack_ancestors(parents))
  hidden, cache = M.forward(params, tokens[None], positions[None], cfg, cache, kv_source="cache",
                            runtime=runtime)
  hidden = hidden[0, :s * t].reshape(s, t, -1)
  logits = M.logits(params, hidden)  # (S, T, V)
  verdict = judge(logits, draft, parents, sampling, step_keys, rule)
  n_acc = jnp.where(live, verdict.num_accepted, 0)
  k_new, v_new = cache.k, cache.v
  if not proposer.is_chain:  # the accepted path's K/V to consecutive positions
    k_new = commit_path(k_new, decode_table, state.length, verdict.path, n_acc)
    v_new = commit_path(v_new, decode_table, state.length, verdict.path, n_acc)
  emitted, n_emit, _, hist, length, done = emit(state, draft, verdict, eos_ids, live)
  pstate = proposer.observe(weights, pstate, Verified(
      draft.tokens, hidden, logits, verdict.path, n_acc, verdict.next_token, state.length, live))
  state = whole(Drafting(hist, length, state.num_generated + n_emit, state.max_new, done,
                         pstate), runtime)
  return k_new, v_new, state, emitted, n_emit


def steps(params, k, v, state: Drafting, decode_table, active, sampling, key_data, eos_ids,
          num_steps, waiting, *, max_steps, cfg, proposer, rule, runtime: Runtime):
  """Up to `num_steps` (<= max_steps) verification steps with no lanes in one dispatch. With
  requests `waiting` for a slot it ends after the first step in which an active row ends, and
  runs none when one had already ended: the host learns of a row's end a dispatch late, and its
  slot should be refilled rather than left idle for a whole dispatch (with none waiting, only
  when no row is live). Returns (k, v, state, emitted (max_steps, S, T), counts (max_steps, S));
  steps not run emit nothing."""
  s, t = decode_table.shape[0], proposer.tree_size
  no_lanes = jnp.zeros((0,), jnp.int32)
  no_chunks = jnp.zeros((0, decode_table.shape[1]), jnp.int32)

  def cond(c):
    i, _, _, st, _, _ = c
    return (i < num_steps) & jnp.any(active & ~st.done) & ~(waiting & jnp.any(active & st.done))

  def body(c):
    i, k, v, st, out, counts = c
    k, v, st, emitted, n = step(params, k, v, st, no_lanes, no_lanes, decode_table, no_chunks,
                                active, sampling, key_data, eos_ids, cfg=cfg, proposer=proposer,
                                rule=rule, runtime=runtime)
    return i + 1, k, v, st, out.at[i].set(emitted), counts.at[i].set(n)

  init = (0, k, v, state, jnp.zeros((max_steps, s, t), jnp.int32),
          jnp.zeros((max_steps, s), jnp.int32))
  _, k, v, state, out, counts = jax.lax.while_loop(cond, body, init)
  return k, v, state, out, counts
