"""Hydra heads (jaxinfer.draft_heads.hydra_serve), with or without Hydra++'s prefix layer,
drafting a static tree whose nodes' children depend on their branch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads.hydra_serve import head_logits, prefix_forward
from jaxinfer.draft_heads.medusa_serve import tree_parents
from jaxinfer.quant import weight
from jaxinfer.runtime import Runtime
from jaxinfer.speculative.proposers.common import HeadsTree, root_only
from jaxinfer.speculative.proposers.pending import (EagleState, attach, detach, engine_rows, fed,
                                                    feed_pending, observe_path, paged_state,
                                                    pending_path, pending_width, prefill_pending,
                                                    write_lanes)
from jaxinfer.speculative.protocol import Context, Draft, Weights


@dataclasses.dataclass(frozen=True)
class Hydra(HeadsTree):
  """Hydra heads draft the static tree level by level: the children of a node at depth d are the
  top candidates of head d given the hidden state and the tokens on the node's path, so each
  node's children depend on its branch.

  With Hydra++'s prefix layer (`prefix`: its one-layer config), the state is the layer's KV
  cache and the target's hidden states on the last accepted path, still to be fed to it (an
  `EagleState`, as the EAGLE draft keeps its pairs); the heads read the layer's output at the
  last accepted token. Without it, the state is the target's hidden state there (B, D).
  `runtime`: the target's (the engine gives it, `Proposer.attend_as`): the prefix layer
  attends its cache as the target attends. In the engine the prefix layer's K/V live in the
  engine's page layout."""

  paths: tuple[tuple[int, ...], ...]
  name: str = "hydra"
  prefix: ModelConfig | None = None
  accuracy: tuple[tuple[float, ...], ...] | None = None
  runtime: Runtime = Runtime()

  @property
  def paged_layers(self) -> bool:
    return self.prefix is not None

  def init_pages(self, weights, cfg, num_rows, num_pages, page_size):
    return paged_state(self.prefix, num_rows, num_pages, page_size, pending_width(self),
                       cfg.embed, weights.draft.prefix_norm.dtype)

  def lanes(self, weights, state, tokens, hidden, next_tokens, positions, pages):
    del tokens  # (its layer reads the target's hidden states alone)
    return write_lanes(self._layer(weights), state, hidden, next_tokens, positions, pages)

  def _layer(self, weights):
    """forward(hidden states, tokens (unread), positions, cache) of the prefix layer."""
    heads, base = weights
    return lambda f, x, pos, cache: prefix_forward(heads, base, f, pos, self.prefix, cache,
                                                   kv_source="cache",
                                                   runtime=self.draft_runtime)

  def validate(self, cfg, draft_params) -> None:
    super().validate(cfg, draft_params)
    if (self.prefix is None) != (draft_params.prefix is None):
      raise ValueError("speculative decoding: Hydra heads with a prefix layer need "
                       "Hydra(prefix=prefix_config(cfg)), and only they")

  def row_state(self, weights, state, prompt):
    if self.prefix is None:
      return super().row_state(weights, state, prompt)
    if prompt.hidden is None:  # the engine's admission: its lanes wrote the prompt's states
      return engine_rows(state, prompt.prompt_len)
    return self.prefill(weights, prompt.hidden, prompt.prompt_len, prompt.max_len)

  def observe(self, weights, state, verified):
    if self.prefix is None:
      return super().observe(weights, state, verified)
    return observe_path(state, verified)

  def prefill(self, heads_and_base, features, prompt_len, max_len):
    """Prefix layer: its cache over the prompt's hidden states but the last, left pending."""
    heads, base = heads_and_base
    return prefill_pending(lambda f, pos, c: prefix_forward(
        heads, base, f, pos, self.prefix, c, kv_source="chunk", runtime=self.draft_runtime),
        self.prefix, features, prompt_len, jnp.zeros_like(prompt_len), max_len,
        pending_width(self), heads.prefix_norm.dtype)

  def update_prefix(self, st: EagleState, verify_hidden, tokens, path, num_accepted,
                    next_token, length, live):
    return pending_path(st, verify_hidden, tokens, path, num_accepted, next_token,
                                length, live)

  def heads_input(self, heads_and_base, state):
    """(what the heads read at the last accepted token (B, D), the state after reading it)."""
    if self.prefix is None:
      return state, state
    out, cache = feed_pending(self._layer(heads_and_base), state)
    return out, state.replace(cache=cache)

  def flush(self, weights, state, pages):
    if self.prefix is None:
      return state
    return fed(self._layer(weights), state, pages)

  def propose(self, heads_and_base, state, ctx: Context):
    """`draft` with weights (heads, base)."""
    return self.draft(Weights(*heads_and_base), state, ctx)

  def draft(self, weights, state, ctx: Context):
    heads, embed = weights.draft, weight(weights.target.embed)
    hidden, state = self.heads_input(weights, attach(state, ctx.pages))
    state = detach(state, ctx.pages)
    index = {(): 0}
    for i, p in enumerate(sorted(self.paths, key=lambda p: (len(p), p)), start=1):
      index[p] = i
    nodes = [root_only(ctx)]  # tokens by node index (breadth-first)
    for depth in range(1, self.max_depth + 1):
      level = [p for p in index if len(p) == depth]  # already breadth-first sorted
      parents = sorted({p[:-1] for p in level}, key=lambda p: index[p])
      top = 1 + max(p[-1] for p in level)
      # each parent's path (root first) as node indices -> token embeddings (B, n, depth, D)
      chains = np.array([[index[q[:j]] for j in range(depth)] for q in parents])
      toks = jnp.stack(nodes, axis=1)[:, chains]  # (B, n, depth)
      lg = head_logits(heads, depth - 1, jnp.broadcast_to(
          hidden[:, None], (hidden.shape[0], len(parents), hidden.shape[-1])),
          jnp.take(embed, toks, axis=0))
      cand = jax.lax.top_k(lg, top)[1].astype(jnp.int32)  # (B, n, top): distinct per node
      slot = {q: i for i, q in enumerate(parents)}
      picked = cand[:, np.array([slot[p[:-1]] for p in level]), np.array([p[-1] for p in level])]
      nodes.extend(picked[:, i] for i in range(len(level)))
    ordered = sorted(self.paths, key=lambda p: (len(p), p))
    return state, Draft(jnp.stack(nodes, axis=1), jnp.asarray(tree_parents(ordered)), None)
