"""Small files: written whole (a crash leaves the old file or the new one, never a torn one), and
read as JSON objects with errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json_object(path: str | os.PathLike, missing_ok: bool = False) -> dict:
  """A JSON file's object ({} for a missing file where `missing_ok`); ValueError naming the file
  where it is not a JSON object."""
  path = Path(path)
  if missing_ok and not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                     ) from None
  except (ValueError, RecursionError) as e:  # (undecodable text, an integer too long, nesting)
    raise ValueError(f"{path}: not valid JSON ({type(e).__name__})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def write_atomically(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file beside it, renamed over it once flushed."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
