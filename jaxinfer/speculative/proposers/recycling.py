"""Token Recycling: an adjacency matrix (V, k) of each token's most likely successors, refreshed
from every verification's logits; the draft tree is a breadth-first expansion of it with a
static branching per depth. The matrix is one state shared by every row and carried from batch
to batch (`shared_state`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.speculative.proposers.common import root_only, tree_parents
from jaxinfer.speculative.protocol import Context, Draft, Proposer


@dataclasses.dataclass(frozen=True)
class Recycling(Proposer):
  branching: tuple[int, ...] = (4, 2, 1, 1)
  name: str = "recycling"
  shared_state = True

  @property
  def tree_size(self) -> int:
    return len(tree_parents(self.branching))

  @property
  def max_depth(self) -> int:
    return len(self.branching)

  def shrink(self):
    b = list(self.branching)
    if max(b) > 1:  # halve the widest level (the first of equals)
      i = b.index(max(b))
      b[i] //= 2
    elif len(b) > 1:  # a chain: half as deep
      b = b[:len(b) // 2]
    else:
      return None
    return dataclasses.replace(self, branching=tuple(b))

  def init_shared(self, cfg) -> jax.Array:
    return self.init_adjacency(cfg.vocab_size)

  def init_adjacency(self, vocab_size: int) -> jax.Array:
    k = max(self.branching)
    return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (vocab_size, k))

  def init_state(self, weights, cfg, num_rows, max_len, shared=None):
    return shared  # the adjacency so far (`init_shared` first)

  def admit(self, weights, state, prompt):
    return state  # (shared by every row)

  def draft(self, weights, adj, ctx: Context):
    # Level by level (tree_parents' breadth-first order): each node of a level has
    # branching[d] children, its top successors in order; one gather per level.
    level = root_only(ctx)[:, None]  # (B, 1)
    levels = [level]
    for k in self.branching:
      level = adj[level][:, :, :k].reshape(level.shape[0], -1)
      levels.append(level)
    return adj, Draft(jnp.concatenate(levels, axis=1), jnp.asarray(tree_parents(self.branching)),
                      None)

  def observe(self, weights, adj, verified):
    return self.update(adj, verified.tokens, verified.logits, verified.live)

  def update(self, adj, tokens, logits, live=None):
    """Each drafted token's successors := the target's top-k at its node, in the `live` rows
    (B,) only (None: all): an idle or finished slot's tree is verified over what it last held,
    and would overwrite live rows' successors with that."""
    k = adj.shape[1]  # (its width, shared by the smaller trees `shrink` makes)
    top = jax.lax.top_k(logits, k)[1].astype(jnp.int32)  # (B, T, k)
    if live is not None:
      tokens = jnp.where(live[:, None], tokens, adj.shape[0])  # (past the table: dropped)
    return adj.at[tokens.reshape(-1)].set(top.reshape(-1, k), mode="drop")
