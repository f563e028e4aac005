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
- `Lookahead` (a Lookahead-style trie): the continuations of the `num_candidates` best earlier
  matches of the last tokens in prompt + output, merged into a trie and cut to a tree of
  `num_nodes` by how many matches share each branch; a tree per row.
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
from jaxinfer.quant import weight
from jaxinfer.sampling import SamplingParams, argmax, distribution
from jaxinfer.sparsity import DENSE, Sparsity


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
  greedy = argmax(q)

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
class Lookahead:
  """Lookahead-style trie over each row's prompt and output (training-free; a tree per row).

  Candidates: the `num_candidates` positions p whose preceding tokens best match the row's last
  tokens (longest match up to `max_ngram` first, then the latest). Each gives the continuation
  after it, up to `depth` known tokens. Merged, the continuations form a trie; a node's weight is
  the summed match length of the candidates through it, which never grows with depth, so the
  `num_nodes` heaviest nodes (ties: shallower first) are closed under taking parents. Siblings are
  distinct tokens (trie nodes), as the lossless rule for deterministic drafts needs. Unused
  slots hang as a chain below the deepest node (each an only child)."""

  num_nodes: int = 16
  depth: int = 6
  num_candidates: int = 16
  max_ngram: int = 4
  name: str = "lookahead"

  def __post_init__(self):
    if min(self.num_nodes, self.depth, self.num_candidates, self.max_ngram) < 1:
      raise ValueError(f"lookahead: sizes must be >= 1, got {self}")

  @property
  def tree_size(self) -> int:
    return self.num_nodes + 1

  @property
  def max_depth(self) -> int:
    return self.num_nodes  # the unused-slot chain can reach that deep

  @property
  def is_chain(self) -> bool:
    return False  # (as deep as a chain could be, but a tree)

  def propose(self, state, ctx: Context):
    hist, length = ctx.history, ctx.length
    b, s = hist.shape
    m, dd, n_nodes = min(self.num_candidates, s), self.depth, self.num_nodes
    pos = jnp.arange(s)[None, :]
    # score[b, p]: how many tokens ending at p equal the row's last tokens (p < root position)
    score = jnp.zeros((b, s), jnp.int32)
    alive = pos < length[:, None]
    for i in range(self.max_ngram):
      last = jnp.take_along_axis(hist, jnp.maximum(length - i, 0)[:, None], axis=1)
      alive &= (jnp.roll(hist, i, axis=1) == last) & (pos >= i) & (length[:, None] >= i)
      score += alive.astype(jnp.int32)
    key = jnp.where(score > 0, score * s + pos, -1)
    top, cand = jax.lax.top_k(key, m)  # (B, M) best matches, longest then latest
    weight = jnp.where(top >= 0, top // s, 0)  # match length, 0 for no candidate
    idx = cand[:, :, None] + 1 + jnp.arange(dd)[None, None, :]  # (B, M, D) continuation
    valid = (weight[:, :, None] > 0) & (idx <= length[:, None, None])  # known tokens only
    cont = jnp.take_along_axis(hist, jnp.minimum(idx, s - 1).reshape(b, -1), axis=1).reshape(
        b, m, dd)
    # same[b, j, j', d]: candidates j and j' agree on their first d + 1 tokens (both valid)
    eq = (cont[:, :, None, :] == cont[:, None, :, :]) & valid[:, :, None, :] & valid[:, None]
    same = jnp.cumprod(eq.astype(jnp.int32), axis=-1).astype(bool)
    rep = jnp.argmax(same, axis=2)  # (B, M, D): first candidate with the same prefix
    node_w = jnp.sum(jnp.where(same, weight[:, None, :, None], 0), axis=2)  # (B, M, D)
    canonical = valid & (rep == jnp.arange(m)[None, :, None])
    d_idx = jnp.arange(dd)[None, None, :]
    j_idx = jnp.arange(m)[None, :, None]
    rank = ((node_w * (dd + 1) + (dd - d_idx)) * m + (m - 1 - j_idx))
    rank = jnp.where(canonical, rank, -1).reshape(b, m * dd)
    k = min(n_nodes, m * dd)
    best, flat = jax.lax.top_k(rank, k)  # (B, k) the heaviest nodes
    used = best >= 0
    sel_j, sel_d = flat // dd, flat % dd
    # breadth-first order (depth, then weight rank); unused slots last
    order = jnp.argsort(jnp.where(used, sel_d * k + jnp.arange(k)[None], dd * k + 1), axis=1)
    sel_j, sel_d = (jnp.take_along_axis(a, order, axis=1) for a in (sel_j, sel_d))
    used = jnp.take_along_axis(used, order, axis=1)
    rows = jnp.arange(b)[:, None]
    tokens = cont[rows, sel_j, sel_d]
    # parent: the node of (rep[j, d - 1], d - 1) among the selected, or the root at depth 0
    par_j = rep[rows, sel_j, jnp.maximum(sel_d - 1, 0)]
    hit = ((sel_j[:, None, :] == par_j[:, :, None]) & (sel_d[:, None, :] == sel_d[:, :, None] - 1)
           & used[:, None, :])  # (B, k, k): slot i's parent is slot i'
    parents = jnp.where(sel_d == 0, 0, 1 + jnp.argmax(hit, axis=2))
    slot = jnp.arange(1, k + 1)[None]
    parents = jnp.where(used, parents, slot - 1)  # unused: a chain below the deepest node
    tokens = jnp.where(used, tokens, 0)
    if k < n_nodes:  # more nodes than the trie can hold: extend the chain
      extra = jnp.arange(k + 1, n_nodes + 1)[None]
      parents = jnp.concatenate([parents, jnp.broadcast_to(extra - 1, (b, n_nodes - k))], 1)
      tokens = jnp.concatenate([tokens, jnp.zeros((b, n_nodes - k), tokens.dtype)], 1)
    tokens = jnp.concatenate([_root_only(ctx)[:, None], tokens.astype(jnp.int32)], axis=1)
    parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parents.astype(jnp.int32)], 1)
    return state, Draft(tokens, parents, None)


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
    k = adj.shape[1]  # (its width, shared by the smaller trees `shrink` makes)
    top = jax.lax.top_k(logits, k)[1].astype(jnp.int32)  # (B, T, k)
    return adj.at[tokens.reshape(-1)].set(top.reshape(-1, k))

  def init_adjacency(self, vocab_size: int) -> jax.Array:
    k = max(self.branching)
    return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (vocab_size, k))


@dataclasses.dataclass(frozen=True)
class DraftModel(_Chain):
  """A chain of `num_draft_tokens` from a small model sharing the target's vocabulary.

  `fallback` > 0 is Big-Little's fallback policy: a row stops drafting after the first draft
  the draft model was less than `fallback` sure of (its softmax maximum), handing the rest of the
  step to the target; once every row has stopped, no more draft steps run. Unused chain slots
  hold token 0 drawn from a point mass (so the exact rule stays exact). `sparsity`: the draft's
  attention pattern (the speculative generator gives it the target's)."""

  cfg: ModelConfig
  num_draft_tokens: int = 4
  name: str = "draft"
  fallback: float = 0.0
  sparsity: Sparsity = DENSE

  def prefill(self, params, tokens, prompt_len, max_len, start=None, cache=None):
    """The draft's own cache over the prompts: tokens (B, W) are each prompt from position
    `start` (B,) on, continuing `cache` (holding the positions before start); by default from
    0 into a fresh cache. The prompt's last token (the root, fed later) and padding past it are
    not written."""
    b, t = tokens.shape[0], int(max_len)
    kv_source = "chunk" if cache is None else "cache"
    cache = KVCache.init(self.cfg, b, t) if cache is None else cache
    pos = (0 if start is None else start[:, None]) + jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(pos < prompt_len[:, None] - 1, pos, t)
    _, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source=kv_source,
                         sparsity=self.sparsity)
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
    if self.fallback > 0:
      return self._propose_with_fallback(params, cache, ctx, tokens, positions)
    drafted, qs = [root], []
    for i in range(g):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                sparsity=self.sparsity)
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling)
      tok = _draw(q, ctx, i)
      drafted.append(tok)
      qs.append(q)
      tokens, positions = tok[:, None], (length + i + 1)[:, None]
    qs.append(qs[-1])  # the last node has no children
    return cache, Draft(jnp.stack(drafted, 1), jnp.asarray(chain_parents(g + 1)),
                        jnp.stack(qs, 1))

  def _propose_with_fallback(self, params, cache: KVCache, ctx: Context, tokens, positions):
    """The chain drafted in a loop that ends when every row has fallen back."""
    g, length, b = self.num_draft_tokens, ctx.length, ctx.length.shape[0]

    def step(i, tokens, positions, cache, live):
      hidden, cache = M.forward(params, tokens, positions, self.cfg, cache, kv_source="cache",
                                sparsity=self.sparsity)
      logits = M.logits(params, hidden[:, -1])
      q = distribution(logits, ctx.sampling)
      tok = jnp.where(live, _draw(q, ctx, i), 0)
      q = jnp.where(live[:, None], q, jax.nn.one_hot(0, q.shape[-1], dtype=q.dtype))
      sure = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= self.fallback
      return tok, q, cache, live & sure

    tok, q, cache, live = step(0, tokens, positions, cache, jnp.ones((b,), bool))
    drafted = jnp.zeros((b, g + 1), jnp.int32).at[:, 0].set(_root_only(ctx)).at[:, 1].set(tok)
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


class _HeadsTree:
  """Heads on the target's hidden state at the last accepted token, drafting a static tree of
  `paths` (head ranks per depth, breadth-first). The proposer's state is that hidden state
  (B, D), refreshed from every verification."""

  paths: tuple[tuple[int, ...], ...]
  # the heads' measured top-k accuracy per head (K, top), if known: it ranks the paths that a
  # smaller tree keeps (`shrink`)
  accuracy: tuple[tuple[float, ...], ...] | None = None

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
  accuracy: tuple[tuple[float, ...], ...] | None = None

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
  sampling rows (q returned, zero outside its draft vocabulary). `sparsity`: the pattern its
  layer attends its own cache with (the generator sets the target's)."""

  cfg: ModelConfig  # the draft layer's (one layer)
  num_draft_tokens: int = 4
  name: str = "eagle"
  sparsity: Sparsity = DENSE

  def prefill(self, heads_and_base, features, history, prompt_len, first, max_len, start=None,
              cache=None):
    """The draft's cache over the prompt's pairs (f_p, x_{p+1}), p < prompt_len - 1; the pair
    (f_{n-1}, first token) is left pending. `features` are the target's from position `start`
    (B,) on, where `cache` (the draft's, holding positions before start) continues; by default
    from 0 into a fresh cache."""
    from jaxinfer.draft_heads.eagle import draft_forward
    heads, base = heads_and_base
    w = features.shape[1]
    nxt_pos = (0 if start is None else start[:, None]) + jnp.arange(w)[None, :] + 1
    nxt = jnp.take_along_axis(history, jnp.clip(nxt_pos, 0, history.shape[1] - 1), axis=1)
    kv_source = "chunk" if cache is None else "cache"
    return _prefill_pending(lambda f, pos, c: draft_forward(
        heads.draft, base, f, nxt, pos, self.cfg, c, kv_source=kv_source,
        sparsity=self.sparsity), self.cfg, features,
        prompt_len, first, max_len, self.tree_size, heads.draft.fc.dtype, start, cache)

  def catch_up(self, heads, base, st: EagleState):
    """Feeds the pending pairs into the draft's cache; returns the predicted feature after
    the last of them (it scores the root's children) and the cache."""
    from jaxinfer.draft_heads.eagle import draft_forward
    return _catch_up(lambda f, x, pos, cache: draft_forward(
        heads.draft, base, f, x, pos, self.cfg, cache, kv_source="cache",
        sparsity=self.sparsity), st)

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
                                      kv_source="cache", sparsity=self.sparsity)
        feat = hidden[:, 0]
    qs.append(qs[-1])  # the last node has no children
    return st.replace(cache=cache), Draft(jnp.stack(drafted, 1),
                                          jnp.asarray(chain_parents(self.tree_size)),
                                          jnp.stack(qs, 1))

  def update(self, st: EagleState, verify_hidden, tokens, path, num_accepted, next_token,
             length, live):
    return _pending_path(st, verify_hidden, tokens, path, num_accepted, next_token, length,
                         live)


def _prefill_pending(forward, cfg: ModelConfig, features, prompt_len, first, max_len, t: int,
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


def _catch_up(forward, st: EagleState):
  """Runs `forward(features, tokens, positions, cache)` -> (out, cache) over the pending pairs
  (writing them to the cache); returns the output at the last of them and the cache."""
  b, t = st.tokens.shape
  j = jnp.arange(t)[None, :]
  positions = jnp.where(j < st.count[:, None], st.start[:, None] + j, st.cache.max_len)
  hidden, cache = forward(st.features, st.tokens, positions, st.cache)
  return hidden[jnp.arange(b), st.count - 1], cache


def _pending_path(st: EagleState, verify_hidden, tokens, path, num_accepted, next_token, length,
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


@dataclasses.dataclass(frozen=True)
class Hydra(_HeadsTree):
  """Hydra heads (jaxinfer.draft_heads.hydra) draft the static tree level by level: the children
  of a node at depth d are the top candidates of head d given the hidden state and the tokens on
  the node's path, so each node's children depend on its branch.

  With Hydra++'s prefix layer (`prefix`: its one-layer config), the state is the layer's KV
  cache and the target's hidden states on the last accepted path, still to be fed to it (an
  `EagleState`, as the EAGLE draft keeps its pairs); the heads read the layer's output at the
  last accepted token. Without it, the state is the target's hidden state there (B, D).
  `sparsity`: the pattern the prefix layer attends its cache with (the generator sets the
  target's)."""

  paths: tuple[tuple[int, ...], ...]
  name: str = "hydra"
  prefix: ModelConfig | None = None
  accuracy: tuple[tuple[float, ...], ...] | None = None
  sparsity: Sparsity = DENSE

  def prefill(self, heads_and_base, features, prompt_len, max_len, start=None, cache=None):
    """Prefix layer: its cache over the prompt's hidden states but the last, left pending
    (features from position `start` on, continuing `cache`, as `Eagle.prefill`)."""
    from jaxinfer.draft_heads.hydra import prefix_forward
    heads, base = heads_and_base
    kv_source = "chunk" if cache is None else "cache"
    return _prefill_pending(lambda f, pos, c: prefix_forward(
        heads, base, f, pos, self.prefix, c, kv_source=kv_source, sparsity=self.sparsity),
        self.prefix, features,
        prompt_len, jnp.zeros_like(prompt_len), max_len, self.tree_size,
        heads.prefix_norm.dtype, start, cache)

  def update_prefix(self, st: EagleState, verify_hidden, tokens, path, num_accepted,
                    next_token, length, live):
    return _pending_path(st, verify_hidden, tokens, path, num_accepted, next_token, length,
                         live)

  def heads_input(self, heads_and_base, state):
    """(what the heads read at the last accepted token (B, D), the state after reading it)."""
    from jaxinfer.draft_heads.hydra import prefix_forward
    if self.prefix is None:
      return state, state
    heads, base = heads_and_base
    out, cache = _catch_up(lambda f, x, pos, cache: prefix_forward(
        heads, base, f, pos, self.prefix, cache, kv_source="cache", sparsity=self.sparsity),
        state)
    return out, state.replace(cache=cache)

  def propose(self, heads_and_base, state, ctx: Context):
    from jaxinfer.draft_heads.hydra import head_logits
    heads, embed = heads_and_base[0], weight(heads_and_base[1].embed)
    hidden, state = self.heads_input(heads_and_base, state)
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
    return state, Draft(jnp.stack(nodes, axis=1), jnp.asarray(parents_of(ordered)), None)


def _keep_paths(paths, accuracy, n: int) -> tuple[tuple[int, ...], ...]:
  """The n paths of highest expected acceptance (prod_j accuracy[j, r_j]; without accuracies,
  prod_j 1 / (r_j + 2): low ranks, shallow first), breadth-first. A path scores strictly below
  its prefix, so the kept set is closed under taking prefixes."""
  acc = None if accuracy is None else np.asarray(accuracy, np.float64)

  def score(p):
    if acc is None:
      logs = [-np.log(r + 2.0) for r in p]
    else:
      logs = [np.log(max(acc[j, r] if j < acc.shape[0] and r < acc.shape[1] else 0.0, 1e-12))
              for j, r in enumerate(p)]
    return float(sum(logs)) - 1e-6 * len(p)

  kept = sorted(paths, key=lambda p: (-score(p), len(p), p))[:n]
  return tuple(sorted(kept, key=lambda p: (len(p), p)))


def shrink(proposer):
  """The same proposer drafting about half as many tokens per step (None: it drafts one token
  already, or cannot shrink). Speculation that stops paying verifies smaller trees first."""
  from jaxinfer.speculative.dynamic_tree import EagleTree
  replace = dataclasses.replace
  if isinstance(proposer, EagleTree):
    n = proposer.num_nodes // 2
    return None if n < 1 else replace(proposer, num_nodes=n, top_k=min(proposer.top_k, n),
                                      depth=min(proposer.depth, n))
  if isinstance(proposer, _Chain):
    n = proposer.num_draft_tokens // 2
    return None if n < 1 else replace(proposer, num_draft_tokens=n)
  if isinstance(proposer, Lookahead):
    n = proposer.num_nodes // 2
    return None if n < 1 else replace(proposer, num_nodes=n, depth=min(proposer.depth, n))
  if isinstance(proposer, Recycling):
    b = list(proposer.branching)
    if max(b) > 1:  # halve the widest level (the first of equals)
      i = b.index(max(b))
      b[i] //= 2
    elif len(b) > 1:  # a chain: half as deep
      b = b[:len(b) // 2]
    else:
      return None
    return replace(proposer, branching=tuple(b))
  if isinstance(proposer, _HeadsTree):
    n = len(proposer.paths) // 2
    return None if n < 1 else replace(proposer, paths=_keep_paths(proposer.paths,
                                                                  proposer.accuracy, n))
  return None
