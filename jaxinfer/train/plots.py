"""A training run's curves as one PNG, from its metrics.jsonl: the loss, per-head top-1 accuracy
on training batches, and — when the run evaluated held-out data — per-head top-1 / top-5
accuracy and the predicted tau over training."""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxinfer.train.loop import read_metrics


def _series(records, key):
  pts = [(r["step"], r[key]) for r in records if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def _keys(records, pattern):
  found = sorted({k for r in records for k in r if re.fullmatch(pattern, k)},
                 key=lambda k: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", k)])
  return found


def plot_run(workdir: str | os.PathLike, title: str = "", out: str | None = None) -> Path:
  """Writes <workdir>/training.png (or `out`) and returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"{workdir}: no metrics.jsonl to plot")
  panels = [("loss", ["loss"]),
            ("top-1, training batches", _keys(records, r"(head\d+_)?top1")),
            ("held-out top-1", _keys(records, r"eval_(head\d+_)?top1")),
            ("held-out top-5", _keys(records, r"eval_(head\d+_)?top5")),
            ("predicted tau", _keys(records, r"predicted_tau"))]
  panels = [(name, keys) for name, keys in panels if keys]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (name, keys) in zip(axes[0], panels):
    for key in keys:
      x, y = _series(records, key)
      ax.plot(x, y, marker="." if len(x) < 30 else None,
              label=key.replace("eval_", "").replace("_top1", "").replace("_top5", ""))
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = Path(out) if out else Path(workdir) / "training.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
