"""Lookahead: a trie of the continuations of each row's best earlier matches of its last
tokens, in its prompt and output (training-free, no state)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.speculative.proposers.common import root_only
from jaxinfer.speculative.protocol import Context, Draft, Proposer


@dataclasses.dataclass(frozen=True)
class Lookahead(Proposer):
  """Lookahead-style trie over each row's prompt and output (training-free; a tree per row).

  Candidates: the `num_candidates` positions p whose preceding tokens best match the row's last
  tokens (longest match up to `max_ngram` first, then the latest). Each gives the continuation
  after it, up to `depth` known tokens. Merged, the continuations form a trie; a node's weight is
  the summed match length of the candidates through it, which never grows with depth, so the
  `num_nodes` heaviest nodes (ties: shallower first) are closed under taking parents. Siblings are
  distinct tokens (trie nodes), as the lossless rule for deterministic drafts needs. Unused
  slots hang as a chain below the deepest node (each an only child)."""

  num_nodes: int = 16
  depth: int = 6
  num_candidates: int = 16
  max_ngram: int = 4
  name: str = "lookahead"

  def __post_init__(self):
    if min(self.num_nodes, self.depth, self.num_candidates, self.max_ngram) < 1:
      raise ValueError(f"lookahead: sizes must be >= 1, got {self}")

  @property
  def tree_size(self) -> int:
    return self.num_nodes + 1

  @property
  def max_depth(self) -> int:
    # (the unused slots' chain reaches num_nodes deep, but a row tries no deeper than its
    # trie's nodes: `Draft.limit`)
    return min(self.num_nodes, self.depth)

  @property
  def is_chain(self) -> bool:
    return False  # (as deep as a chain could be, but a tree)

  def shrink(self):
    n = self.num_nodes // 2
    return None if n < 1 else dataclasses.replace(self, num_nodes=n, depth=min(self.depth, n))

  def propose(self, state, ctx: Context):
    """`draft` (the trie reads no weights)."""
    return self.draft(None, state, ctx)

  def draft(self, weights, state, ctx: Context):
    hist, length = ctx.history, ctx.length
    b, s = hist.shape
    m, dd, n_nodes = min(self.num_candidates, s), self.depth, self.num_nodes
    pos = jnp.arange(s)[None, :]
    # score[b, p]: how many tokens ending at p equal the row's last tokens (p < root position)
    score = jnp.zeros((b, s), jnp.int32)
    alive = pos < length[:, None]
    for i in range(self.max_ngram):
      last = jnp.take_along_axis(hist, jnp.maximum(length - i, 0)[:, None], axis=1)
      alive &= (jnp.roll(hist, i, axis=1) == last) & (pos >= i) & (length[:, None] >= i)
      score += alive.astype(jnp.int32)
    key = jnp.where(score > 0, score * s + pos, -1)
    top, cand = jax.lax.top_k(key, m)  # (B, M) best matches, longest then latest
    weight = jnp.where(top >= 0, top // s, 0)  # match length, 0 for no candidate
    idx = cand[:, :, None] + 1 + jnp.arange(dd)[None, None, :]  # (B, M, D) continuation
    valid = (weight[:, :, None] > 0) & (idx <= length[:, None, None])  # known tokens only
    cont = jnp.take_along_axis(hist, jnp.minimum(idx, s - 1).reshape(b, -1), axis=1).reshape(
        b, m, dd)
    # same[b, j, j', d]: candidates j and j' agree on their first d + 1 tokens (both valid)
    eq = (cont[:, :, None, :] == cont[:, None, :, :]) & valid[:, :, None, :] & valid[:, None]
    same = jnp.cumprod(eq.astype(jnp.int32), axis=-1).astype(bool)
    rep = jnp.argmax(same, axis=2)  # (B, M, D): first candidate with the same prefix
    node_w = jnp.sum(jnp.where(same, weight[:, None, :, None], 0), axis=2)  # (B, M, D)
    canonical = valid & (rep == jnp.arange(m)[None, :, None])
    d_idx = jnp.arange(dd)[None, None, :]
    j_idx = jnp.arange(m)[None, :, None]
    rank = ((node_w * (dd + 1) + (dd - d_idx)) * m + (m - 1 - j_idx))
    rank = jnp.where(canonical, rank, -1).reshape(b, m * dd)
    k = min(n_nodes, m * dd)
    best, flat = jax.lax.top_k(rank, k)  # (B, k) the heaviest nodes
    used = best >= 0
    sel_j, sel_d = flat // dd, flat % dd
    # breadth-first order (depth, then weight rank); unused slots last
    order = jnp.argsort(jnp.where(used, sel_d * k + jnp.arange(k)[None], dd * k + 1), axis=1)
    sel_j, sel_d = (jnp.take_along_axis(a, order, axis=1) for a in (sel_j, sel_d))
    used = jnp.take_along_axis(used, order, axis=1)
    rows = jnp.arange(b)[:, None]
    tokens = cont[rows, sel_j, sel_d]
    # parent: the node of (rep[j, d - 1], d - 1) among the selected, or the root at depth 0
    par_j = rep[rows, sel_j, jnp.maximum(sel_d - 1, 0)]
    hit = ((sel_j[:, None, :] == par_j[:, :, None]) & (sel_d[:, None, :] == sel_d[:, :, None] - 1)
           & used[:, None, :])  # (B, k, k): slot i's parent is slot i'
    parents = jnp.where(sel_d == 0, 0, 1 + jnp.argmax(hit, axis=2))
    slot = jnp.arange(1, k + 1)[None]
    parents = jnp.where(used, parents, slot - 1)  # unused: a chain below the deepest node
    tokens = jnp.where(used, tokens, 0)
    if k < n_nodes:  # more nodes than the trie can hold: extend the chain
      extra = jnp.arange(k + 1, n_nodes + 1)[None]
      parents = jnp.concatenate([parents, jnp.broadcast_to(extra - 1, (b, n_nodes - k))], 1)
      tokens = jnp.concatenate([tokens, jnp.zeros((b, n_nodes - k), tokens.dtype)], 1)
    tokens = jnp.concatenate([root_only(ctx)[:, None], tokens.astype(jnp.int32)], axis=1)
    parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parents.astype(jnp.int32)], 1)
    # worth trying: the trie's nodes, not the unused chain (no candidate: the row decodes plainly)
    limit = jnp.max(jnp.where(used, sel_d + 1, 0), axis=1)
    return state, Draft(tokens, parents, None, limit)
