"""Medusa-1 draft heads at serving time: the heads, their forward, the static tree and their files.

K heads on the base's last hidden state h_t (after the final norm). Head k (k = 0..K-1) is a
residual block x = h + SiLU(W_k h + b_k) followed by its own vocabulary projection, and predicts
the token k + 2 places after t (the base predicts t + 1). Every head has its own weights (no
accidental tying). Training them is `medusa`.
"""

from __future__ import annotations

import dataclasses
import heapq
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.draft_heads import files

FORMAT = "jaxinfer-medusa-1"
CONFIG = "medusa_config.json"  # beside the weights: its format, shapes and training info


@struct.dataclass
class MedusaHeads:
  w: jax.Array  # (K, D, D)
  b: jax.Array  # (K, D)
  proj: jax.Array  # (K, D, V)

  @property
  def num_heads(self) -> int:
    return self.w.shape[0]


def head_logits(heads: MedusaHeads, hidden: jax.Array) -> jax.Array:
  """hidden (..., D) -> (K, ..., V) float32 logits of every head."""
  x = hidden[None] + jax.nn.silu(
      jnp.einsum("...d,kde->k...e", hidden, heads.w) + heads.b.reshape(
          (heads.num_heads,) + (1,) * (hidden.ndim - 1) + (-1,)))
  return jnp.einsum("k...d,kdv->k...v", x, heads.proj, preferred_element_type=jnp.float32)


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


@dataclasses.dataclass(frozen=True)
class MedusaTree:
  """The static tree a proposer drafts: candidate paths of head ranks."""

  paths: tuple[tuple[int, ...], ...]

  @property
  def max_rank(self) -> int:
    return 1 + max(max(p) for p in self.paths)


def save(directory: str | Path, heads: MedusaHeads, info: dict[str, Any]) -> Path:
  """heads.safetensors + medusa_config.json (format, shapes, tree, accuracies, training info)."""
  tensors = {"w": np.asarray(heads.w, np.float32), "b": np.asarray(heads.b, np.float32),
             "proj": np.asarray(heads.proj, np.float32)}
  config = dict(info, format=FORMAT, num_heads=heads.num_heads, hidden_size=heads.w.shape[1],
                vocab_size=heads.proj.shape[2])
  return files.write(directory, "heads.safetensors", tensors, CONFIG, config)


def load(directory: str | Path, dtype=jnp.float32) -> tuple[MedusaHeads, dict[str, Any]]:
  t, config = files.read(directory, "heads.safetensors", CONFIG, FORMAT,
                         "Medusa heads")
  lacks = [n for n in ("w", "b", "proj") if n not in t]
  if lacks:  # (e.g. Hydra's heads.safetensors)
    raise ValueError(f"{directory}: heads.safetensors lacks {lacks}: not Medusa heads")
  heads = MedusaHeads(*(jnp.asarray(t[n], dtype) for n in ("w", "b", "proj")))
  n, hidden = config["num_heads"], config["hidden_size"]
  if (heads.w.shape[:2], heads.b.shape[:2], heads.proj.shape) != (
      (n, hidden), (n, hidden), (n, hidden, config["vocab_size"])):
    raise ValueError(f"{directory}: heads.safetensors does not match {CONFIG}")
  return heads, config
