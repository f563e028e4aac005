"""Verification of draft trees: which drafted tokens the target accepts, as pure functions.

B rows, T tree nodes (node 0 is the root: the last committed token; nodes in breadth-first
order, so a node's parent has a smaller index), V vocabulary, D = T - 1 the deepest possible path.

Every rule walks the tree from the root: at the current node it tries the node's children in
index order; accepting a child moves there, rejecting all of them stops. The walk returns the
accepted path and one more token drawn at the node where it stopped (the correction after a
rejection, or the bonus token after a leaf), so each verification emits `accepted + 1` tokens.

- "exact" with draft distributions `q` (SpecInfer / EAGLE-1 form, a node's children drawn from
  q *without replacement*: each from q with the earlier siblings' tokens removed): child x_j is
  accepted with probability min(1, r(x_j) / q_j(x_j)), q_j being q at the parent with the
  earlier siblings' tokens removed and renormalised; on rejection r <- norm(max(0, r - q_j)).
  A child q_j could not have drawn is rejected and leaves r as it was.
  The emitted token is drawn from r where the walk stops. A chain is the one-child case
  (Leviathan et al. / Chen et al. rejection sampling).
- "exact" without `q` (deterministic drafts: distinct top-k, n-gram, trie): the same rule with
  q_j one-hot, i.e. accept x_j with probability r(x_j), on rejection zero it and renormalise.
- temperature 0 (greedy): p is one-hot at the argmax, so a child is accepted iff it is the
  argmax, and the emitted token is the argmax where the walk stops — plain greedy decoding.
- "typical" (Medusa; lossy): accept x_j iff p(x_j) > min(eps, delta * exp(-H(p))), p being the
  target at the parent; the emitted token is drawn from p where the walk stops.

Both exact forms leave the distribution of every emitted token equal to the target's p
(tests/test_acceptance.py checks it by chi-square, and checks that a broken rule fails).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.sampling import argmax

EXACT, TYPICAL = "exact", "typical"


@dataclasses.dataclass(frozen=True)
class Typical:
  """Medusa's typical acceptance thresholds (its defaults)."""

  eps: float = 0.09
  delta: float = 0.3


@struct.dataclass
class Verdict:
  path: jax.Array  # (B, T) node index at each depth of the accepted path; path[:, 0] = 0
  num_accepted: jax.Array  # (B,) drafted tokens accepted (the path's length minus the root)
  next_token: jax.Array  # (B,) the token emitted after the accepted path


def _normalise(x: jax.Array) -> jax.Array:
  total = x.sum(axis=-1, keepdims=True)
  return x / jnp.where(total > 0, total, 1.0)


def verify_greedy(tokens: jax.Array, parents: jax.Array, target: jax.Array) -> Verdict:
  """Greedy verification from the target's argmax at every node, target (B, T): accept a child
  iff it is the argmax at its parent; emit the argmax where the walk stops. The same walk as
  `verify` with greedy rows, on (B, T) integers only (no vocabulary-sized work)."""
  b, t = tokens.shape
  parents = jnp.broadcast_to(parents, (b, t)).astype(jnp.int32)
  rows = jnp.arange(b)

  def body(j, state):
    cur, depth, path = state
    accept = (parents[:, j] == cur) & (tokens[:, j] == target[rows, cur])
    depth = depth + accept
    path = path.at[rows, jnp.where(accept, depth, t)].set(j, mode="drop")
    return jnp.where(accept, j, cur), depth, path

  init = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b, t), jnp.int32))
  cur, depth, path = jax.lax.fori_loop(1, t, body, init)
  return Verdict(path, depth, target[rows, cur].astype(jnp.int32))


def _residual(r: jax.Array, qj: jax.Array) -> jax.Array:
  """The distribution left after rejecting a draft from qj: norm(max(0, r - qj)); r itself if
  that is numerically empty (then qj == r, and rejection had probability 0)."""
  left = _normalise(jnp.maximum(r - qj, 0.0))
  return jnp.where(left.sum(-1, keepdims=True) > 0, left, r)


def verify(key: jax.Array, p: jax.Array, tokens: jax.Array, parents: jax.Array,
           q: jax.Array | None = None, *, greedy: jax.Array | None = None,
           rule: str = EXACT, typical: Typical = Typical()) -> Verdict:
  """Walks each row's tree.

  key: (B,) keys, one per row. p: (B, T, V) target distributions at every node (already
  filtered by temperature / top-k / top-p / min-p). tokens: (B, T) drafted token of each node
  (tokens[:, 0], the root, is ignored). parents: (B, T) or (T,) parent node index (-1 for the
  root; -1 for a padding node that is never tried). q: (B, T, V) the draft distribution at each
  node that its children were sampled from (without replacement), or None for deterministic
  drafts. greedy: (B,) bool, rows that decode greedily (argmax instead of sampling).
  """
  b, t, v = p.shape
  if rule not in (EXACT, TYPICAL):
    raise ValueError(f"verify: rule must be {EXACT!r} or {TYPICAL!r}, got {rule!r}")
  parents = jnp.broadcast_to(parents, (b, t)).astype(jnp.int32)
  greedy = jnp.zeros((b,), bool) if greedy is None else greedy
  p = p.astype(jnp.float32)
  # Greedy rows verify against the one-hot argmax: accept only the argmax, emit the argmax.
  p = jnp.where(greedy[:, None, None], jax.nn.one_hot(argmax(p), v, dtype=p.dtype), p)
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(key)
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (t,)))(keys[:, 0])  # one per node
  rows = jnp.arange(b)
  if rule == TYPICAL:
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    threshold = jnp.minimum(typical.eps, typical.delta * jnp.exp(-entropy))  # (B, T)

  def body(j, state):
    cur, r, tried, depth, path = state
    tok = tokens[:, j]
    candidate = parents[:, j] == cur
    if rule == TYPICAL:
      accept = p[rows, cur, tok] > threshold[rows, cur]
    else:
      if q is None:
        qj = jax.nn.one_hot(tok, v, dtype=r.dtype)
      else:
        qj = _normalise(jnp.where(tried, 0.0, q[rows, cur].astype(jnp.float32)))
      drawable = qj[rows, tok] > 0  # else rejected, r kept: q_j did not draw it
      ratio = r[rows, tok] / jnp.where(drawable, qj[rows, tok], 1.0)
      accept = drawable & (uniforms[:, j] < jnp.minimum(1.0, ratio))
      rejected = jnp.where(drawable[:, None], _residual(r, qj), r)
    accept &= candidate
    reject = candidate & ~accept
    moved_r = p[rows, j]
    if rule == TYPICAL:
      new_r = jnp.where(accept[:, None], moved_r, r)
    else:
      new_r = jnp.where(accept[:, None], moved_r, jnp.where(reject[:, None], rejected, r))
    new_tried = jnp.where(accept[:, None], False,
                          tried | (reject[:, None] & jax.nn.one_hot(tok, v, dtype=bool)))
    new_depth = depth + accept
    path = path.at[rows, jnp.where(accept, new_depth, t)].set(j, mode="drop")
    return jnp.where(accept, j, cur), new_r, new_tried, new_depth, path

  init = (jnp.zeros((b,), jnp.int32), p[:, 0], jnp.zeros((b, v), bool), jnp.zeros((b,), jnp.int32),
          jnp.zeros((b, t), jnp.int32))
  cur, r, _, depth, path = jax.lax.fori_loop(1, t, body, init)
  if rule == TYPICAL:
    r = p[rows, cur]
  logits = jnp.log(jnp.where(r > 0, r, 0.0))
  drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys[:, 1], logits)
  next_token = jnp.where(greedy, argmax(r), drawn).astype(jnp.int32)
  return Verdict(path, depth, next_token)
