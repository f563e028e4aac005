"""Medusa heads (jaxinfer.draft_heads.medusa_serve) drafting a static tree from the target's
hidden state at the last accepted token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.draft_heads.medusa_serve import head_logits, tree_parents
from jaxinfer.speculative.proposers.common import HeadsTree, root_only
from jaxinfer.speculative.protocol import Context, Draft


@dataclasses.dataclass(frozen=True)
class Medusa(HeadsTree):
  """Node (r_1, ..., r_d) takes the r_d-th ranked candidate of head d-1, the same for every
  branch."""

  paths: tuple[tuple[int, ...], ...]
  name: str = "medusa"
  accuracy: tuple[tuple[float, ...], ...] | None = None

  def draft(self, weights, hidden, ctx: Context):
    top = 1 + max(max(p) for p in self.paths)
    logits = head_logits(weights.draft, hidden)[:self.max_depth]  # (K, B, V)
    cand = jax.lax.top_k(logits, top)[1].astype(jnp.int32)  # (K, B, top): distinct per head
    # One gather for all nodes (per-node slices get the heads' computation duplicated by XLA).
    depth = np.array([len(p) - 1 for p in self.paths])
    rank = np.array([p[-1] for p in self.paths])
    drafts = cand[depth, :, rank].T  # (B, T - 1)
    tokens = jnp.concatenate([root_only(ctx)[:, None], drafts], axis=1)
    return hidden, Draft(tokens, jnp.asarray(tree_parents(list(self.paths))), None)
