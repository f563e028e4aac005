"""Small files written whole: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


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
