"""Draft proposers: given each row's committed tokens, a draft tree of T nodes per row.

Every proposer is a pure function of (its parameters, its state, the decode state), jitted inside
the speculative step; its drafts are either deterministic (q = None: exact verification treats
them as distinct top-k drafts) or sampled from a draft distribution q it returns.

- `NGram` (prompt lookup): the continuation of the latest earlier occurrence of the last n
  tokens (n from `max_ngram` down to 1) in prompt + output; a chain.
- `DraftModel`: a separate small model with its own KV cache drafts a chain autoregressively
  (sampled from its filtered distribution for sampling rows, greedily for greedy rows). The same
  class is SWIFT-style self-speculation when the draft is the target with layers skipped
  (`layer_skip_draft`).
- `Recycling` (Token Recycling): an adjacency matrix (V, k) of each token's most likely
  successors, refreshed from every verification's logits; the draft tree is a breadth-first
  expansion of it with a static branching per depth.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.sampling import SamplingParams, distribution


@struct.dataclass
class Context:
  """What a proposer sees of the decode state (device arrays)."""

  history: jax.Array  # (B, S) every committed token by position, the root at `length`
  length: jax.Array  # (B,) position of the root (the last committed, not yet cached, token)
  sampling: SamplingParams
  keys: jax.Array  # (B,) this step's draft keys


@struct.dataclass
class Draft:
  tokens: jax.Array  # (B, T); tokens[:, 0] is the root
  parents: jax.Array  # (T,) or (B, T)
  q: jax.Array | None  # (B, T, V): the distribution node t's children were drawn from


def chain_parents(t: int) -> np.ndarray:
  return np.arange(-1, t - 1, dtype=np.int32)


def tree_parents(branching: tuple[int, ...]) -> np.ndarray:
  """Breadth-first parents of the tree whose nodes at depth d each have branching[d] children."""
  parents, level = [-1], [0]
  for k in branching:
    nxt = []
    for node in level:
      for _ in range(k):
        parents.append(node)
        nxt.append(len(parents) - 1)
    level = nxt
  return np.asarray(parents, np.int32)


def _root_only(ctx: Context) -> jax.Array:
  return jnp.take_along_axis(ctx.history, ctx.length[:, None], axis=1)[:, 0]


def _draw(q: jax.Array, ctx: Context, i: int) -> jax.Array:
  """Draft token i of each row: sampled from q (B, V) for sampling rows, its argmax for greedy
  ones; the draw (V random numbers per row) only runs when some row samples."""
  greedy = jnp.argmax(q, -1).astype(jnp.int32)

  def draw(_):
    key = jax.vmap(lambda k: jax.random.fold_in(k, i))(ctx.keys)
    sampled = jax.vmap(jax.random.categorical)(key, jnp.log(q)).astype(jnp.int32)
    return jnp.where(ctx.sampling.temperature > 0, sampled, greedy)

  return jax.lax.cond(jnp.any(ctx.sampling.temperature > 0), draw, lambda _: greedy, None)


class _Chain:
  """A proposer that drafts a chain of `num_draft_tokens` after the root."""

  num_draft_tokens: int

  @property
  def tree_size(self) -> int:
    return self.num_draft_tokens + 1

  @property
  def max_depth(self) -> int:
    return self.num_draft_tokens


@dataclasses.dataclass(frozen=True)
class NGram(_Chain):
  num_draft_tokens: int = 4
  max_ngram: int = 3
  name: str = "ngram"

  def propose(self, state, ctx: Context):
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
    tokens = jnp.concatenate([_root_only(ctx)[:, None], drafts], axis=1)
    return state, Draft(tokens, jnp.asarray(chain_parents(self.tree_size)), None)


@dataclasses.dataclass(frozen=True)
class Recycling:
  branching: tuple[int, ...] = (4, 2, 1, 1)
  name: str = "recycling"

  @property
  def tree_size(self) -> int:
    return len(tree_parents(self.branching))

  @property
  def max_depth(self) -> int:
    return len(self.branching)

  def propose(self, adj, ctx: Context):
    # Level by level (tree_parents' breadth-first order): each node of a level has
    # branching[d] children, its top successors in order; one gather per level.
    level = _root_only(ctx)[:, None]  # (B, 1)
    levels = [level]
    for k in self.branching:
      level = adj[level][:, :, :k].reshape(level.shape[0], -1)
      levels.append(level)
    return adj, Draft(jnp.concatenate(levels, axis=1), jnp.asarray(tree_parents(self.branching)),
                      None)

  def update(self, adj, tokens, logits):
    """Each drafted token's successors := the target's top-k at its node."""
    k = max(self.branching)
    top = jax.lax.top_k(logits, k)[1].astype(jnp.int32)  # (B, T, k)
    return adj.at[tokens.reshape(-1)].set(top.reshape(-1, k))

  def init_adjacency(self, vocab_size: int) -> jax.Array:
    k = max(self.branching)
    return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (vocab_size, k))


@dataclasses.dataclass(frozen=True)
class DraftModel(_Chain):
  """A chain of `num_draft_tokens` from a small model sharing the target's vocabulary."""

  cfg: ModelConfig
  num_draft_tokens: int = 4
  name: str = "draft"

  def prefill(self, params, history, prompt_len, max_len):
    """The draft's own cache over the prompts (positions past a row's prompt are dropped)."""
    b, t = history.shape[0], int(max_len)
    cache = KVCache.init(self.cfg, b, t)
    width = history.shape[1]
    pos = jnp.arange(width)[None, :]
    positions = jnp.where(pos < prompt_len[:, None] - 1, pos, t)  # the root is fed later
    _, cache = M.forward(params, history, positions, self.cfg, cache)
    return cache

  def propose(self, params, cache: KVCache, ctx: Context):
    g = self.num_draft_tokens
    length = ctx.length
    # Catch up: re-feed the token before the root (its K/V may be missing when every draft was
    # accepted last step) and the root itself; then draft g tokens one at a time.
    prev = jnp.take_along_axis(ctx.history, jnp.maximum(length - 1, 0)[:, None], axis=1)
    root = _root_only(ctx)
    tokens = jnp.concatenate([prev, root[:, None]], 1)
    positions = jnp.stack([jnp.where(length > 0, length - 1, cache.max_len), length], 1)
    drafted, qs = [root], []
    for i in range(g):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache")
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling)
      tok = _draw(q, ctx, i)
      drafted.append(tok)
      qs.append(q)
      tokens, positions = tok[:, None], (length + i + 1)[:, None]
    qs.append(qs[-1])  # the last node has no children
    return cache, Draft(jnp.stack(drafted, 1), jnp.asarray(chain_parents(g + 1)),
                        jnp.stack(qs, 1))


def layer_skip_draft(cfg: ModelConfig, params: M.Transformer,
                     keep: tuple[int, ...]) -> tuple[ModelConfig, M.Transformer]:
  """SWIFT-style self-speculation: the target itself with only the layers in `keep`."""
  if not keep or any(not 0 <= i < cfg.num_layers for i in keep) or len(set(keep)) != len(keep):
    raise ValueError(f"layer skip: layers to keep must be distinct indices in "
                     f"[0, {cfg.num_layers}), got {keep}")
  return (dataclasses.replace(cfg, num_layers=len(keep)),
          params.replace(layers=tuple(params.layers[i] for i in sorted(keep))))


class _HeadsTree:
  """Heads on the target's hidden state at the last accepted token, drafting a static tree of
  `paths` (head ranks per depth, breadth-first). The proposer's state is that hidden state
  (B, D), refreshed from every verification."""

  paths: tuple[tuple[int, ...], ...]

  @property
  def tree_size(self) -> int:
    return 1 + len(self.paths)

  @property
  def max_depth(self) -> int:
    return max(len(p) for p in self.paths)

  def update(self, hidden_state, verify_hidden, path, num_accepted):
    """The hidden state at the last accepted node (it predicted the next root)."""
    rows = jnp.arange(path.shape[0])
    return verify_hidden[rows, path[rows, num_accepted]]


@dataclasses.dataclass(frozen=True)
class Medusa(_HeadsTree):
  """Medusa heads (jaxinfer.draft_heads.medusa): node (r_1, ..., r_d) takes the r_d-th ranked
  candidate of head d-1, the same for every branch."""

  paths: tuple[tuple[int, ...], ...]
  name: str = "medusa"

  def propose(self, heads, hidden, ctx: Context):
    from jaxinfer.draft_heads.medusa import head_logits, tree_parents
    top = 1 + max(max(p) for p in self.paths)
    logits = head_logits(heads, hidden)[:self.max_depth]  # (K, B, V)
    cand = jax.lax.top_k(logits, top)[1].astype(jnp.int32)  # (K, B, top): distinct per head
    # One gather for all nodes (per-node slices get the heads' computation duplicated by XLA).
    depth = np.array([len(p) - 1 for p in self.paths])
    rank = np.array([p[-1] for p in self.paths])
    drafts = cand[depth, :, rank].T  # (B, T - 1)
    tokens = jnp.concatenate([_root_only(ctx)[:, None], drafts], axis=1)
    return hidden, Draft(tokens, jnp.asarray(tree_parents(list(self.paths))), None)


@struct.dataclass
class EagleState:
  """The EAGLE draft's cache and the (feature, token) pairs it has not read yet: the accepted
  path of the last verification, `count` pairs from position `start`, the last of them (the
  feature that predicted the root, the root) at position root - 1."""

  cache: KVCache
  features: jax.Array  # (B, T, D)
  tokens: jax.Array  # (B, T)
  start: jax.Array  # (B,)
  count: jax.Array  # (B,)


@dataclasses.dataclass(frozen=True)
class Eagle(_Chain):
  """An EAGLE draft layer (jaxinfer.draft_heads.eagle; its params an `EagleHeads`) drafting a
  chain: catch up on the pairs of the last accepted path, then feed its own predicted features
  back `num_draft_tokens` - 1 times. Drafts are sampled from its filtered distribution for
  sampling rows (q returned, zero outside its draft vocabulary)."""

  cfg: ModelConfig  # the draft layer's (one layer)
  num_draft_tokens: int = 4
  name: str = "eagle"

  def prefill(self, heads_and_base, features, history, prompt_len, first, max_len):
    """The draft's cache over the prompt's pairs (f_p, x_{p+1}), p < prompt_len - 1; the pair
    (f_{n-1}, first token) is left pending."""
    from jaxinfer.draft_heads.eagle import draft_forward
    heads, base = heads_and_base
    draft = heads.draft
    b, w = history.shape
    cache = KVCache.init(self.cfg, b, int(max_len))
    pos = jnp.arange(w)[None, :]
    nxt = jnp.concatenate([history[:, 1:], jnp.zeros((b, 1), history.dtype)], axis=1)
    positions = jnp.where(pos < prompt_len[:, None] - 1, pos, max_len)
    _, cache = draft_forward(draft, base, features.astype(draft.fc.dtype), nxt, positions,
                             self.cfg, cache)
    rows = jnp.arange(b)
    t = self.tree_size
    last = features[rows, prompt_len - 1]
    feats = jnp.zeros((b, t, features.shape[-1]), draft.fc.dtype).at[:, 0].set(last)
    toks = jnp.zeros((b, t), jnp.int32).at[:, 0].set(first)
    return EagleState(cache, feats, toks, prompt_len - 1, jnp.ones((b,), jnp.int32))

  def catch_up(self, heads, base, st: EagleState):
    """Feeds the pending pairs into the draft's cache; returns the predicted feature after
    the last of them (it scores the root's children) and the cache."""
    from jaxinfer.draft_heads.eagle import draft_forward
    b, t = st.tokens.shape
    j = jnp.arange(t)[None, :]
    positions = jnp.where(j < st.count[:, None], st.start[:, None] + j, st.cache.max_len)
    hidden, cache = draft_forward(heads.draft, base, st.features, st.tokens, positions,
                                  self.cfg, st.cache, kv_source="cache")
    return hidden[jnp.arange(b), st.count - 1], cache

  def propose(self, heads_and_base, st: EagleState, ctx: Context):
    from jaxinfer.draft_heads.eagle import draft_forward
    heads, base = heads_and_base
    draft, vocab_size = heads.draft, base.embed.shape[0]
    feat, cache = self.catch_up(heads, base, st)
    drafted, qs = [_root_only(ctx)], []
    for i in range(self.num_draft_tokens):
      q = distribution(heads.logits(base, feat), ctx.sampling)  # over the draft vocabulary
      tok = heads.token_ids(_draw(q, ctx, i))
      drafted.append(tok)
      qs.append(heads.full(q, vocab_size))
      if i + 1 < self.num_draft_tokens:
        hidden, cache = draft_forward(draft, base, feat[:, None], tok[:, None],
                                      (ctx.length + i)[:, None], self.cfg, cache,
                                      kv_source="cache")
        feat = hidden[:, 0]
    qs.append(qs[-1])  # the last node has no children
    return st.replace(cache=cache), Draft(jnp.stack(drafted, 1),
                                          jnp.asarray(chain_parents(self.tree_size)),
                                          jnp.stack(qs, 1))

  def update(self, st: EagleState, verify_hidden, tokens, path, num_accepted, next_token,
             length, live):
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


@dataclasses.dataclass(frozen=True)
class Hydra(_HeadsTree):
  """Hydra heads (jaxinfer.draft_heads.hydra) draft the static tree level by level: the children
  of a node at depth d are the top candidates of head d given the hidden state and the tokens on
  the node's path, so each node's children depend on its branch."""

  paths: tuple[tuple[int, ...], ...]
  name: str = "hydra"

  def propose(self, heads_and_embed, hidden, ctx: Context):
    from jaxinfer.draft_heads.hydra import head_logits
    heads, embed = heads_and_embed
    index = {(): 0}
    for i, p in enumerate(sorted(self.paths, key=lambda p: (len(p), p)), start=1):
      index[p] = i
    nodes = [_root_only(ctx)]  # tokens by node index (breadth-first)
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
    from jaxinfer.draft_heads.medusa import tree_parents as parents_of
    ordered = sorted(self.paths, key=lambda p: (len(p), p))
    return hidden, Draft(jnp.stack(nodes, axis=1), jnp.asarray(parents_of(ordered)), None)
