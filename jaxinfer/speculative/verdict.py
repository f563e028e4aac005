"""A verification's outcome, for the engine's tree steps (`jaxinfer.engine.speculate`): the
acceptance rule's verdict on each row's draft tree given the target's logits (`judge`), and the
tokens it emits, cut at EOS and at the budget (`emit`).

B rows, T tree nodes, V vocabulary. Keys: a step's draft and verification randomness are
folded from the row's step key with their own salts, so neither reuses the other's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams, argmax, distribution
from jaxinfer.speculative import acceptance
from pallas_kernels.tree_attention import ancestor_matrix

DRAFT_SALT, VERIFY_SALT = 1 << 20, 1 << 21


def tried(parents, limit):
  """parents (B,T) with the nodes deeper than each row's `limit` (B,) cut off (parent -1: never
  tried); None: every node."""
  if limit is None:
    return parents
  depth = jnp.sum(ancestor_matrix(parents), axis=-1, dtype=jnp.int32) - 1
  return jnp.where(depth > limit[:, None], -1, parents)


def judge(logits, draft, parents, sampling: SamplingParams, step_keys, rule: str,
          greedy_only: bool = False, runtime: Runtime = Runtime()):
  """The acceptance rule's verdict on each row's tree given the target's logits (B,T,V); nodes
  deeper than the draft's `limit` are not tried. greedy_only: every row is known to be greedy
  (compiled without the sampling filters of sampled acceptance); otherwise the device checks.
  runtime: on a mesh, the tree walk runs whole on every device (`Runtime.replicated`): split as
  the kernels split rows, each of its gathers was a sum across devices inside its loop; split
  over the vocabulary, sampled acceptance's sort and scatter moved index arrays of B*T*V between
  devices (Llama-3-8B on --mesh=model:4 under the Pallas kernels: a verification step's
  collectives 443 MiB, 88 MiB now)."""
  greedy = sampling.temperature <= 0
  parents = tried(parents, draft.limit)
  verify_keys = jax.vmap(lambda k: jax.random.fold_in(k, VERIFY_SALT))(step_keys)

  def sampled(_):  # the full rule on distributions (greedy rows among them follow the argmax)
    def walk(logits, draft, parents, sampling, keys):
      p = distribution(logits, sampling)  # (B,T,V)
      return acceptance.verify(keys, p, draft.tokens, parents, draft.q,
                               greedy=sampling.temperature <= 0, rule=rule)
    return runtime.replicated(walk)(logits, draft, parents, sampling, verify_keys)

  def all_greedy(_):
    if rule == acceptance.TYPICAL:
      return sampled(None)
    return runtime.replicated(acceptance.verify_greedy)(draft.tokens, parents, argmax(logits))

  if greedy_only:
    return all_greedy(None)
  return jax.lax.cond(jnp.all(greedy), all_greedy, sampled, None)


def emit(state, draft, verdict, eos_ids, live):
  """(emitted (B,T), tokens emitted per row, history, length, done) after a verification: the
  accepted drafts, then the next token, cut at EOS and at the budget (the first `n_emit` of
  `emitted` are real). `state` has the rows' history, length, num_generated, max_new and
  done."""
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
  return emitted, n_emit, hist, new_length, done
