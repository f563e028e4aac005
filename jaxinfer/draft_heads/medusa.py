"""Medusa-1 draft heads: training on a frozen base (the heads, their forward, tree and files
are `medusa_serve`).

K heads on the base's last hidden state h_t (after the final norm). Head k (k = 0..K-1) is a
residual block x = h + SiLU(W_k h + b_k) (W_k, b_k zero-initialised: each head starts as the base's
own next-token predictor) followed by its own vocabulary projection (initialised from the base's
output projection), and predicts the token k + 2 places after t (the base predicts t + 1).
Every head has its own weights (no accidental tying). The loss is sum_k 0.2 * 0.8^k * CE_k with
the base frozen (its forward runs under stop_gradient; only the heads are trained).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads import recipe
from jaxinfer.draft_heads.hidden_cache import tokens_and_hidden
from jaxinfer.draft_heads.medusa_serve import (CONFIG, FORMAT, MedusaHeads,  # noqa: F401
                                               MedusaTree, build_tree, head_logits, load,
                                               save, tree_parents)


def init_heads(base: M.Transformer, num_heads: int) -> MedusaHeads:
  out = M.output_projection(base)  # (D, V)
  d = out.shape[0]
  return MedusaHeads(w=jnp.zeros((num_heads, d, d), out.dtype),
                     b=jnp.zeros((num_heads, d), out.dtype),
                     proj=jnp.broadcast_to(out, (num_heads,) + out.shape).copy())


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


def train_heads(cfg: ModelConfig, base: M.Transformer, train_tokens: np.ndarray,
                held_tokens: np.ndarray, workdir: str | Path, *, num_heads: int = 4,
                tree_nodes: int = 16, steps: int = 600, batch_size: int = 16, seq_len: int = 256,
                learning_rate: float = 3e-3, warmup_steps: int = 30, checkpoint_every: int = 100,
                seed: int = 0, mesh=None, hidden_cache=None, progress: bool = True
                ) -> tuple[MedusaHeads, dict[str, Any]]:
  """Trains heads (resuming from `workdir`), then measures per-head top-k accuracy on held-out
  tokens and builds the static tree from it. Returns the heads and their info for `save`."""
  from jaxinfer.train.loop import train
  windows, held, tcfg = recipe.training_setup(
      train_tokens, held_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, steps=steps,
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      checkpoint_every=checkpoint_every, progress=progress)
  batches = recipe.train_batches(windows, train_tokens, hidden_cache, base, cfg,
                                batch_size=batch_size, seq_len=seq_len, seed=seed,
                                progress=progress)
  probe = list(held.sequential(max_batches=8))
  evaluate = lambda h, step: recipe.eval_record(topk_accuracy(h, base, cfg, probe), tree_nodes)
  heads, logged = train(medusa_loss_fn(cfg), init_heads(base, num_heads), batches, tcfg, workdir,
                        frozen=base, eval_fn=evaluate, eval_every=recipe.eval_every(steps),
                        mesh=mesh, description="train-draft")
  recipe.plot(workdir, "Medusa-1 heads")
  accuracy = topk_accuracy(heads, base, cfg, held.sequential(max_batches=64))
  info = dict({"method": "medusa", "steps": steps, "train_tokens": int(len(train_tokens))},
              **recipe.tree_info(accuracy, build_tree(accuracy, tree_nodes)))
  return heads, info
