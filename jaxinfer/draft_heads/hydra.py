"""Hydra draft heads: Medusa's heads made sequentially dependent, trained on a frozen base
(the heads, their forward and files are `hydra_serve`).

Head k (k = 0..K-1) drafts the token k + 1 places after the root r, from the base's hidden state
h at the token before the root *and* the embeddings of the tokens already on this tree path —
the root and the k drafts before it: x = [h; e(r); e(d_1); ...; e(d_k)] ((k + 2) D), then
y = h + W_out,k SiLU(W_in,k x + b_k) (W_out zero-initialised: each head starts as the base's own
next-token predictor) and its own vocabulary projection (initialised from the base's). Where a
Medusa head must guess every token on a path at once, a Hydra head sees which branch it is on,
so the candidates of one node's children differ with the node.

Deeper heads (`head_layers` L > 1, Hydra++ uses 4): after that first block, L - 1 residual
blocks y <- y + V_i SiLU(U_i y + c_i) per head (V_i zero-initialised, so the start is unchanged).

Hydra++'s prefix-attention layer (`prefix_layer=True`): one decoder layer (the base's layer
type, its own KV cache when serving) runs causally over the base's hidden states, and the heads
read its output s_t in place of h_t — context from the whole prefix, not one position's state.
Its output projections start at zero, so s_t = h_t / rms(h_t) and the heads start, as without
it, as the base's own next-token predictor. It is trained with the heads.

Training is teacher-forced on the data's own tokens (self-distilled data: the base's greedy
continuations), with Hydra's teacher loss: cross-entropy against the base's distribution at
the position being predicted, weighted sum_k 0.2 * 0.8^k as in Medusa. The static tree is
grown from the per-head top-k accuracies measured the same way on held-out data — accuracies
conditioned on the path so far being right, which is what acceptance at depth k + 1 needs.
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
from jaxinfer.draft_heads.hydra_serve import (FORMAT, HydraHeads, head_logits,  # noqa: F401
                                              is_hydra, load, prefix_config, prefix_forward,
                                              save)
from jaxinfer.draft_heads.medusa import build_tree, head_weights
from jaxinfer.quant import weight


def init_heads(base: M.Transformer, num_heads: int, key: jax.Array,
               prefix_cfg: ModelConfig | None = None, head_layers: int = 1) -> HydraHeads:
  """Heads on `base`, each `head_layers` residual blocks deep; with `prefix_cfg` (prefix_config
  of the base's), Hydra++'s prefix layer."""
  if head_layers < 1:
    raise ValueError(f"Hydra heads: head_layers must be >= 1, got {head_layers}")
  out = M.output_projection(base)  # (D, V)
  d = out.shape[0]
  keys = jax.random.split(key, 2 * num_heads + 1)
  w_in = tuple(jax.random.normal(keys[k], ((k + 2) * d, d), out.dtype) / np.sqrt((k + 2) * d)
               for k in range(num_heads))
  layer = norm = None
  if prefix_cfg is not None:
    layer = M.init_residual_layer(prefix_cfg, keys[-1], out.dtype)
    norm = jnp.ones((d,), out.dtype)
  blocks = {}
  if head_layers > 1:
    n = head_layers - 1
    blocks = dict(
        block_in=tuple(jax.random.normal(keys[num_heads + k], (n, d, d), out.dtype) / np.sqrt(d)
                       for k in range(num_heads)),
        block_b=tuple(jnp.zeros((n, d), out.dtype) for _ in range(num_heads)),
        block_out=tuple(jnp.zeros((n, d, d), out.dtype) for _ in range(num_heads)))
  return HydraHeads(w_in=w_in, b_in=tuple(jnp.zeros((d,), out.dtype) for _ in range(num_heads)),
                    w_out=tuple(jnp.zeros((d, d), out.dtype) for _ in range(num_heads)),
                    proj=jnp.broadcast_to(out, (num_heads,) + out.shape).copy(),
                    prefix=layer, prefix_norm=norm, **blocks)


def _teacher_forced(heads: HydraHeads, base: M.Transformer, cfg: ModelConfig, batch):
  """Per head k: (logits (B, n_k, V), base logits at the predicted position, target tokens)."""
  batch, hidden = tokens_and_hidden(base, batch, cfg)  # the base is frozen
  b, t = hidden.shape[:2]
  base_logits = jax.lax.stop_gradient(M.logits(base, hidden))  # (B,T,V)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  state = prefix_forward(heads, base, hidden, positions, prefix_config(cfg))[0]
  emb = jnp.take(weight(base.embed), batch, axis=0)  # (B,T+1,D)
  out = []
  for k in range(heads.num_heads):
    n = t - k - 1  # positions t' with x_{t'+k+2} in the window
    path = jnp.stack([emb[:, 1 + j:1 + j + n] for j in range(k + 1)], axis=2)  # (B,n,k+1,D)
    out.append((head_logits(heads, k, state[:, :n], path), base_logits[:, k + 1:k + 1 + n],
                batch[:, k + 2:k + 2 + n]))
  return out


def hydra_loss_fn(cfg: ModelConfig, *, teacher: bool = True):
  """loss_fn(heads, base, batch, rng) for the shared training loop (batch: token windows
  (B, T+1) or a hidden-state cache's batches); teacher=False
  trains on the data's tokens (hard labels) instead of the base's distribution."""

  def loss_fn(heads: HydraHeads, base: M.Transformer, batch, rng):
    del rng
    losses, metrics = [], {}
    for k, (lg, base_lg, target) in enumerate(_teacher_forced(heads, base, cfg, batch)):
      logp = jax.nn.log_softmax(lg)
      if teacher:
        losses.append(jnp.mean(-jnp.sum(jax.nn.softmax(base_lg) * logp, -1)))
      else:
        losses.append(jnp.mean(-jnp.take_along_axis(logp, target[..., None], -1)))
      metrics[f"head{k}_top1"] = jnp.mean(jnp.argmax(lg, -1) == target)
    return jnp.sum(head_weights(heads.num_heads) * jnp.stack(losses)), metrics

  return loss_fn


@partial(jax.jit, static_argnames=("cfg", "top"))
def _ranks(heads: HydraHeads, base: M.Transformer, batch, cfg: ModelConfig, top: int):
  out = []
  for lg, _, target in _teacher_forced(heads, base, cfg, batch):
    cand = jax.lax.top_k(lg, top)[1]
    out.append((jnp.sum(cand == target[..., None], axis=(0, 1)), target.size))
  return out


def topk_accuracy(heads: HydraHeads, base: M.Transformer, cfg: ModelConfig, batches,
                  top: int = 10) -> np.ndarray:
  """(K, top): how often head k's i-th ranked candidate is the right token, the path before it
  being right (teacher-forced, held-out batches)."""
  hits, count = np.zeros((heads.num_heads, top)), np.zeros(heads.num_heads)
  for batch in batches:
    for k, (h, n) in enumerate(_ranks(heads, base, jnp.asarray(batch), cfg, top)):
      hits[k] += np.asarray(h)
      count[k] += int(n)
  if not count.all():
    raise ValueError("topk_accuracy: no held-out batches")
  return hits / count[:, None]


def train_heads(cfg: ModelConfig, base: M.Transformer, train_tokens: np.ndarray,
                held_tokens: np.ndarray, workdir: str | Path, *, num_heads: int = 4,
                tree_nodes: int = 16, steps: int = 600, batch_size: int = 16, seq_len: int = 256,
                learning_rate: float = 3e-3, warmup_steps: int = 30, checkpoint_every: int = 100,
                seed: int = 0, teacher: bool = True, prefix_layer: bool = False,
                head_layers: int = 1, mesh=None, hidden_cache=None, progress: bool = True
                ) -> tuple[HydraHeads, dict[str, Any]]:
  """Trains Hydra heads (resuming from `workdir`), measures their held-out top-k accuracies and
  builds the static tree from them. Returns the heads and their info for `save`.
  prefix_layer: with Hydra++'s prefix-attention layer; head_layers: residual blocks per head."""
  from jaxinfer.train.loop import train
  windows, held, tcfg = recipe.training_setup(
      train_tokens, held_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, steps=steps,
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      checkpoint_every=checkpoint_every, progress=progress)
  batches = recipe.train_batches(windows, train_tokens, hidden_cache, base, cfg,
                                batch_size=batch_size, seq_len=seq_len, seed=seed,
                                progress=progress)
  init = init_heads(base, num_heads, jax.random.key(seed),
                    prefix_config(cfg) if prefix_layer else None, head_layers)
  probe = list(held.sequential(max_batches=8))
  evaluate = lambda h, step: recipe.eval_record(topk_accuracy(h, base, cfg, probe), tree_nodes)
  heads, _ = train(hydra_loss_fn(cfg, teacher=teacher), init, batches, tcfg, workdir,
                   frozen=base, eval_fn=evaluate, eval_every=recipe.eval_every(steps), mesh=mesh,
                   description="train-draft")
  recipe.plot(workdir, "Hydra++ heads (prefix layer)" if prefix_layer else "Hydra heads")
  accuracy = topk_accuracy(heads, base, cfg, held.sequential(max_batches=64))
  info = dict({"method": "hydra", "steps": steps, "train_tokens": int(len(train_tokens)),
               "teacher_loss": teacher, "prefix_layer": prefix_layer,
               "head_layers": head_layers},
              **recipe.tree_info(accuracy, build_tree(accuracy, tree_nodes)))
  return heads, info
