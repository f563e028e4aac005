"""A draft layer over the target's features (EAGLE's draft layer, Hydra++'s prefix layer): its
own KV cache, and the (feature, token) pairs of the last accepted path it has not read yet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.speculative.proposers.common import reused_cache


@struct.dataclass
class EagleState:
  """The draft layer's cache and the (feature, token) pairs it has not read yet: the accepted
  path of the last verification, `count` pairs from position `start`, the last of them (the
  feature that predicted the root, the root) at position root - 1."""

  cache: KVCache
  features: jax.Array  # (B, T, D)
  tokens: jax.Array  # (B, T)
  start: jax.Array  # (B,)
  count: jax.Array  # (B,)


def prefill_pending(forward, cfg: ModelConfig, features, prompt_len, first, max_len, t: int,
                    dtype, start=None, cache=None) -> EagleState:
  """A draft layer's state after the prompt: `forward(features, positions, cache)` -> (out,
  cache) has written the prompt's pairs but the last to `cache` (default: a fresh cache of
  `cfg`); that last pair (the feature that predicted the first token, `first`) is pending.
  features (B, W, D) are the prompt's from position `start` (B,) on (default 0)."""
  b, w, d = features.shape
  start = jnp.zeros_like(prompt_len) if start is None else start
  pos = start[:, None] + jnp.arange(w)[None, :]
  positions = jnp.where(pos < prompt_len[:, None] - 1, pos, max_len)
  cache = KVCache.init(cfg, b, int(max_len)) if cache is None else cache
  _, cache = forward(features.astype(dtype), positions, cache)
  last = features[jnp.arange(b), prompt_len - 1 - start]
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
  length + j) and the token after it (the next accepted draft, or the new root)."""
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


def reused_layer_cache(st: EagleState | None, copy_src):
  """The draft layer's cache rows admitted rows continue (`common.reused_cache`)."""
  return None if copy_src is None else reused_cache(st.cache, copy_src)


def nothing_pending(st: EagleState, end) -> EagleState:
  """Rows after a chunk of a long admission ending at `end` (k,): its pairs are in the cache,
  none is left for a verification step to feed."""
  return st.replace(start=end, count=jnp.zeros_like(end))
