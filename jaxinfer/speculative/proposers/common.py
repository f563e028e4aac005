"""What the proposers share: tree shapes, the root, drawing a draft token, chains, static trees
of draft heads, and the pages of a draft cache a reused prefix copies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling import argmax, distribution
from jaxinfer.speculative.protocol import Context, Draft, Proposer  # noqa: F401


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


def root_only(ctx: Context) -> jax.Array:
  return jnp.take_along_axis(ctx.history, ctx.length[:, None], axis=1)[:, 0]


def filtered(logits: jax.Array, ctx: Context, runtime) -> jax.Array:
  """The rows' filtered distributions (B, V) of a draft's logits, whole on each device of the
  target's mesh (`runtime`): split over the vocabulary as the target's logits are, sorting and
  filtering them moved rows x vocabulary arrays between devices at every draft step (EAGLE on
  Llama-3-8B over --mesh=model:4: 7.8 GiB of a verification dispatch's collectives)."""
  return runtime.replicated(lambda l, sp: distribution(l, sp, ctx.greedy_only))(
      logits, ctx.sampling)


def draw(q: jax.Array, ctx: Context, i: int) -> jax.Array:
  """Draft token i of each row: sampled from q (B, V) for sampling rows, its argmax for greedy
  ones; the draw (V random numbers per row) only runs when some row samples."""
  greedy = argmax(q)
  if ctx.greedy_only:
    return greedy

  def sample(_):
    key = jax.vmap(lambda k: jax.random.fold_in(k, i))(ctx.keys)
    sampled = jax.vmap(jax.random.categorical)(key, jnp.log(q)).astype(jnp.int32)
    return jnp.where(ctx.sampling.temperature > 0, sampled, greedy)

  return jax.lax.cond(jnp.any(ctx.sampling.temperature > 0), sample, lambda _: greedy, None)


class Chain(Proposer):
  """A proposer that drafts a chain of `num_draft_tokens` after the root."""

  num_draft_tokens: int

  @property
  def tree_size(self) -> int:
    return self.num_draft_tokens + 1

  @property
  def max_depth(self) -> int:
    return self.num_draft_tokens

  def shrink(self):
    n = self.num_draft_tokens // 2
    return None if n < 1 else dataclasses.replace(self, num_draft_tokens=n)


class HeadsTree(Proposer):
  """Heads on the target's hidden state at the last accepted token, drafting a static tree of
  `paths` (head ranks per depth, breadth-first). The proposer's state is that hidden state
  (B, D), refreshed from every verification."""

  paths: tuple[tuple[int, ...], ...]
  # the heads' measured top-k accuracy per head (K, top), if known: it ranks the paths that a
  # smaller tree keeps (`shrink`)
  accuracy: tuple[tuple[float, ...], ...] | None = None
  needs_draft_params = True
  drafts_from_hidden = True

  @property
  def tree_size(self) -> int:
    return 1 + len(self.paths)

  @property
  def max_depth(self) -> int:
    return max(len(p) for p in self.paths)

  def shrink(self):
    n = len(self.paths) // 2
    return None if n < 1 else dataclasses.replace(self, paths=keep_paths(self.paths,
                                                                         self.accuracy, n))

  def row_state(self, weights, state, prompt):
    return prompt.last  # the hidden state that predicted the first token

  def observe(self, weights, state, verified):
    return jnp.where(verified.live[:, None], self.update(state, verified.hidden, verified.path,
                                                         verified.num_accepted), state)

  def update(self, hidden_state, verify_hidden, path, num_accepted):
    """The hidden state at the last accepted node (it predicted the next root)."""
    rows = jnp.arange(path.shape[0])
    return verify_hidden[rows, path[rows, num_accepted]]


def keep_paths(paths, accuracy, n: int) -> tuple[tuple[int, ...], ...]:
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
  return proposer.shrink()
