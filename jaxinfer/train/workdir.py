"""A training run's work directory: refused when it holds a run that --resume does not
continue."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jaxinfer.checkpoint.destination import check_not_under_a_file
from jaxinfer.files import read_json_object, write_atomically

# what a run may change when it resumes: where it writes and reports, the mesh it restores onto
# (a preempted job may come back on another slice), caches of the inputs. Not how long it runs:
# the learning-rate schedule spans --steps, so other steps would redo the steps already run.
RESUMABLE = frozenset({"checkpoint_every", "output", "workdir", "resume", "progress", "mesh",
                       "cache_dir", "hidden_cache"})
PATHS = ("model", "data")  # compared as the files they name, however spelled
DATA_RECORD = "data.json"  # the training tokens a run started with: their count and digest


def _recorded(settings: dict) -> dict:
  kept = {k: v for k, v in sorted(settings.items()) if k not in RESUMABLE}
  if settings.get("hidden_cache"):  # (where it lies may change; whether batches come from
    kept["hidden_cache"] = True  # one, in its own order, may not)
  for k in PATHS:
    if isinstance(kept.get(k), str) and Path(kept[k]).expanduser().exists():
      kept[k] = str(Path(kept[k]).expanduser().resolve())
  return json.loads(json.dumps(kept, default=str))


def record_settings(workdir, settings: dict) -> None:
  """Writes the options a run starts with (`check_workdir` compares a resumed run's)."""
  w = Path(workdir)
  w.mkdir(parents=True, exist_ok=True)
  if not (w / "run.json").is_file():
    write_atomically(w / "run.json", json.dumps(_recorded(settings), indent=1) + "\n")


def check_workdir(workdir, resume: bool, settings: dict | None = None) -> None:
  """ValueError when `workdir` holds a run (checkpoints, metrics or self-distilled data) and
  --resume was not given; with --resume, a missing run simply starts. `settings` (the run's
  options by flag name): a resumed run must have those it started with (`record_settings`;
  `RESUMABLE` aside)."""
  w = Path(workdir)
  check_not_under_a_file(w, "--workdir")
  ckpt = w / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  held = steps or (w / "metrics.jsonl").is_file() or (w / "distill").is_dir()
  if held and not resume:
    where = f"last checkpoint at step {steps[-1]}" if steps else "no checkpoint yet"
    raise ValueError(f"--workdir: {w} holds a run ({where}); pass --resume to continue it, or "
                     f"remove it or choose another --workdir")
  if steps and settings is not None and settings.get("steps", steps[-1]) < steps[-1]:
    raise ValueError(f"--steps: the run in {w} has a checkpoint at step {steps[-1]} already, "
                     f"past --steps={settings['steps']}; resume it with --steps of at least "
                     f"{steps[-1]}")
  record = w / "run.json"
  if not held:
    record.unlink(missing_ok=True)  # (a run that stopped before its first record)
    (w / DATA_RECORD).unlink(missing_ok=True)
  elif settings is not None and record.is_file():
    settings = _recorded(settings)
    started = json.loads(record.read_text())
    changed = [k for k in sorted(set(started) | set(settings)) if started.get(k) != settings.get(k)]
    if changed:
      was = ", ".join(f"--{k}={started.get(k)}" for k in changed)
      now = ", ".join(f"--{k}={settings.get(k)}" for k in changed)
      raise ValueError(f"--resume: the run in {w} started with {was}; this command has {now}: "
                       f"resume it with its own options, or remove it or choose another "
                       f"--workdir")


def check_data(workdir, tokens, data: str) -> None:
  """Records the training tokens a run starts with (their count and digest); ValueError when a
  resumed run's differ (the --data file changed since: its batches would not be the ones an
  uninterrupted run trains on)."""
  import numpy as np
  w = Path(workdir)
  tokens = np.ascontiguousarray(tokens, dtype=np.int64)
  now = {"tokens": len(tokens), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
  path = w / DATA_RECORD
  if not path.is_file():
    w.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(now) + "\n")
    return
  then = read_json_object(path)
  if then != now:
    raise ValueError(f"--data: {data} now gives other tokens ({now['tokens']}) than the run in "
                     f"{w} started with ({then.get('tokens')}): resume it with the data it "
                     f"started with, or remove it or choose another --workdir")
