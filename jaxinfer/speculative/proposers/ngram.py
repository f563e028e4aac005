"""Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens (n from
`max_ngram` down to 1) in prompt + output; a chain, no weights, no state. A row drafts only the
known continuation of a match (`Draft.limit`): none, and it decodes plainly."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxinfer.speculative.proposers.common import Chain, chain_parents, root_only
from jaxinfer.speculative.protocol import Context, Draft


@dataclasses.dataclass(frozen=True)
class NGram(Chain):
  num_draft_tokens: int = 4
  max_ngram: int = 3
  name: str = "ngram"

  def draft(self, weights, state, ctx: Context):
    hist, length = ctx.history, ctx.length
    b, s = hist.shape
    pos = jnp.arange(s)[None, :]
    best = jnp.full((b,), -1, jnp.int32)
    for n in range(self.max_ngram, 0, -1):  # longest match wins
      match = (pos >= n - 1) & (pos < length[:, None])  # an occurrence ending before the root
      for i in range(n):
        last = jnp.take_along_axis(hist, jnp.maximum(length - i, 0)[:, None], axis=1)
        shifted = jnp.roll(hist, i, axis=1)  # shifted[:, j] = hist[:, j - i]
        match &= shifted == last
      latest = jnp.max(jnp.where(match, pos, -1), axis=1)
      best = jnp.where((best < 0) & (latest >= 0) & (length >= n - 1), latest, best)
    start = jnp.where(best >= 0, best + 1, length)  # no match: propose the root repeated
    idx = start[:, None] + jnp.arange(self.num_draft_tokens)[None, :]
    idx = jnp.minimum(idx, length[:, None])  # only known tokens
    drafts = jnp.take_along_axis(hist, idx, axis=1)
    tokens = jnp.concatenate([root_only(ctx)[:, None], drafts], axis=1)
    # worth trying: the known continuation of a match; a row with none decodes plainly
    limit = jnp.where(best >= 0, jnp.minimum(length - best, self.num_draft_tokens), 0)
    return state, Draft(tokens, jnp.asarray(chain_parents(self.tree_size)), None, limit)
