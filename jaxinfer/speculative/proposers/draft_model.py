"""A draft model: a separate small model with its own KV cache drafts a chain autoregressively
(sampled from its filtered distribution for sampling rows, greedily for greedy rows). The same
class is SWIFT-style self-speculation when the draft is the target with layers skipped
(`layer_skip_draft`).

In the engine the draft's K/V live in the engine's page layout (`Proposer.paged_layers`): the
prefill lanes write the prompt's (so a prompt page shared by reference carries them too), the
plain engine's steps write theirs, drafting reads and writes through the rows' page tables. Its
own prefill over a prompt (`prefill`, a cache by row) is the reference that layout is held
against."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache, PagePools
from jaxinfer.runtime import Runtime
from jaxinfer.speculative.proposers.common import (Chain, chain_parents, draw, filtered,
                                                    root_only)
from jaxinfer.speculative.proposers.pending import attach, detach
from jaxinfer.speculative.protocol import Context, Draft


@struct.dataclass
class DraftState:
  """The draft's cache (by row, or its pools in the engine) holds the K/V of every position
  before each row's root but maybe the last accepted draft's: drafting feeds a chain's tokens
  but the last (and with the fallback, none past where every row fell back), so that token is
  pending at `position` (-1: none), fed before the root."""

  cache: KVCache | PagePools
  token: jax.Array  # (B,)
  position: jax.Array  # (B,)

  @classmethod
  def of(cls, cache, rows: int) -> "DraftState":
    """`rows` rows over `cache`, nothing pending."""
    return cls(cache, jnp.zeros((rows,), jnp.int32), jnp.full((rows,), -1, jnp.int32))


@dataclasses.dataclass(frozen=True)
class DraftModel(Chain):
  """A chain of `num_draft_tokens` from a small model sharing the target's vocabulary.

  `fallback` > 0 is Big-Little's fallback policy: a row stops drafting after the first draft
  the draft model was less than `fallback` sure of (its softmax maximum), handing the rest of the
  step to the target: its `Draft.limit` is the drafts it drew, so the step verifies only as deep
  as the rows' drafts reach; once every row has stopped, no more draft steps run. Unused chain
  slots hold token 0 drawn from a point mass. `runtime`: the target's (the engine gives it,
  `Proposer.attend_as`): the draft attends as the target and takes its logits as the target's.
  `keep`: layer skip's layers of the target (`layer_skip_draft`), whose weights the draft takes
  from the target's as placed (`draft_from_target`)."""

  cfg: ModelConfig
  num_draft_tokens: int = 4
  name: str = "draft"
  fallback: float = 0.0
  runtime: Runtime = Runtime()
  keep: tuple[int, ...] | None = None
  needs_draft_params = True
  paged_layers = True
  layers_read_hidden = False

  def validate(self, cfg, draft_params) -> None:
    super().validate(cfg, draft_params)
    if self.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative decoding: the draft's vocabulary ({self.cfg.vocab_size})"
                       f" differs from the target's ({cfg.vocab_size})")

  def draft_from_target(self, params):
    return None if self.keep is None else _kept_layers(params, self.keep)

  def init_pages(self, weights, cfg, num_rows, num_pages, page_size):
    return DraftState.of(PagePools.init(self.cfg, num_pages, page_size), num_rows)

  def lanes(self, weights, state, tokens, hidden, next_tokens, positions, pages):
    del hidden, next_tokens
    return state.replace(cache=self._through(weights.draft, state.cache, tokens, positions,
                                             pages))

  def _through(self, params, pools: PagePools, tokens, positions, table) -> PagePools:
    """The pools with the draft's K/V over tokens (B, W) at `positions` (negative or past the
    table: nothing) written through `table` (B, M)."""
    cache = pools.over(table)
    positions = jnp.where(positions >= 0, positions, cache.max_len)
    _, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                         runtime=self.draft_runtime)
    return PagePools.of(cache)

  def row_state(self, weights, state, prompt):
    """Its cache over each row's prompt; in the engine, written by the prompt's lanes (and the
    plain steps of a row that decoded plainly before), or now through `prompt.pages` over the
    row's tokens so far: nothing pending."""
    if prompt.hidden is not None:
      return self.prefill(weights.draft, prompt.history, prompt.prompt_len, prompt.max_len)
    cache = state.cache
    if prompt.pages is not None:
      cache = self._through(weights.draft, cache, prompt.history,
                            _before_root(prompt.history, prompt.prompt_len, -1), prompt.pages)
    return DraftState.of(cache, prompt.prompt_len.shape[0])

  def prefill(self, params, tokens, prompt_len, max_len) -> DraftState:
    """The draft's own cache over the prompts, tokens (B, W) by position, in a fresh cache. The
    prompt's last token (the root, fed later) and padding past it are not written."""
    b, t = tokens.shape[0], int(max_len)
    _, cache = M.forward(params, tokens, _before_root(tokens, prompt_len, t), self.cfg,
                         KVCache.init(self.cfg, b, t), kv_source="chunk",
                         runtime=self.draft_runtime)
    return DraftState.of(cache, b)

  def draft(self, weights, st: DraftState, ctx: Context):
    params, g = weights.draft, self.num_draft_tokens
    length, st = ctx.length, attach(st, ctx.pages)
    cache = st.cache
    # Catch up: feed the pending token, if any, and the root; then draft g tokens one at a time.
    root = root_only(ctx)
    tokens = jnp.stack([st.token, root], 1)
    positions = jnp.stack([jnp.where(st.position >= 0, st.position, cache.max_len), length], 1)
    if self.fallback > 0:
      cache, draft = self._draft_with_fallback(params, cache, ctx, tokens, positions)
      return detach(st.replace(cache=cache), ctx.pages), draft
    drafted, qs = [root], []
    for i in range(g):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                runtime=self.draft_runtime)
      logits = M.logits(params, hidden[:, -1], self.runtime)
      q = filtered(logits, ctx, self.runtime)
      tok = draw(q, ctx, i)
      drafted.append(tok)
      qs.append(q)
      tokens, positions = tok[:, None], (length + i + 1)[:, None]
    qs.append(qs[-1])  # the last node has no children
    return detach(st.replace(cache=cache), ctx.pages), Draft(
        jnp.stack(drafted, 1), jnp.asarray(chain_parents(g + 1)), jnp.stack(qs, 1))

  def _draft_with_fallback(self, params, cache, ctx: Context, tokens, positions):
    """The chain drafted in a loop that ends when every row has fallen back."""
    g, length, b = self.num_draft_tokens, ctx.length, ctx.length.shape[0]

    def step(i, tokens, positions, cache, live):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                runtime=self.draft_runtime)
      logits = M.logits(params, hidden[:, -1], self.runtime)
      q = filtered(logits, ctx, self.runtime)
      tok = jnp.where(live, draw(q, ctx, i), 0)
      q = jnp.where(live[:, None], q, jax.nn.one_hot(0, q.shape[-1], dtype=q.dtype))
      sure = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= self.fallback
      return tok, q, cache, live & sure

    tok, q, cache, live = step(0, tokens, positions, cache, jnp.ones((b,), bool))
    drafted = jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(root_only(ctx)).at[:, 1].set(tok)
    qs = jnp.broadcast_to(jax.nn.one_hot(0, q.shape[-1], dtype=q.dtype)[None, None],
                          (b, g + 1, q.shape[-1])).at[:, 0].set(q)

    def body(c):
      i, live, count, cache, drafted, qs = c
      tok, q, cache, now = step(i, drafted[:, i, None], (length + i)[:, None], cache, live)
      return (i + 1, now, count + live, cache, drafted.at[:, i + 1].set(tok),
              qs.at[:, i].set(q))

    _, _, count, cache, drafted, qs = jax.lax.while_loop(
        lambda c: (c[0] < g) & jnp.any(c[1]), body,
        (1, live, jnp.ones((b,), jnp.int32), cache, drafted, qs))
    qs = qs.at[:, g].set(qs[:, g - 1])  # the last node has no children
    # a row is verified only as deep as it drafted (the draft's confidence decides, not the
    # verification's draw: exact)
    return cache, Draft(drafted, jnp.asarray(chain_parents(g + 1)), qs, count)

  def flush(self, weights, st: DraftState, pages):
    """Rows turning to plain steps (a table in `pages`) have their pending token fed."""
    turning = jnp.any(pages >= 0, axis=1)
    position = jnp.where(turning, st.position, -1)
    return st.replace(cache=self._through(weights.draft, st.cache, st.token[:, None],
                                          position[:, None], pages),
                      position=jnp.where(turning, -1, st.position))

  def observe(self, weights, st: DraftState, verified):
    """A live row that accepted drafts has its last accepted draft pending (fed again if
    drafting had fed it)."""
    last = jnp.take_along_axis(verified.tokens, verified.num_accepted[:, None], axis=1)[:, 0]
    pending = jnp.where(verified.num_accepted > 0, verified.length + verified.num_accepted, -1)
    return st.replace(token=jnp.where(verified.live, last, st.token),
                      position=jnp.where(verified.live, pending, st.position))


def _before_root(tokens, prompt_len, elsewhere: int):
  """Positions of tokens (B, W) by position, but each row's last (the root, fed later) and the
  padding past it: `elsewhere`."""
  pos = jnp.arange(tokens.shape[1])[None, :]
  return jnp.where(pos < prompt_len[:, None] - 1, pos, elsewhere)


def layer_skip_draft(cfg: ModelConfig, params: M.Transformer,
                     keep: tuple[int, ...]) -> tuple[ModelConfig, M.Transformer]:
  """SWIFT-style self-speculation: the target itself with only the layers in `keep`."""
  if not keep or any(not 0 <= i < cfg.num_layers for i in keep) or len(set(keep)) != len(keep):
    raise ValueError(f"layer skip: layers to keep must be distinct indices in "
                     f"[0, {cfg.num_layers}), got {keep}")
  return cfg.keep_layers(sorted(keep)), _kept_layers(params, sorted(keep))


def _kept_layers(params: M.Transformer, keep) -> M.Transformer:
  """The target's params with only the layers in `keep` (in order): the same arrays."""
  return params.replace(layers=tuple(params.layers[i] for i in keep))
