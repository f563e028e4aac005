"""A training run's work directory: refused when it holds a run that --resume does not
continue."""

from __future__ import annotations

from pathlib import Path


def check_workdir(workdir, resume: bool) -> None:
  """ValueError when `workdir` holds a run (checkpoints, metrics or self-distilled data) and
  --resume was not given; with --resume, a missing run simply starts."""
  w = Path(workdir)
  ckpt = w / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  held = steps or (w / "metrics.jsonl").is_file() or (w / "distill").is_dir()
  if held and not resume:
    where = f"last checkpoint at step {steps[-1]}" if steps else "no checkpoint yet"
    raise ValueError(f"--workdir: {w} holds a run ({where}); pass --resume to continue it, or "
                     f"remove it or choose another --workdir")
