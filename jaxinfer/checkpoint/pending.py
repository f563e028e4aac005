"""A save's descriptions replaced together with its weights.

A checkpoint directory is weights plus the files that describe them (config.json, the tokenizer
files, generation_config.json, quantization.json). A save swaps its weights in with one rename
(`save_hf`'s index or model.safetensors, `save_orbax`'s params/); its descriptions are staged
before that as NAME.new beside a note naming the save, and the weights carry the same save id.
Once the weights are in place the staged files take their places and the note goes. A save cut
short between the two leaves the note: the next load or save of the directory (`settle`) then
puts the staged files in place where the weights in place carry the note's id, and removes them
where they do not (the save stopped before its weights replaced the old ones). A load therefore
never pairs new weights with old descriptions, or old weights with new ones.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

from jaxinfer.files import write_atomically

NOTE = "jaxinfer-save.json"


def new_id() -> str:
  return uuid.uuid4().hex


def stage(directory: Path, save_id: str, write: dict[str, bytes], remove: tuple[str, ...] = ()
          ) -> None:
  """Writes each of `write` as NAME.new (on disk before the note), then the note: the save
  `save_id` replaces those files and removes `remove`."""
  for name, data in write.items():
    with open(directory / f"{name}.new", "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  write_atomically(directory / NOTE, json.dumps(
      {"save": save_id, "write": sorted(write), "remove": sorted(remove)}))


def commit(directory: Path) -> None:
  """The staged files in their places, the files to remove removed, then the note."""
  note = json.loads((directory / NOTE).read_text())
  for name in note["write"]:
    staged = directory / f"{name}.new"
    if staged.exists():  # (a commit cut short put it in place already)
      os.replace(staged, directory / name)
  for name in note["remove"]:
    (directory / name).unlink(missing_ok=True)
  (directory / NOTE).unlink()


def settle(directory: Path, weights_save: Callable[[], str | None]) -> None:
  """Finishes or undoes a save cut short in `directory` (nothing when none was):
  `weights_save()` is the save id the weights in place carry (None: none)."""
  path = directory / NOTE
  if not path.exists():
    return
  try:
    note = json.loads(path.read_text())
    if weights_save() == note["save"]:
      commit(directory)
    else:
      for name in note["write"]:
        (directory / f"{name}.new").unlink(missing_ok=True)
      path.unlink()
  except OSError as e:
    raise ValueError(f"{directory}: a save was cut short here ({NOTE}) and cannot be finished "
                     f"({e.strerror or e}); rerun it where the directory is writable") from None
