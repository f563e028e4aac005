"""Where a checkpoint may be written."""

from __future__ import annotations

import os
from pathlib import Path


def check_destination(directory: str | os.PathLike, source: str | os.PathLike | None,
                      writes: str | None = None) -> Path:
  """`directory` as a path, if a checkpoint may be written there: not an existing file, not the
  model directory it is made from (whose files it would be mixed with), and (`writes`: "hf" or
  "orbax", the format about to be written) not a directory holding a checkpoint of the other
  format, which the new one would leave beside it. A checkpoint of the same format is replaced.
  Nor an empty name (the working directory, whose files a save would replace), nor one under
  a file. Raises ValueError naming it."""
  if not str(directory).strip():
    raise ValueError("--output: empty; give a directory for the checkpoint")
  path = Path(directory).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f"--output: {path} is a file; give a directory for the checkpoint")
  check_not_under_a_file(path, "--output")
  if source is not None and path.exists() and path.resolve() == Path(source).resolve():
    raise ValueError(f"--output: {path} is the model being read; write to another directory")
  other = None
  if writes == "hf" and any((path / d).is_dir() for d in ("params", "params.old", "params.new")):
    other = "a jaxinfer (orbax) checkpoint"
  elif writes == "orbax" and any(path.glob("*.safetensors*")):
    other = "Hugging Face weights"
  if other is not None:
    raise ValueError(f"--output: {path} holds {other}; writing {writes} files beside them "
                     f"would mix two checkpoints: choose another directory or empty it")
  return path


def check_not_under_a_file(path: str | os.PathLike, flag: str) -> None:
  """ValueError naming `flag` where `path` (or the nearest of its parents that exists) is a
  file, so no directory can be made there."""
  path = Path(path).expanduser().absolute()
  near = next((p for p in (path, *path.parents) if p.exists()), None)
  if near is not None and not near.is_dir():
    raise ValueError(f"{flag}: {near} is a file, so {path} cannot be a directory")
