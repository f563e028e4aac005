"""Where a checkpoint may be written."""

from __future__ import annotations

import os
from pathlib import Path


def check_destination(directory: str | os.PathLike, source: str | os.PathLike | None) -> Path:
  """`directory` as a path, if a checkpoint may be written there: not an existing file, and not
  the model directory it is made from (whose files it would be mixed with). Raises ValueError
  naming it."""
  path = Path(directory).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f"--output: {path} is a file; give a directory for the checkpoint")
  if source is not None and path.exists() and path.resolve() == Path(source).resolve():
    raise ValueError(f"--output: {path} is the model being read; write to another directory")
  return path
