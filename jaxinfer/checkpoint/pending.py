"""A save's descriptions replaced together with its weights.

A checkpoint directory is weights plus the files that describe them (config.json, the tokenizer
files, generation_config.json, quantization.json). A save swaps its weights in with one rename
(`save_hf`'s index or model.safetensors, `save_orbax`'s params/); its descriptions are staged
before that as NAME.new beside a note naming the save, and the weights carry the same save id.
Once the weights are in place the staged files take their places and the note goes. The save
holds a lock on the note meanwhile, so a load of the directory (`settle`) waits for it. A save
cut short between the two leaves the note, unlocked: the next load or save then puts the staged
files in place where the weights in place carry the note's id, and drops them where they do not
(the save stopped before its weights replaced the old ones). A load therefore never pairs new
weights with old descriptions, or old weights with new ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

NOTE = "jaxinfer-save.json"


def new_id() -> str:
  return uuid.uuid4().hex


@contextlib.contextmanager
def staged(directory: Path, save_id: str, write: dict[str, bytes],
           remove: tuple[str, ...] = ()) -> Iterator[None]:
  """Writes each of `write` as NAME.new, then the note (locked from the start), for the save
  `save_id` that replaces those files and removes `remove`; the body puts the weights in place,
  and on its exit the staged files take their places. A body that raises leaves the note for
  `settle`."""
  for name, data in write.items():
    with open(directory / f"{name}.new", "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  tmp = directory / f"{NOTE}.tmp"
  with open(tmp, "w", encoding="utf-8") as note:
    fcntl.flock(note, fcntl.LOCK_EX)  # (before it is the note: a load waits from the start)
    note.write(json.dumps({"save": save_id, "write": sorted(write), "remove": sorted(remove)}))
    note.flush()
    os.fsync(note.fileno())
    os.replace(tmp, directory / NOTE)
    yield
    _commit(directory, json.loads((directory / NOTE).read_text()))


def _commit(directory: Path, note: dict) -> None:
  for name in note["write"]:
    if (directory / f"{name}.new").exists():  # (a commit cut short put it in place already)
      os.replace(directory / f"{name}.new", directory / name)
  for name in note["remove"]:
    (directory / name).unlink(missing_ok=True)
  (directory / NOTE).unlink()


def settle(directory: Path, weights_save: Callable[[], str | None]) -> None:
  """Waits for a save running in `directory`, and finishes or drops one cut short there (nothing
  when there is none): `weights_save()` is the save id the weights in place carry (None: none)."""
  path = directory / NOTE
  try:
    f = open(path, encoding="utf-8")
  except FileNotFoundError:
    return
  with f:
    # a save holds it until its files are in place; of processes loading at once, one settles
    # and the others find it done
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
        return  # (that note is gone: its save finished, or another settled it)
    except FileNotFoundError:
      return
    note = json.loads(f.read())
    if weights_save() != note["save"]:  # (cut short before its weights were in place)
      with contextlib.suppress(OSError):  # (where it cannot be tidied, a load ignores it)
        for name in note["write"]:
          (directory / f"{name}.new").unlink(missing_ok=True)
        path.unlink()
      return
    try:
      _commit(directory, note)
    except OSError as e:
      raise ValueError(f"{directory}: a save was cut short here ({NOTE}) and cannot be "
                       f"finished ({e.strerror or e}); rerun it where the directory is "
                       f"writable") from None
