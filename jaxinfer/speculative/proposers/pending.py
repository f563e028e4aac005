"""A draft layer over the target's features (EAGLE's draft layer, Hydra++'s prefix layer): its
own KV cache, and the (feature, token) pairs of the last accepted path it has not read yet.

Prefilled whole by the proposer itself (`prefill`: the reference the engine's layout is held
against) the cache is a `KVCache` of its own, by row. In the paged engine it is a `PagePools`
named by the engine's page tables: the prefill lanes write the prompt's pairs (`write_lanes`),
drafting reads and writes through the rows' tables (`attach`, `detach`), and a row starts with
nothing pending (`engine_rows`): its first verification drafts nothing and gives it the pair at
its prompt's last token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache, PagePools


@struct.dataclass
class EagleState:
  """The draft layer's cache and the (feature, token) pairs it has not read yet: the accepted
  path of the last verification, `count` pairs from position `start`, the last of them (the
  feature that predicted the root, the root) at position root - 1."""

  cache: KVCache | PagePools
  features: jax.Array  # (B, T, D)
  tokens: jax.Array  # (B, T)
  start: jax.Array  # (B,)
  count: jax.Array  # (B,)


def pending_width(proposer) -> int:
  """Pairs a state holds: the longest accepted path's, root included (not the tree's nodes)."""
  return proposer.max_depth + 1


def prefill_pending(forward, cfg: ModelConfig, features, prompt_len, first, max_len, t: int,
                    dtype) -> EagleState:
  """A draft layer's state after the prompt: `forward(features, positions, cache)` -> (out,
  cache) has written the prompt's pairs but the last to a fresh cache of `cfg`; that last pair
  (the feature that predicted the first token, `first`) is pending. features (B, W, D) are the
  prompt's by position."""
  b, w, d = features.shape
  pos = jnp.arange(w)[None, :]
  positions = jnp.where(pos < prompt_len[:, None] - 1, pos, max_len)
  _, cache = forward(features.astype(dtype), positions, KVCache.init(cfg, b, int(max_len)))
  last = features[jnp.arange(b), prompt_len - 1]
  feats = jnp.zeros((b, t, d), dtype).at[:, 0].set(last)
  toks = jnp.zeros((b, t), jnp.int32).at[:, 0].set(first)
  return EagleState(cache, feats, toks, prompt_len - 1, jnp.ones((b,), jnp.int32))


def feed_pending(forward, st: EagleState):
  """Runs `forward(features, tokens, positions, cache)` -> (out, cache) over the pending pairs
  (writing them to the cache); returns the output at the last of them and the cache."""
  b, t = st.tokens.shape
  j = jnp.arange(t)[None, :]
  positions = jnp.where(j < st.count[:, None], st.start[:, None] + j, st.cache.max_len)
  hidden, cache = forward(st.features, st.tokens, positions, st.cache)
  return hidden[jnp.arange(b), st.count - 1], cache


def pending_path(st: EagleState, verify_hidden, tokens, path, num_accepted, next_token, length,
                 live) -> EagleState:
  """Pending := the accepted path's pairs: the target's feature at path node j (position
  length + j) and the token after it (the next accepted draft, or the new root). The state holds
  as many pairs as the longest accepted path (`pending_width`): a tree's path is cut to it, a
  smaller tree's (a lower level of the engine's ladder) padded."""
  w = st.tokens.shape[1]
  path = jnp.pad(path, ((0, 0), (0, max(0, w - path.shape[1]))))[:, :w]
  t = path.shape[1]
  j = jnp.arange(t)[None, :]
  feats = jnp.take_along_axis(verify_hidden, path[..., None], axis=1).astype(st.features.dtype)
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)
  nxt = jnp.where(j < num_accepted[:, None], jnp.roll(path_tokens, -1, axis=1),
                  next_token[:, None])
  keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return st.replace(features=keep(feats, st.features), tokens=keep(nxt, st.tokens),
                    start=keep(length, st.start), count=keep(num_accepted + 1, st.count))


def observe_path(st: EagleState, verified) -> EagleState:
  """`pending_path` of a verification (`protocol.Verified`)."""
  return pending_path(st, verified.hidden, verified.tokens, verified.path,
                      verified.num_accepted, verified.next_token, verified.length,
                      verified.live)


def paged_state(cfg: ModelConfig, num_rows: int, num_pages: int, page_size: int, t: int, d: int,
                dtype) -> EagleState:
  """The engine's state of `num_rows` free slots: the layer's K/V in `num_pages` pages of the
  engine's layout, nothing pending."""
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  return EagleState(PagePools.init(cfg, num_pages, page_size),
                    jnp.zeros((num_rows, t, d), dtype), zeros(num_rows, t), zeros(num_rows),
                    zeros(num_rows))


def engine_rows(st: EagleState, prompt_len) -> EagleState:
  """Rows admitted into the engine (k,), whose lanes wrote the pairs of their prompts but the
  last: nothing pending (the pools are the running state's)."""
  k, (t, d) = prompt_len.shape[0], st.features.shape[1:]
  return EagleState(st.cache, jnp.zeros((k, t, d), st.features.dtype),
                    jnp.zeros((k, t), jnp.int32), prompt_len - 1,
                    jnp.zeros_like(prompt_len))


def write_lanes(forward, st: EagleState, hidden, next_tokens, positions, pages) -> EagleState:
  """The engine's prefill lanes' pairs, the target's hidden state at each lane token and the
  prompt token after it, written through the lanes' page tables `pages` (G, M):
  forward(features, tokens, positions, cache) -> (out, cache)."""
  _, cache = forward(hidden.astype(st.features.dtype), next_tokens, positions,
                     st.cache.over(pages))
  return st.replace(cache=PagePools.of(cache))


def fed(forward, st: EagleState, pages) -> EagleState:
  """The state with its pending pairs fed into its cache (`feed_pending`; through the rows' page
  tables `pages` in the engine), nothing drafted."""
  attached = attach(st, pages)
  _, cache = feed_pending(forward, attached)
  return detach(attached.replace(cache=cache), pages)


def attach(st, pages):
  """The state with its cache read through the rows' page tables (`Context.pages`), in the
  engine (pages None: as it is)."""
  return st if pages is None else st.replace(cache=st.cache.over(pages))


def detach(st, pages):
  """`attach` undone: the cache back to the pools it wrote."""
  return st if pages is None else st.replace(cache=PagePools.of(st.cache))
