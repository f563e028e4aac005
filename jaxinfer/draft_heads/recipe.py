"""What the draft-head training recipes share: their set-up (token windows, held-out windows,
train config, batches from a hidden-state cache), held-out evaluation during training, the
accuracies and tree a head file records, and the run's plot."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxinfer.draft_heads.medusa_serve import build_tree


def training_setup(train_tokens: np.ndarray, held_tokens: np.ndarray, *, batch_size: int,
                   seq_len: int, seed: int, steps: int, learning_rate: float, warmup_steps: int,
                   checkpoint_every: int, progress: bool):
  """(training windows, held-out windows (batch 1), TrainConfig) for a head recipe; the held-out
  windows fall back to the training tokens when the held-out part is too short."""
  from jaxinfer.train.lm import TokenWindows
  from jaxinfer.train.loop import TrainConfig
  windows = TokenWindows(train_tokens, batch_size, seq_len, seed)
  held = TokenWindows(held_tokens if len(held_tokens) > seq_len + 1 else train_tokens, 1, seq_len)
  tcfg = TrainConfig(steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
                     weight_decay=0.0, checkpoint_every=checkpoint_every, seed=seed,
                     progress=progress)
  return windows, held, tcfg


def train_batches(windows, train_tokens: np.ndarray, hidden_cache, base, cfg, *,
                  batch_size: int, seq_len: int, seed: int, progress: bool):
  """The training loop's batch_fn: random token windows, or — `hidden_cache` a directory — the
  base's cached hidden states over the training windows (built there first if need be), in
  shuffled batches: heads-only steps that skip the base."""
  if hidden_cache is None:
    return windows
  from jaxinfer.draft_heads.hidden_cache import HiddenBatches, build
  cache = build(hidden_cache, base, cfg, train_tokens, seq_len, batch_size=batch_size,
                progress=progress)
  return HiddenBatches(cache, batch_size, seed)


def tree_info(accuracy: np.ndarray, paths: list[tuple[int, ...]]) -> dict[str, Any]:
  """Per-head accuracies and the static tree, as the head files record them."""
  return {"accuracy_top1": [round(float(a), 4) for a in accuracy[:, 0]],
          "accuracy_topk": [[round(float(a), 4) for a in row] for row in accuracy],
          "tree": [list(p) for p in paths],
          # expected drafted tokens accepted per step under the independence assumption
          "expected_accepted_per_step": round(float(sum(
              np.prod([accuracy[d, r] for d, r in enumerate(p)]) for p in paths)), 3)}


def eval_every(steps: int, log_every: int = 10) -> int:
  """About ten held-out evaluations per run, on logging steps."""
  return max(log_every, steps // 10 // log_every * log_every)


def eval_record(accuracy: np.ndarray, tree_nodes: int) -> dict[str, float]:
  """Per-head held-out top-1 / top-5 and the predicted tau (1 + expected accepted drafts) of the
  tree these accuracies would build."""
  out = {}
  for k, row in enumerate(accuracy):
    out[f"eval_head{k}_top1"] = float(row[0])
    out[f"eval_head{k}_top5"] = float(row[:5].sum())
  out["predicted_tau"] = 1.0 + tree_info(accuracy, build_tree(accuracy, tree_nodes))[
      "expected_accepted_per_step"]
  return out


def plot(workdir, title: str) -> None:
  """training.png in the run's directory (a failed plot never fails the run)."""
  from absl import logging

  from jaxinfer.train.plots import plot_run
  try:
    plot_run(workdir, title)
  except Exception as e:  # noqa: BLE001 - plotting is a convenience
    logging.warning("could not plot %s: %s", workdir, e)
