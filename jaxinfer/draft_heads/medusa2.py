"""Medusa-2: Medusa heads trained jointly with LoRA adapters on the base, with a KL term that
keeps the adapted base's next-token distribution on the original's (self-distillation), so the
base can bend its hidden states toward what the heads predict without drifting.

Loss = Medusa's head loss (on the adapted base's hidden states, gradients flowing into the
adapters) + `kl_weight` * KL(p_original || p_adapted) over next-token distributions. The
original base stays frozen; the adapters are rank-r updates W + (alpha / r) A B on every
attention (q, k, v, o) and MLP (gate, up, down) weight of every layer, B zero-initialised (the
adapted base starts equal to the original). Serving uses the merged weights (`merge`): the
adapted model is written as a model directory and the heads beside it, served with
`--model=<dir>/model --speculative=medusa --draft_heads=<dir>`. Its greedy outputs are then the
adapted model's; `agreement` measures how far they stay from the original's.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads import recipe
from jaxinfer.draft_heads.medusa import (MedusaHeads, build_tree, heads_loss, init_heads,
                                         topk_accuracy)

# (module, weight) -> how many leading axes are the weight's input
TARGETS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("mlp", "gate"): 1, ("mlp", "up"): 1, ("mlp", "down"): 1}


@struct.dataclass
class LoRA:
  a: tuple[dict[str, jax.Array], ...]  # per layer, "attn.q" -> (in, r)
  b: tuple[dict[str, jax.Array], ...]  # per layer, "attn.q" -> (r, out), zero-initialised
  scale: float = struct.field(pytree_node=False, default=1.0)  # alpha / r


def init_lora(base: M.Transformer, rank: int, key: jax.Array, alpha: float | None = None) -> LoRA:
  if rank < 1:
    raise ValueError(f"LoRA: rank must be >= 1, got {rank}")
  a_layers, b_layers = [], []
  for i, layer in enumerate(base.layers):
    a, b = {}, {}
    for j, ((mod, name), n_in) in enumerate(TARGETS.items()):
      w = getattr(getattr(layer, mod), name)
      fan_in, fan_out = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
      k = jax.random.fold_in(key, i * len(TARGETS) + j)
      a[f"{mod}.{name}"] = jax.random.normal(k, (fan_in, rank), w.dtype) / math.sqrt(fan_in)
      b[f"{mod}.{name}"] = jnp.zeros((rank, fan_out), w.dtype)
    a_layers.append(a)
    b_layers.append(b)
  return LoRA(tuple(a_layers), tuple(b_layers), (alpha or rank) / rank)


def merge(base: M.Transformer, lora: LoRA) -> M.Transformer:
  """The base with every adapter folded into its weight."""
  layers = []
  for layer, a, b in zip(base.layers, lora.a, lora.b):
    mods = {"attn": layer.attn, "mlp": layer.mlp}
    for (mod, name), _ in TARGETS.items():
      w = getattr(mods[mod], name)
      delta = (a[f"{mod}.{name}"] @ b[f"{mod}.{name}"]).reshape(w.shape) * lora.scale
      mods[mod] = mods[mod].replace(**{name: w + delta.astype(w.dtype)})
    layers.append(layer.replace(attn=mods["attn"], mlp=mods["mlp"]))
  return base.replace(layers=tuple(layers))


def medusa2_loss_fn(cfg: ModelConfig, *, kl_weight: float = 1.0):
  """loss_fn((heads, lora), base, tokens (B, T+1), rng) for the shared training loop."""

  def loss_fn(trainable, base: M.Transformer, batch, rng):
    del rng
    heads, lora = trainable
    tuned = merge(base, lora)
    inputs = batch[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    hidden, _ = M.forward(tuned, inputs, positions, cfg)
    orig, _ = M.forward(base, inputs, positions, cfg)
    logp_orig = jax.lax.stop_gradient(jax.nn.log_softmax(M.logits(base, orig)))
    logp = jax.nn.log_softmax(M.logits(tuned, hidden))
    kl = jnp.mean(jnp.sum(jnp.exp(logp_orig) * (logp_orig - logp), -1))
    loss, metrics = heads_loss(heads, hidden, batch)
    agree = jnp.mean(jnp.argmax(logp, -1) == jnp.argmax(logp_orig, -1))
    return loss + kl_weight * kl, dict(metrics, kl=kl, heads_loss=loss, greedy_agreement=agree)

  return loss_fn


@partial(jax.jit, static_argnames=("cfg",))
def _same_argmax(tuned, base, batch, cfg):
  positions = jnp.broadcast_to(jnp.arange(batch.shape[1], dtype=jnp.int32), batch.shape)
  a = jnp.argmax(M.logits(tuned, M.forward(tuned, batch, positions, cfg)[0]), -1)
  b = jnp.argmax(M.logits(base, M.forward(base, batch, positions, cfg)[0]), -1)
  return jnp.sum(a == b), a.size


def agreement(tuned: M.Transformer, base: M.Transformer, cfg: ModelConfig, batches) -> float:
  """Teacher-forced greedy agreement on held-out batches: how often the adapted model's
  argmax next token equals the original's."""
  hits = count = 0
  for batch in batches:
    h, n = _same_argmax(tuned, base, jnp.asarray(batch), cfg)
    hits += int(h)
    count += int(n)
  if not count:
    raise ValueError("agreement: no held-out batches")
  return hits / count


def train_medusa2(cfg: ModelConfig, base: M.Transformer, train_tokens: np.ndarray,
                  held_tokens: np.ndarray, workdir, *, num_heads: int = 4, tree_nodes: int = 16,
                  rank: int = 8, kl_weight: float = 1.0, steps: int = 600, batch_size: int = 16,
                  seq_len: int = 256, learning_rate: float = 3e-3, warmup_steps: int = 30,
                  checkpoint_every: int = 100, seed: int = 0, mesh=None, progress: bool = True
                  ) -> tuple[MedusaHeads, M.Transformer, dict[str, Any]]:
  """Trains heads and adapters jointly (resuming from `workdir`). Returns the heads, the merged
  adapted base, and their info (accuracies, tree, agreement with the original base)."""
  from jaxinfer.train.loop import train
  windows, held, tcfg = recipe.training_setup(
      train_tokens, held_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, steps=steps,
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      checkpoint_every=checkpoint_every, progress=progress)
  probe = list(held.sequential(max_batches=8))

  def evaluate(trainable, step):
    heads, lora = trainable
    tuned = merge(base, lora)
    return dict(recipe.eval_record(topk_accuracy(heads, tuned, cfg, probe), tree_nodes),
                eval_greedy_agreement=agreement(tuned, base, cfg, probe))

  init = (init_heads(base, num_heads), init_lora(base, rank, jax.random.key(seed)))
  (heads, lora), _ = train(medusa2_loss_fn(cfg, kl_weight=kl_weight), init, windows, tcfg,
                           workdir, frozen=base, eval_fn=evaluate,
                           eval_every=recipe.eval_every(steps), mesh=mesh,
                           description="train-draft")
  recipe.plot(workdir, "Medusa-2 (heads + LoRA)")
  tuned = merge(base, lora)
  held_batches = list(held.sequential(max_batches=64))
  accuracy = topk_accuracy(heads, tuned, cfg, held_batches)
  info = dict({"method": "medusa2", "steps": steps, "train_tokens": int(len(train_tokens)),
               "lora_rank": rank, "kl_weight": kl_weight,
               "greedy_agreement": round(agreement(tuned, base, cfg, held_batches), 4)},
              **recipe.tree_info(accuracy, build_tree(accuracy, tree_nodes)))
  return heads, tuned, info
