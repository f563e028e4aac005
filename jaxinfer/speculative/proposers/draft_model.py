"""A draft model: a separate small model with its own KV cache drafts a chain autoregressively
(sampled from its filtered distribution for sampling rows, greedily for greedy rows). The same
class is SWIFT-style self-speculation when the draft is the target with layers skipped
(`layer_skip_draft`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache, PagePools
from jaxinfer.sampling import distribution
from jaxinfer.sparsity import DENSE, Sparsity
from jaxinfer.speculative.proposers.common import (Chain, attach_cache, chain_parents,
                                                   detach_cache, draw, root_only)
from jaxinfer.speculative.protocol import Context, Draft


@struct.dataclass
class DraftCache:
  """A draft model's K/V (a cache of its own, by row; in the engine, pools of the engine's page
  layout, `PagePools`) and, per row, the first position whose K/V may be missing: drafting
  feeds the token there and after it before drafting from the root."""

  cache: KVCache | PagePools
  written: jax.Array  # (B,)


@dataclasses.dataclass(frozen=True)
class DraftModel(Chain):
  """A chain of `num_draft_tokens` from a small model sharing the target's vocabulary.

  `fallback` > 0 is Big-Little's fallback policy: a row stops drafting after the first draft
  the draft model was less than `fallback` sure of (its softmax maximum), handing the rest of the
  step to the target; once every row has stopped, no more draft steps run. Unused chain slots
  hold token 0 drawn from a point mass (so the exact rule stays exact). `sparsity`: the draft's
  attention pattern (the speculative generator gives it the target's). In the engine its K/V
  live in the engine's page layout, written by the prefill lanes and the plain steps from the
  tokens they compute (a prompt page shared by reference carries them too)."""

  cfg: ModelConfig
  num_draft_tokens: int = 4
  name: str = "draft"
  fallback: float = 0.0
  sparsity: Sparsity = DENSE
  needs_draft_params = True
  paged_layers = True
  lanes_read_hidden = False

  def validate(self, cfg, draft_params) -> None:
    super().validate(cfg, draft_params)
    if self.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative decoding: the draft's vocabulary ({self.cfg.vocab_size})"
                       f" differs from the target's ({cfg.vocab_size})")

  def with_sparsity(self, sparsity):
    return dataclasses.replace(self, sparsity=sparsity)

  def _forward(self, params, tokens, positions, cache):
    """The draft over `tokens` at `positions` (out of range: nothing written) through `cache`."""
    return M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                     runtime=self.draft_runtime)

  def init_pages(self, weights, cfg, num_rows, num_pages, page_size):
    return DraftCache(PagePools.init(self.cfg, num_pages, page_size),
                      jnp.zeros((num_rows,), jnp.int32))

  def row_state(self, weights, state, prompt):
    """Its cache over each row's prompt but the last token (the root, fed by its first draft);
    in the engine, where the lanes and plain steps wrote the K/V of every token before the root,
    the pools as they are."""
    written = prompt.prompt_len - 1
    if prompt.hidden is None:
      return DraftCache(state.cache, written)
    return DraftCache(self.prefill(weights.draft, prompt.history, prompt.prompt_len,
                                   prompt.max_len), written)

  def prefill(self, params, tokens, prompt_len, max_len):
    """The draft's own cache over the prompts, tokens (B, W) by position, in a fresh cache. The
    prompt's last token (the root, fed later) and padding past it are not written."""
    b, t = tokens.shape[0], int(max_len)
    pos = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(pos < prompt_len[:, None] - 1, pos, t)
    _, cache = M.forward(params, tokens, positions, self.cfg, KVCache.init(self.cfg, b, t),
                         kv_source="chunk", runtime=self.draft_runtime)
    return cache

  def lanes(self, weights, state, tokens, hidden, next_tokens, positions, pages):
    _, cache = self._forward(weights.draft, tokens, positions, state.cache.over(pages))
    return state.replace(cache=PagePools.of(cache))

  def _catch_up(self, st: DraftCache, ctx: Context, cache):
    """(tokens (B, 2), positions (B, 2)): the token before the root where its K/V may be missing
    (else out of range), then the root."""
    length = ctx.length
    prev = jnp.take_along_axis(ctx.history, jnp.maximum(length - 1, 0)[:, None], axis=1)
    tokens = jnp.concatenate([prev, root_only(ctx)[:, None]], 1)
    positions = jnp.stack([jnp.where((st.written < length) & (length > 0), length - 1,
                                     cache.max_len), length], 1)
    return tokens, positions

  def flush(self, weights, st: DraftCache, ctx: Context):
    cache = attach_cache(st.cache, ctx.pages)
    tokens, positions = self._catch_up(st, ctx, cache)
    _, cache = self._forward(weights.draft, tokens[:, :1], positions[:, :1], cache)
    return st.replace(cache=detach_cache(cache, ctx.pages))

  def draft(self, weights, st: DraftCache, ctx: Context):
    params, g = weights.draft, self.num_draft_tokens
    length = ctx.length
    cache = attach_cache(st.cache, ctx.pages)
    tokens, positions = self._catch_up(st, ctx, cache)
    if self.fallback > 0:
      cache, draft, fed = self._draft_with_fallback(params, cache, ctx, tokens, positions)
    else:
      drafted, qs = [root_only(ctx)], []
      for i in range(g):
        hidden, cache = self._forward(params, tokens, positions, cache)
        q = distribution(M.logits(params, hidden[:, -1]), ctx.sampling)
        tok = draw(q, ctx, i)
        drafted.append(tok)
        qs.append(q)
        tokens, positions = tok[:, None], (length + i + 1)[:, None]
      qs.append(qs[-1])  # the last node has no children
      draft = Draft(jnp.stack(drafted, 1), jnp.asarray(chain_parents(g + 1)), jnp.stack(qs, 1))
      fed = g - 1  # drafts whose K/V were written (the last is not fed)
    # the root's K/V and the fed drafts' are written: a verification may leave the next root
    # past them
    return DraftCache(detach_cache(cache, ctx.pages), length + 1 + fed), draft

  def observe(self, weights, st: DraftCache, verified):
    reach = jnp.minimum(verified.length + verified.num_accepted + 1, st.written)
    return st.replace(written=jnp.where(verified.live, reach, st.written))

  def _draft_with_fallback(self, params, cache, ctx: Context, tokens, positions):
    """The chain drafted in a loop that ends when every row has fallen back: (the cache, the
    draft, the drafts fed)."""
    g, length, b = self.num_draft_tokens, ctx.length, ctx.length.shape[0]

    def step(i, tokens, positions, cache, live):
      hidden, cache = self._forward(params, tokens, positions, cache)
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling)
      tok = jnp.where(live, draw(q, ctx, i), 0)
      q = jnp.where(live[:, None], q, jax.nn.one_hot(0, q.shape[-1], dtype=q.dtype))
      sure = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= self.fallback
      return tok, q, cache, live & sure

    tok, q, cache, live = step(0, tokens, positions, cache, jnp.ones((b,), bool))
    drafted = jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(root_only(ctx)).at[:, 1].set(tok)
    qs = jnp.broadcast_to(jax.nn.one_hot(0, q.shape[-1], dtype=q.dtype)[None, None],
                          (b, g + 1, q.shape[-1])).at[:, 0].set(q)

    def body(c):
      i, live, cache, drafted, qs = c
      tok, q, cache, live = step(i, drafted[:, i, None], (length + i)[:, None], cache, live)
      return i + 1, live, cache, drafted.at[:, i + 1].set(tok), qs.at[:, i].set(q)

    end, _, cache, drafted, qs = jax.lax.while_loop(
        lambda c: (c[0] < g) & jnp.any(c[1]), body, (1, live, cache, drafted, qs))
    qs = qs.at[:, g].set(qs[:, g - 1])  # the last node has no children
    return cache, Draft(drafted, jnp.asarray(chain_parents(g + 1)), qs), end - 1


def layer_skip_draft(cfg: ModelConfig, params: M.Transformer,
                     keep: tuple[int, ...]) -> tuple[ModelConfig, M.Transformer]:
  """SWIFT-style self-speculation: the target itself with only the layers in `keep`."""
  if not keep or any(not 0 <= i < cfg.num_layers for i in keep) or len(set(keep)) != len(keep):
    raise ValueError(f"layer skip: layers to keep must be distinct indices in "
                     f"[0, {cfg.num_layers}), got {keep}")
  return (cfg.keep_layers(sorted(keep)),
          params.replace(layers=tuple(params.layers[i] for i in sorted(keep))))
