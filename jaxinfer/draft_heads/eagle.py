"""EAGLE draft layer: one decoder layer, autoregressive over (feature, token), on a frozen base
(the layer, its forward and files are `eagle_serve`).

f_t is the base's final hidden state at position t (the feature its output projection reads to
predict token t + 1). The draft reads the pair (f_t, x_{t+1}) at position t — the feature and the
token that feature produced — as fc([f_t; embed(x_{t+1})]) (2D -> D), runs one decoder layer
(the base's own layer type, causal over earlier pairs, its own KV cache when serving) and a norm,
and predicts f_{t+1}; the base's frozen output projection turns that into a distribution over
x_{t+2}. Drafting feeds its own predicted features back in, one token at a time.

Training (EAGLE-1): the base is frozen (stop_gradient); loss = SmoothL1(f̂_{t+1}, f_{t+1})
+ `cls_weight` * CE(base distribution at t + 1, draft distribution), with uniform noise on the
input features for robustness to its own errors. Initialisation makes the draft start as
"predict f_{t+1} = f_t" (fc reads the feature only; the layer's output projections are zero).

Training-time test (`ttt_steps` = n > 1, as in EAGLE-3): drafting feeds the draft its own
predictions, so training does too. Step j (j = 1..n) at anchor t reads (its step j - 1
prediction — the true f_t for j = 1 —, token x_{t+j}) at position t + j - 1 and attends to the
true pairs up to t and to its own earlier steps at anchor t, exactly what drafting j tokens ahead
from true features up to t sees (one attention over [true keys; step keys] with that mask); it
predicts f_{t+j}. The loss is the mean over steps of the EAGLE-1 loss at each.

Draft vocabulary (as in EAGLE-3): the draft may score only the `draft_vocab` tokens most frequent
in its training data. One drafted token then costs one layer plus a (D, draft_vocab) projection
instead of the full (D, V) one — which, for small models and large vocabularies, is most of a
draft step. Verification still scores the full vocabulary, so output is unchanged; a token
outside the draft vocabulary is just never drafted.
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
from jaxinfer.draft_heads.eagle_serve import (FORMAT, EagleDraft, EagleHeads,  # noqa: F401
                                              as_transformer, draft_config, draft_forward,
                                              init_draft, is_eagle, load, save, serving_heads)
from jaxinfer.draft_heads.hidden_cache import tokens_and_hidden
from jaxinfer.quant import take_rows, weight


@partial(jax.jit, static_argnames=("cfg",))
def _predicted_counts(base: M.Transformer, batch, cfg: ModelConfig) -> jax.Array:
  """(V,): how often the base predicts each token (greedily) over a (B, T) batch."""
  positions = jnp.broadcast_to(jnp.arange(batch.shape[1], dtype=jnp.int32), batch.shape)
  hidden, _ = M.forward(base, batch, positions, cfg)
  pred = jnp.argmax(M.logits(base, hidden), -1)
  return jnp.zeros((cfg.vocab_size,), jnp.int32).at[pred.reshape(-1)].add(1)


def predicted_counts(base: M.Transformer, cfg: ModelConfig, batches) -> np.ndarray:
  total = np.zeros(cfg.vocab_size, np.int64)
  for batch in batches:
    total += np.asarray(_predicted_counts(base, jnp.asarray(batch), cfg))
  return total


def frequent_tokens(base: M.Transformer, cfg: ModelConfig, batches, size: int) -> np.ndarray:
  """The `size` tokens the base predicts (greedily) most often over `batches` (B, T) of text —
  what the draft has to draft — sorted by id (ties: lower id first)."""
  if not 0 < size <= cfg.vocab_size:
    raise ValueError(f"draft vocabulary: size must be in [1, {cfg.vocab_size}], got {size}")
  total = predicted_counts(base, cfg, batches)
  order = np.lexsort((np.arange(cfg.vocab_size), -total))
  return np.sort(order[:size]).astype(np.int32)


def ttt_predictions(draft: EagleDraft, base: M.Transformer, features: jax.Array,
                    tokens: jax.Array, dcfg: ModelConfig, steps: int) -> list[jax.Array]:
  """Training-time test: features (B,T,D) f_0..f_{T-1} and tokens (B, T+1) x_0..x_T -> the
  predicted features of drafting steps 1..`steps`, each (B,T,D): step j at anchor t predicts
  f_{t+j} from the true pairs up to t and its own steps before j."""
  from jaxinfer.attention import attention_reference
  from jaxinfer.rope import rope_tables
  from jaxinfer.runtime import Runtime
  layer, eps = draft.layer, dcfg.norm_eps
  b, t, _ = features.shape
  anchor = jnp.arange(t)
  tokens = jnp.pad(tokens, ((0, 0), (0, steps)))  # tokens past the window: masked in the loss
  causal, own = anchor[None, :] <= anchor[:, None], anchor[None, :] == anchor[:, None]
  preds, keys, values, feat = [], [], [], features
  for j in range(steps):
    emb = take_rows(base.embed, tokens[:, j + 1:j + 1 + t]).astype(feat.dtype)
    x = jnp.concatenate([feat, emb], axis=-1) @ draft.fc
    cos, sin = rope_tables(jnp.broadcast_to(anchor + j, (b, t)), dcfg)
    q, k, v = M.project_qkv(layer.attn, M.rms_norm(x, layer.attn_norm, eps), cos, sin, dcfg)
    keys.append(k)
    values.append(v)
    mask = jnp.concatenate([causal] + [own] * j, axis=1)[None]  # (1, T, (j + 1) T)
    out = attention_reference(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), None,
                              None, mask=mask)
    h = x + M.project_out(layer.attn, out)
    h = h + M.mlp_block(layer.mlp, M.rms_norm(h, layer.mlp_norm, eps), Runtime())
    feat = M.rms_norm(h, draft.norm, eps)
    preds.append(feat)
  return preds


def _smooth_l1(x: jax.Array) -> jax.Array:
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def eagle_loss_fn(cfg: ModelConfig, *, cls_weight: float = 0.1, noise: float = 0.1,
                  vocab: np.ndarray | None = None, ttt_steps: int = 1):
  """loss_fn(draft, base, batch, rng) for the shared training loop (batch: token windows
  (B, T+1) or a hidden-state cache's batches). With a draft
  `vocab`, the token loss is over it (the base's distribution renormalised to it).
  ttt_steps > 1: the training-time test over that many drafting steps."""
  if ttt_steps < 1:
    raise ValueError(f"EAGLE: ttt_steps must be >= 1, got {ttt_steps}")
  dcfg = draft_config(cfg)

  def loss_fn(draft: EagleDraft, base: M.Transformer, batch, rng):
    batch, feats = tokens_and_hidden(base, batch, cfg)  # the base is frozen
    feats = feats.astype(jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(feats.shape[1], dtype=jnp.int32), feats.shape[:2])
    base_logits = M.logits(base, feats)  # (B,T,V)
    greedy = jnp.argmax(base_logits[:, 1:], -1)
    if vocab is not None:
      base_logits = jnp.take(base_logits, jnp.asarray(vocab, jnp.int32), axis=-1)
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(base_logits))
    noisy = (feats + noise * jax.random.uniform(rng, feats.shape, minval=-1.0, maxval=1.0)
             ).astype(draft.fc.dtype)
    if ttt_steps == 1:
      preds = [draft_forward(draft, base, noisy, batch[:, 1:], positions, dcfg)[0]]
    else:
      preds = ttt_predictions(draft, base, noisy, batch, dcfg, ttt_steps)
    heads = serving_heads(draft, base, vocab)
    t = feats.shape[1]
    total, metrics = 0.0, {}
    for j, pred in enumerate(preds):  # step j + 1 at anchor a predicts f_{a+j+1}
      n = t - 1 - j
      pred = pred[:, :n].astype(jnp.float32)
      reg = jnp.mean(_smooth_l1(pred - feats[:, j + 1:]))
      logp = jax.nn.log_softmax(heads.logits(base, pred))
      cls = jnp.mean(-jnp.sum(jnp.exp(teacher[:, j + 1:]) * logp, -1))
      top1 = jnp.mean(heads.token_ids(jnp.argmax(logp, -1)) == greedy[:, j:])
      total += (reg + cls_weight * cls) / len(preds)
      if j == 0:
        metrics.update(reg_loss=reg, cls_loss=cls, top1=top1)
      else:
        metrics[f"top1_step{j + 1}"] = top1
    return total, metrics

  return loss_fn


@partial(jax.jit, static_argnames=("cfg", "top"))
def _ranks(heads: EagleHeads, base: M.Transformer, batch, cfg: ModelConfig, top: int):
  feats = tokens_and_hidden(base, batch, cfg)[1]
  positions = jnp.broadcast_to(jnp.arange(feats.shape[1], dtype=jnp.int32), feats.shape[:2])
  pred, _ = draft_forward(heads.draft, base, feats, batch[:, 1:], positions, draft_config(cfg))
  cand = heads.token_ids(jax.lax.top_k(heads.logits(base, pred[:, :-1]), top)[1])
  target = jnp.argmax(M.logits(base, feats[:, 1:]), -1)
  return jnp.sum(cand == target[..., None], axis=(0, 1)), target.size


def accuracy(heads: EagleHeads, base: M.Transformer, cfg: ModelConfig, batches,
             top: int = 10) -> np.ndarray:
  """(top,): how often the draft's i-th ranked token is the base's greedy next-next token, one
  step ahead from true features (held-out batches)."""
  hits, count = np.zeros(top), 0
  for batch in batches:
    h, n = _ranks(heads, base, jnp.asarray(batch), cfg, top)
    hits += np.asarray(h)
    count += int(n)
  if not count:
    raise ValueError("eagle accuracy: no held-out batches")
  return hits / count


@partial(jax.jit, static_argnames=("cfg", "steps"))
def _step_hits(heads: EagleHeads, base: M.Transformer, batch, cfg: ModelConfig, steps: int):
  feats = tokens_and_hidden(base, batch, cfg)[1]
  greedy = jnp.argmax(M.logits(base, feats[:, 1:]), -1)  # the base's token after each position
  preds = ttt_predictions(heads.draft, base, feats, batch, draft_config(cfg), steps)
  t = feats.shape[1]
  return [(jnp.sum(heads.token_ids(jnp.argmax(heads.logits(base, p[:, :t - 1 - j]), -1))
                   == greedy[:, j:]), greedy[:, j:].size) for j, p in enumerate(preds)]


def step_accuracy(heads: EagleHeads, base: M.Transformer, cfg: ModelConfig, batches,
                  steps: int = 3) -> np.ndarray:
  """(steps,): top-1 accuracy of drafting step j from true features up to t, the draft fed its
  own predicted features (and the data's tokens), against the base's greedy token (held-out
  batches)."""
  hits, count = np.zeros(steps), np.zeros(steps)
  for batch in batches:
    for j, (h, n) in enumerate(_step_hits(heads, base, jnp.asarray(batch), cfg, steps)):
      hits[j] += int(h)
      count[j] += int(n)
  if not count.all():
    raise ValueError("eagle step accuracy: no held-out batches")
  return hits / count


def _eval_record(acc: np.ndarray, chain: int = 4) -> dict[str, float]:
  """Held-out accuracy and the tau a chain of `chain` drafts would reach if every depth were
  accepted as often as the first (an estimate: deeper drafts read predicted features)."""
  a = float(acc[0])
  return {"eval_top1": a, "eval_top5": float(acc[:5].sum()),
          "predicted_tau": float(sum(a**d for d in range(chain + 1)))}


def train_eagle(cfg: ModelConfig, base: M.Transformer, train_tokens: np.ndarray,
                held_tokens: np.ndarray, workdir: str | Path, *, steps: int = 600,
                batch_size: int = 16, seq_len: int = 256, learning_rate: float = 3e-3,
                warmup_steps: int = 30, checkpoint_every: int = 100, seed: int = 0,
                cls_weight: float = 0.1, noise: float = 0.1, draft_vocab: int = 0,
                ttt_steps: int = 1, mesh=None, hidden_cache=None, progress: bool = True
                ) -> tuple[EagleDraft, np.ndarray | None, dict[str, Any]]:
  """Trains the draft layer (resuming from `workdir`), then measures its held-out accuracy.
  draft_vocab > 0: score only that many of the training data's most frequent tokens;
  ttt_steps > 1: with the training-time test over that many drafting steps."""
  from jaxinfer.train.loop import train
  windows, held, tcfg = recipe.training_setup(
      train_tokens, held_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, steps=steps,
      learning_rate=learning_rate, warmup_steps=warmup_steps,
      checkpoint_every=checkpoint_every, progress=progress)
  batches = recipe.train_batches(windows, train_tokens, hidden_cache, base, cfg,
                                batch_size=batch_size, seq_len=seq_len, seed=seed,
                                progress=progress)
  vocab = None
  if draft_vocab and draft_vocab < cfg.vocab_size:
    vocab = frequent_tokens(base, cfg, (windows(10**6 + i) for i in range(64)), draft_vocab)
  init = init_draft(draft_config(cfg), jax.random.key(seed))
  probe = list(held.sequential(max_batches=8))
  evaluate = lambda d, step: _eval_record(accuracy(serving_heads(d, base, vocab), base, cfg,
                                                   probe))
  draft, _ = train(eagle_loss_fn(cfg, cls_weight=cls_weight, noise=noise, vocab=vocab,
                                 ttt_steps=ttt_steps), init,
                   batches, tcfg, workdir, frozen=base, eval_fn=evaluate,
                   eval_every=recipe.eval_every(steps), mesh=mesh, description="train-draft")
  recipe.plot(workdir, "EAGLE draft layer")
  acc = accuracy(serving_heads(draft, base, vocab), base, cfg, held.sequential(max_batches=64))
  by_step = step_accuracy(serving_heads(draft, base, vocab), base, cfg,
                          held.sequential(max_batches=64))
  info = {"method": "eagle", "steps": steps, "train_tokens": int(len(train_tokens)),
          "ttt_steps": ttt_steps,
          "accuracy_top1": round(float(acc[0]), 4),
          "accuracy_top5": round(float(acc[:5].sum()), 4),
          "accuracy_top1_by_drafting_step": [round(float(a), 4) for a in by_step]}
  if vocab is not None:  # how often the base's next token is one the draft can draft
    counts = predicted_counts(base, cfg, held.sequential(max_batches=64))
    info["draft_vocab_coverage"] = round(float(counts[vocab].sum() / max(counts.sum(), 1)), 4)
  return draft, vocab, info
