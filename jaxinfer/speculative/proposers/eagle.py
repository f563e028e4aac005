"""An EAGLE draft layer (jaxinfer.draft_heads.eagle_serve) drafting a chain from the target's
features."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads.eagle_serve import draft_forward
from jaxinfer.runtime import Runtime
from jaxinfer.speculative.proposers.common import (Chain, chain_parents, draw, filtered,
                                                    root_only)
from jaxinfer.speculative.proposers.pending import (EagleState, attach, detach, engine_rows, fed,
                                                    feed_pending, observe_path, paged_state,
                                                    pending_width, prefill_pending, write_lanes)
from jaxinfer.speculative.protocol import Context, Draft, Weights


@dataclasses.dataclass(frozen=True)
class Eagle(Chain):
  """An EAGLE draft layer (its params an `EagleHeads`) drafting a chain: catch up on the pairs
  of the last accepted path, then feed its own predicted features back `num_draft_tokens` - 1
  times. Drafts are sampled from its filtered distribution for sampling rows (q returned, zero
  outside its draft vocabulary). `runtime`: the target's (the engine gives it,
  `Proposer.attend_as`): its layer attends as the target, its logits taken as the target's. In
  the engine its layer's K/V live in the engine's page layout; the pair at position p holds
  token p + 1."""

  cfg: ModelConfig  # the draft layer's (one layer)
  num_draft_tokens: int = 4
  name: str = "eagle"
  runtime: Runtime = Runtime()
  needs_draft_params = True
  drafts_from_hidden = True
  paged_layers = True
  feature_lookahead = 1

  def init_pages(self, weights, cfg, num_rows, num_pages, page_size):
    return paged_state(self.cfg, num_rows, num_pages, page_size, pending_width(self), cfg.embed,
                       weights.draft.draft.fc.dtype)

  def lanes(self, weights, state, tokens, hidden, next_tokens, positions, pages):
    del tokens  # (its pair at a position holds the token after it)
    return write_lanes(self._layer(weights), state, hidden, next_tokens, positions, pages)

  def _layer(self, weights):
    """forward(features, tokens, positions, cache) of the draft layer over its cache."""
    heads, base = weights
    return lambda f, x, pos, cache: draft_forward(
        heads.draft, base, f, x, pos, self.cfg, cache, kv_source="cache",
        runtime=self.draft_runtime)

  def row_state(self, weights, state, prompt):
    if prompt.hidden is None:  # the engine's admission: its lanes wrote the prompt's pairs
      return engine_rows(state, prompt.prompt_len)
    return self.prefill(weights, prompt.hidden, prompt.history, prompt.prompt_len, prompt.first,
                        prompt.max_len)

  def prefill(self, heads_and_base, features, history, prompt_len, first, max_len):
    """The draft's cache over the prompt's pairs (f_p, x_{p+1}), p < prompt_len - 1, from the
    target's `features` over the prompt; the pair (f_{n-1}, first token) is left pending."""
    heads, base = heads_and_base
    w = features.shape[1]
    nxt_pos = jnp.arange(w)[None, :] + 1
    nxt = jnp.take_along_axis(history, jnp.clip(nxt_pos, 0, history.shape[1] - 1), axis=1)
    return prefill_pending(lambda f, pos, c: draft_forward(
        heads.draft, base, f, nxt, pos, self.cfg, c, kv_source="chunk",
        runtime=self.draft_runtime), self.cfg, features,
        prompt_len, first, max_len, pending_width(self), heads.draft.fc.dtype)

  def catch_up(self, heads, base, st: EagleState):
    """Feeds the pending pairs into the draft's cache; returns the predicted feature after
    the last of them (it scores the root's children) and the cache."""
    return feed_pending(self._layer((heads, base)), st)

  def flush(self, weights, st: EagleState, pages):
    return fed(self._layer(weights), st, pages)

  def propose(self, heads_and_base, st: EagleState, ctx: Context):
    """`draft` with weights (heads, base)."""
    return self.draft(Weights(*heads_and_base), st, ctx)

  def draft(self, weights, st: EagleState, ctx: Context):
    heads, base = weights
    draft, vocab_size = heads.draft, base.embed.shape[0]
    st = attach(st, ctx.pages)
    feat, cache = self.catch_up(heads, base, st)
    drafted, qs = [root_only(ctx)], []
    for i in range(self.num_draft_tokens):
      # over the draft vocabulary
      q = filtered(heads.logits(base, feat, self.runtime), ctx, self.runtime)
      tok = heads.token_ids(draw(q, ctx, i))
      drafted.append(tok)
      qs.append(heads.full(q, vocab_size))
      if i + 1 < self.num_draft_tokens:
        hidden, cache = draft_forward(draft, base, feat[:, None], tok[:, None],
                                      (ctx.length + i)[:, None], self.cfg, cache,
                                      kv_source="cache", runtime=self.draft_runtime)
        feat = hidden[:, 0]
    qs.append(qs[-1])  # the last node has no children
    return detach(st.replace(cache=cache), ctx.pages), Draft(jnp.stack(drafted, 1),
                                          jnp.asarray(chain_parents(self.tree_size)),
                                          jnp.stack(qs, 1))

  def observe(self, weights, st: EagleState, verified):
    return observe_path(st, verified)
