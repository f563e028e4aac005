"""EAGLE-2 dynamic draft trees: the EAGLE draft layer grows each row's own tree by cumulative
draft log-probability, then keeps the best `num_nodes` nodes for verification.

Per step and row: the draft catches up on the last accepted path (as the chain proposer does)
and scores the root's children; the top `top_k` become the depth-1 frontier. At each further
depth, every frontier node is fed through the draft layer — attending to the draft's cache
prefix and to its own ancestors in the tree (`_TreeDraftCache`) — and proposes its `top_k`
children, scored by the sum of draft log-probs along the path; the best `top_k` of those
`top_k`² become the next frontier. Every scored node joins a pool (top_k + (depth - 1) top_k²
nodes); the `num_nodes` best of the pool are the draft tree (reranking). A child scores strictly
below its parent, so the kept set is closed under taking parents. Drafts are distinct top-k
tokens per parent, so verification uses the deterministic-drafts exact rule (lossless for
sampling rows too). Shapes are static; each row's tree (its parents) is its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.attention import MASK_VALUE
from jaxinfer.draft_heads.eagle_serve import draft_forward
from jaxinfer.speculative.proposers.common import root_only
from jaxinfer.speculative.proposers.eagle import Eagle
from jaxinfer.speculative.proposers.pending import EagleState, attach, detach
from jaxinfer.speculative.protocol import Context, Draft

_DEPTH_PENALTY = 1e-4  # makes a child's score strictly lower than its parent's


def check_shape(num_nodes: int, top_k: int, depth: int) -> None:
  """A tree of `num_nodes` can be kept from the pool of top_k + (depth - 1) top_k^2 nodes."""
  pool = top_k + (depth - 1) * top_k**2
  if top_k < 1 or depth < 1 or not 1 <= num_nodes <= pool:
    raise ValueError(f"need top_k >= 1, depth >= 1 and 1 <= nodes <= top_k + (depth - 1) * "
                     f"top_k^2 = {pool}; got nodes={num_nodes}, top_k={top_k}, depth={depth}")


@struct.dataclass
class _TreeDraftLayer:
  """The draft layer's keys and values while growing a tree: the cache prefix (read only,
  positions < prefix_len) and the frontier nodes scored so far (slots of `tk`, `tv`)."""

  k: jax.Array  # (K, B, S, H)
  v: jax.Array
  tk: jax.Array  # (K, B, Nt, H)
  tv: jax.Array
  prefix_len: jax.Array  # (B,)
  mask: jax.Array  # (B, T, Nt): the tree slots each query sees (its ancestors and itself)
  offset: int = struct.field(pytree_node=False)  # where this forward's T nodes are written

  def write(self, k, v, positions):
    del positions
    at = (0, 0, self.offset, 0)
    put = lambda buf, new: jax.lax.dynamic_update_slice(
        buf, new.transpose(2, 0, 1, 3).astype(buf.dtype), at)
    return self.replace(tk=put(self.tk, k), tv=put(self.tv, v))

  def attend(self, impl, q, positions, *, window=None, sinks=0, **kw):
    """The prefix keys a query sees (positions < prefix_len, within `window` of the query's
    position or among the first `sinks`: the layer's pattern) and its tree ancestors (all
    within the window: a tree fits it)."""
    del impl, kw
    b, t, n, h = q.shape
    kh, s = self.k.shape[0], self.k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h).transpose(2, 0, 3, 1, 4)  # (K,B,G,T,H)
    scale = h**-0.5
    s1 = jnp.einsum("kbgth,kbsh->kbgts", qg, self.k, preferred_element_type=jnp.float32)
    s2 = jnp.einsum("kbgth,kbnh->kbgtn", qg, self.tk, preferred_element_type=jnp.float32)
    key_pos = jnp.arange(s)[None, None, :]
    seen = key_pos < self.prefix_len[:, None, None]  # (B,T,S)
    if window is not None:
      seen &= (key_pos > positions[:, :, None] - window) | (key_pos < sinks)
    s1 = jnp.where(seen[None, :, None], s1 * scale, MASK_VALUE)
    s2 = jnp.where(self.mask[None, :, None], s2 * scale, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([s1, s2], axis=-1), axis=-1)
    out = (jnp.einsum("kbgts,kbsh->kbgth", probs[..., :s].astype(self.v.dtype), self.v,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("kbgtn,kbnh->kbgth", probs[..., s:].astype(self.tv.dtype), self.tv,
                        preferred_element_type=jnp.float32))
    return out.transpose(1, 3, 0, 2, 4).reshape(b, t, n, h).astype(q.dtype)


@struct.dataclass
class _TreeDraftCache:
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  tk: tuple[jax.Array, ...]
  tv: tuple[jax.Array, ...]
  prefix_len: jax.Array
  mask: jax.Array
  offset: int = struct.field(pytree_node=False)

  def layer(self, i: int) -> _TreeDraftLayer:
    return _TreeDraftLayer(self.k[i], self.v[i], self.tk[i], self.tv[i], self.prefix_len,
                           self.mask, self.offset)

  def with_layers(self, layers) -> "_TreeDraftCache":
    return self.replace(tk=tuple(l.tk for l in layers), tv=tuple(l.tv for l in layers))


@dataclasses.dataclass(frozen=True)
class EagleTree(Eagle):
  """EAGLE with EAGLE-2 dynamic trees: `num_nodes` drafted nodes per row, chosen from a pool
  grown `depth` levels deep with `top_k` children per frontier node."""

  num_nodes: int = 16
  top_k: int = 4
  depth: int = 4
  name: str = "eagle"

  def __post_init__(self):
    try:
      check_shape(self.num_nodes, self.top_k, self.depth)
    except ValueError as e:
      raise ValueError(f"dynamic tree: {e}") from None

  @property
  def tree_size(self) -> int:
    return self.num_nodes + 1

  @property
  def max_depth(self) -> int:
    return min(self.depth, self.num_nodes)

  is_chain = False

  def shrink(self):
    n = self.num_nodes // 2
    return None if n < 1 else dataclasses.replace(self, num_nodes=n, top_k=min(self.top_k, n),
                                                  depth=min(self.depth, n))

  def draft(self, weights, st: EagleState, ctx: Context):
    heads, base = weights
    draft = heads.draft
    b, k = st.tokens.shape[0], self.top_k
    rows = jnp.arange(b)
    st = attach(st, ctx.pages)
    root_feat, cache = self.catch_up(heads, base, st)  # (B, D): scores the root's children
    prefix = cache if ctx.pages is None else cache.rows(self.cfg.head_dim)  # (its rows' pages)

    def children(feat, score):
      """Top-k children of each node: tokens and cumulative scores (B, n, k)."""
      # (whole on each device: over a vocabulary split as the target's, top-k moved it about)
      lp, idx = self.runtime.replicated(lambda l: jax.lax.top_k(jax.nn.log_softmax(l), k))(
          heads.logits(base, feat, self.runtime))
      return heads.token_ids(idx).astype(jnp.int32), score[..., None] + lp - _DEPTH_PENALTY

    tok, score = children(root_feat[:, None], jnp.zeros((b, 1)))
    tok, score = tok[:, 0], score[:, 0]  # (B, k): depth-1 nodes
    pool_tok, pool_score, pool_parent = [tok], [score], [jnp.full((b, k), -1, jnp.int32)]
    front_tok, front_score, front_pool = tok, score, jnp.broadcast_to(jnp.arange(k), (b, k))
    front_feat = jnp.broadcast_to(root_feat[:, None], (b, k, root_feat.shape[-1]))
    slots = (self.depth - 1) * k
    kh, hd = prefix.k[0].shape[0], prefix.k[0].shape[3]
    tk = tv = jnp.zeros((kh, b, max(slots, 1), hd), cache.k[0].dtype)
    ancestors = jnp.zeros((b, k, max(slots, 1)), bool)
    pool_size = k
    for d in range(1, self.depth):  # feed the depth-d frontier, score depth d + 1
      offset = (d - 1) * k
      mask = ancestors | (jnp.arange(max(slots, 1)) == offset + jnp.arange(k)[:, None])[None]
      tree_cache = _TreeDraftCache(prefix.k, prefix.v, (tk,), (tv,), ctx.length, mask, offset)
      pos = jnp.broadcast_to((ctx.length + d - 1)[:, None], (b, k))
      out, tree_cache = draft_forward(draft, base, front_feat, front_tok, pos, self.cfg,
                                      tree_cache, kv_source="cache",
                                      runtime=self.draft_runtime)
      tk, tv = tree_cache.tk[0], tree_cache.tv[0]
      c_tok, c_score = children(out, front_score)  # (B, k, k)
      c_tok, c_score = c_tok.reshape(b, k * k), c_score.reshape(b, k * k)
      pool_tok.append(c_tok)
      pool_score.append(c_score)
      pool_parent.append(jnp.repeat(front_pool, k, axis=1))
      if d + 1 < self.depth:  # the next frontier: the best k of the k^2 children
        front_score, pick = jax.lax.top_k(c_score, k)
        parent = pick // k
        front_tok = jnp.take_along_axis(c_tok, pick, axis=1)
        front_pool = pool_size + pick
        front_feat = jnp.take_along_axis(out, parent[..., None], axis=1)
        ancestors = jnp.take_along_axis(mask, parent[..., None], axis=1)
      pool_size += k * k
    pool_tok = jnp.concatenate(pool_tok, axis=1)  # (B, P), parents before children
    pool_score = jnp.concatenate(pool_score, axis=1)
    pool_parent = jnp.concatenate(pool_parent, axis=1)
    keep = jnp.sort(jax.lax.top_k(pool_score, self.num_nodes)[1], axis=1)  # (B, N)
    node_of = jnp.zeros((b, pool_size), jnp.int32).at[rows[:, None], keep].set(
        jnp.arange(1, self.num_nodes + 1, dtype=jnp.int32))
    par = jnp.take_along_axis(pool_parent, keep, axis=1)
    parents = jnp.where(par < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(par, 0), axis=1))
    tokens = jnp.concatenate([root_only(ctx)[:, None],
                              jnp.take_along_axis(pool_tok, keep, axis=1)], axis=1)
    parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parents], axis=1)
    return detach(st.replace(cache=cache), ctx.pages), Draft(tokens, parents, None)
