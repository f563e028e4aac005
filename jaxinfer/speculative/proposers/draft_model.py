"""A draft model: a separate small model with its own KV cache drafts a chain autoregressively
(sampled from its filtered distribution for sampling rows, greedily for greedy rows). The same
class is SWIFT-style self-speculation when the draft is the target with layers skipped
(`layer_skip_draft`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.sampling import distribution
from jaxinfer.sparsity import DENSE, Sparsity
from jaxinfer.speculative.proposers.common import Chain, chain_parents, draw, root_only
from jaxinfer.speculative.protocol import Context, Draft


@dataclasses.dataclass(frozen=True)
class DraftModel(Chain):
  """A chain of `num_draft_tokens` from a small model sharing the target's vocabulary.

  `fallback` > 0 is Big-Little's fallback policy: a row stops drafting after the first draft
  the draft model was less than `fallback` sure of (its softmax maximum), handing the rest of the
  step to the target; once every row has stopped, no more draft steps run. Unused chain slots
  hold token 0 drawn from a point mass (so the exact rule stays exact). `sparsity`: the draft's
  attention pattern (the engine gives it the target's)."""

  cfg: ModelConfig
  num_draft_tokens: int = 4
  name: str = "draft"
  fallback: float = 0.0
  sparsity: Sparsity = DENSE
  needs_draft_params = True

  def validate(self, cfg, draft_params) -> None:
    super().validate(cfg, draft_params)
    if self.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"speculative decoding: the draft's vocabulary ({self.cfg.vocab_size})"
                       f" differs from the target's ({cfg.vocab_size})")

  def with_sparsity(self, sparsity):
    return dataclasses.replace(self, sparsity=sparsity)

  def row_state(self, weights, state, prompt):
    """Its cache over each row's tokens so far (the prompt; in the engine, also what the row
    decoded plainly before)."""
    return self.prefill(weights.draft, prompt.history, prompt.prompt_len, prompt.max_len)

  def prefill(self, params, tokens, prompt_len, max_len):
    """The draft's own cache over the prompts, tokens (B, W) by position, in a fresh cache. The
    prompt's last token (the root, fed later) and padding past it are not written."""
    b, t = tokens.shape[0], int(max_len)
    pos = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(pos < prompt_len[:, None] - 1, pos, t)
    _, cache = M.forward(params, tokens, positions, self.cfg, KVCache.init(self.cfg, b, t),
                         kv_source="chunk", runtime=self.draft_runtime)
    return cache

  def draft(self, weights, cache: KVCache, ctx: Context):
    params, g = weights.draft, self.num_draft_tokens
    length = ctx.length
    # Catch up: re-feed the token before the root (its K/V may be missing when every draft was
    # accepted last step) and the root itself; then draft g tokens one at a time.
    prev = jnp.take_along_axis(ctx.history, jnp.maximum(length - 1, 0)[:, None], axis=1)
    root = root_only(ctx)
    tokens = jnp.concatenate([prev, root[:, None]], 1)
    positions = jnp.stack([jnp.where(length > 0, length - 1, cache.max_len), length], 1)
    if self.fallback > 0:
      return self._draft_with_fallback(params, cache, ctx, tokens, positions)
    drafted, qs = [root], []
    for i in range(g):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                runtime=self.draft_runtime)
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling, ctx.greedy_only)
      tok = draw(q, ctx, i)
      drafted.append(tok)
      qs.append(q)
      tokens, positions = tok[:, None], (length + i + 1)[:, None]
    qs.append(qs[-1])  # the last node has no children
    return cache, Draft(jnp.stack(drafted, 1), jnp.asarray(chain_parents(g + 1)),
                        jnp.stack(qs, 1))

  def _draft_with_fallback(self, params, cache: KVCache, ctx: Context, tokens, positions):
    """The chain drafted in a loop that ends when every row has fallen back."""
    g, length, b = self.num_draft_tokens, ctx.length, ctx.length.shape[0]

    def step(i, tokens, positions, cache, live):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                runtime=self.draft_runtime)
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling, ctx.greedy_only)
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

    _, _, cache, drafted, qs = jax.lax.while_loop(
        lambda c: (c[0] < g) & jnp.any(c[1]), body, (1, live, cache, drafted, qs))
    qs = qs.at[:, g].set(qs[:, g - 1])  # the last node has no children
    return cache, Draft(drafted, jnp.asarray(chain_parents(g + 1)), qs)


def layer_skip_draft(cfg: ModelConfig, params: M.Transformer,
                     keep: tuple[int, ...]) -> tuple[ModelConfig, M.Transformer]:
  """SWIFT-style self-speculation: the target itself with only the layers in `keep`."""
  if not keep or any(not 0 <= i < cfg.num_layers for i in keep) or len(set(keep)) != len(keep):
    raise ValueError(f"layer skip: layers to keep must be distinct indices in "
                     f"[0, {cfg.num_layers}), got {keep}")
  return (cfg.keep_layers(sorted(keep)),
          params.replace(layers=tuple(params.layers[i] for i in sorted(keep))))
