"""Medusa-1 draft heads: training on a frozen base, the static tree, and their files.

K heads on the base's last hidden state h_t (after the final norm). Head k (k = 0..K-1) is a
residual block x = h + SiLU(W_k h + b_k) (W_k, b_k zero-initialised: each head starts as the base's
own next-token predictor) followed by its own vocabulary projection (initialised from the base's
output projection), and predicts the token k + 2 places after t (the base predicts t + 1).
Every head has its own weights (no accidental tying). The loss is sum_k 0.2 * 0.8^k * CE_k with
the base frozen (its forward runs under stop_gradient; only the heads are trained).
"""

from __future__ import annotations

import dataclasses
import heapq
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads import files
from jaxinfer.draft_heads.hidden_cache import tokens_and_hidden

FORMAT = "jaxinfer-medusa-1"


@struct.dataclass
class MedusaHeads:
  w: jax.Array  # (K, D, D)
  b: jax.Array  # (K, D)
  proj: jax.Array  # (K, D, V)

  @property
  def num_heads(self) -> int:
    return self.w.shape[0]


def init_heads(base: M.Transformer, num_heads: int) -> MedusaHeads:
  out = M.output_projection(base)  # (D, V)
  d = out.shape[0]
  return MedusaHeads(w=jnp.zeros((num_heads, d, d), out.dtype),
                     b=jnp.zeros((num_heads, d), out.dtype),
                     proj=jnp.broadcast_to(out, (num_heads,) + out.shape).copy())


def head_logits(heads: MedusaHeads, hidden: jax.Array) -> jax.Array:
  """hidden (..., D) -> (K, ..., V) float32 logits of every head."""
  x = hidden[None] + jax.nn.silu(
      jnp.einsum("...d,kde->k...e", hidden, heads.w) + heads.b.reshape(
          (heads.num_heads,) + (1,) * (hidden.ndim - 1) + (-1,)))
  return jnp.einsum("k...d,kdv->k...v", x, heads.proj, preferred_element_type=jnp.float32)


def head_weights(num_heads: int) -> jax.Array:
  return 0.2 * 0.8 ** jnp.arange(num_heads, dtype=jnp.float32)


def heads_loss(heads: MedusaHeads, hidden: jax.Array, batch: jax.Array):
  """Medusa's loss sum_k 0.2 * 0.8^k * CE_k of the heads on the base's hidden states (B, T, D)
  for tokens batch (B, T+1), and per-head top-1 accuracy."""
  logits = head_logits(heads, hidden)  # (K, B, T, V)
  k_heads, _, t, _ = logits.shape
  losses, metrics = [], {}
  for k in range(k_heads):
    shift = k + 2  # head k at position t predicts the token at t + k + 2 (= batch[t + k + 2])
    lg = logits[k, :, :t + 1 - shift]
    target = batch[:, shift:]
    logz = jax.nn.logsumexp(lg, -1)
    gold = jnp.take_along_axis(lg, target[..., None], -1)[..., 0]
    losses.append(jnp.mean(logz - gold))
    metrics[f"head{k}_top1"] = jnp.mean(jnp.argmax(lg, -1) == target)
  return jnp.sum(head_weights(k_heads) * jnp.stack(losses)), metrics


def medusa_loss_fn(cfg: ModelConfig):
  """loss_fn(heads, base, batch, rng) for the shared training loop; batch: token windows
  (B, T+1) or a hidden-state cache's batches."""

  def loss_fn(heads: MedusaHeads, base: M.Transformer, batch, rng):
    del rng
    tokens, hidden = tokens_and_hidden(base, batch, cfg)  # the base is frozen
    return heads_loss(heads, hidden, tokens)

  return loss_fn


@partial(jax.jit, static_argnames=("cfg", "top"))
def _ranks(heads: MedusaHeads, base: M.Transformer, batch, cfg: ModelConfig, top: int):
  hidden = tokens_and_hidden(base, batch, cfg)[1]
  logits = head_logits(heads, hidden)
  out = []
  for k in range(heads.num_heads):
    shift = k + 2
    cand = jax.lax.top_k(logits[k, :, :hidden.shape[1] + 1 - shift], top)[1]
    target = batch[:, shift:]
    out.append(jnp.sum(cand == target[..., None], axis=(0, 1)))  # (top,)
  return jnp.stack(out)


def topk_accuracy(heads: MedusaHeads, base: M.Transformer, cfg: ModelConfig, batches,
                  top: int = 10) -> np.ndarray:
  """(K, top): how often head k's i-th ranked candidate is the right token (held-out batches)."""
  hits, count = None, np.zeros(heads.num_heads)
  for batch in batches:
    h = np.asarray(_ranks(heads, base, jnp.asarray(batch), cfg, top))
    hits = h if hits is None else hits + h
    count += np.array([batch.shape[0] * (batch.shape[1] - 1 - (k + 1))
                       for k in range(heads.num_heads)])
  if hits is None:
    raise ValueError("topk_accuracy: no held-out batches")
  return hits / count[:, None]


def build_tree(accuracy: np.ndarray, num_nodes: int) -> list[tuple[int, ...]]:
  """Medusa's static tree: the `num_nodes` candidate paths (rank of the candidate taken from
  each head, depth d using head d - 1) of highest expected acceptance prod_j accuracy[j, r_j],
  grown greedily from the root so that every path's prefix is in the tree. Breadth-first order."""
  k, top = accuracy.shape
  chosen: list[tuple[int, ...]] = []
  heap = [(-accuracy[0, r], (r,)) for r in range(top)]
  heapq.heapify(heap)
  while heap and len(chosen) < num_nodes:
    neg, path = heapq.heappop(heap)
    chosen.append(path)
    if len(path) < k:
      for r in range(top):
        heapq.heappush(heap, (neg * accuracy[len(path), r], path + (r,)))
  return sorted(chosen, key=lambda p: (len(p), p))


def tree_parents(paths: list[tuple[int, ...]]) -> np.ndarray:
  """Parents of [root] + paths (breadth-first, prefix-closed)."""
  index = {(): 0}
  parents = [-1]
  for i, p in enumerate(paths, start=1):
    index[p] = i
    parents.append(index[p[:-1]])
  return np.asarray(parents, np.int32)


def save(directory: str | Path, heads: MedusaHeads, info: dict[str, Any]) -> Path:
  """heads.safetensors + medusa_config.json (format, shapes, tree, accuracies, training info)."""
  tensors = {"w": np.asarray(heads.w, np.float32), "b": np.asarray(heads.b, np.float32),
             "proj": np.asarray(heads.proj, np.float32)}
  config = dict(info, format=FORMAT, num_heads=heads.num_heads, hidden_size=heads.w.shape[1],
                vocab_size=heads.proj.shape[2])
  return files.write(directory, "heads.safetensors", tensors, "medusa_config.json", config)


def load(directory: str | Path, dtype=jnp.float32) -> tuple[MedusaHeads, dict[str, Any]]:
  t, config = files.read(directory, "heads.safetensors", "medusa_config.json", FORMAT,
                         "Medusa heads")
  heads = MedusaHeads(*(jnp.asarray(t[n], dtype) for n in ("w", "b", "proj")))
  if heads.proj.shape[2] != config["vocab_size"]:
    raise ValueError(f"{directory}: heads.safetensors does not match medusa_config.json")
  return heads, config


@dataclasses.dataclass(frozen=True)
class MedusaTree:
  """The static tree a proposer drafts: candidate paths of head ranks."""

  paths: tuple[tuple[int, ...], ...]

  @property
  def max_rank(self) -> int:
    return 1 + max(max(p) for p in self.paths)


def train_heads(cfg: ModelConfig, base: M.Transformer, train_tokens: np.ndarray,
                held_tokens: np.ndarray, workdir: str | Path, *, num_heads: int = 4,
                tree_nodes: int = 16, steps: int = 600, batch_size: int = 16, seq_len: int = 256,
                learning_rate: float = 3e-3, warmup_steps: int = 30, checkpoint_every: int = 100,
                seed: int = 0, mesh=None, hidden_cache=None, progress: bool = True
                ) -> tuple[MedusaHeads, dict[str, Any]]:
  """Trains heads (resuming from `workdir`), then measures per-head top-k accuracy on held-out
  tokens and builds the static tree from it. Returns the heads and their info for `save`."""
  from jaxinfer.train.loop import train
  windows, held, tcfg = files.training_setup(
      train_tokens, held_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, steps=steps,
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      checkpoint_every=checkpoint_every, progress=progress)
  batches = files.train_batches(windows, train_tokens, hidden_cache, base, cfg,
                                batch_size=batch_size, seq_len=seq_len, seed=seed,
                                progress=progress)
  probe = list(held.sequential(max_batches=8))
  evaluate = lambda h, step: files.eval_record(topk_accuracy(h, base, cfg, probe), tree_nodes)
  heads, logged = train(medusa_loss_fn(cfg), init_heads(base, num_heads), batches, tcfg, workdir,
                        frozen=base, eval_fn=evaluate, eval_every=files.eval_every(steps),
                        mesh=mesh, description="train-draft")
  files.plot(workdir, "Medusa-1 heads")
  accuracy = topk_accuracy(heads, base, cfg, held.sequential(max_batches=64))
  info = dict({"method": "medusa", "steps": steps, "train_tokens": int(len(train_tokens))},
              **files.tree_info(accuracy, build_tree(accuracy, tree_nodes)))
  return heads, info
