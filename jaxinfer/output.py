"""Durable JSONL output: whole records only, fsync'ed; resumable; one file from many processes.

A single process appends straight to --output. With N processes, process i appends to
`<output>.part-i-of-N` and process 0 merges the parts into --output at the end. On restart, the
records already in --output and in any part file are read back (a torn last line from a crash
is cut off) and their requests are skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from jaxinfer.errors import UserError
from jaxinfer.files import write_atomically


def decode_line(raw: bytes, line_no: int) -> str:
  """A JSONL input line's text (a byte-order mark before the first line is not part of it);
  ValueError "not valid UTF-8 (byte N of the line)" otherwise."""
  try:
    return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"not valid UTF-8 (byte {e.start + 1} of the line)") from None


@contextlib.contextmanager
def exclusive(output: str | os.PathLike):
  """Held by the one run writing `output` (its process 0): a second run of the same output
  while it runs would read what the first has not written yet and write every record again.
  An advisory lock on `<output>.lock`, removed at the end (a killed run's lock file is left, and
  its lock released with the process)."""
  path = Path(f"{output}.lock")
  while True:
    try:
      f = open(path, "a")
    except OSError as e:
      raise UserError(f"--output: cannot write {str(path)!r} ({e.strerror or e})") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.close()
      raise UserError(f"--output: another run is writing {str(output)!r} (it holds "
                      f"{str(path)!r}); wait for it to end, or write elsewhere") from None
    if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
      break
    f.close()  # (locked as the run that held it removed it: lock the file there now)
  with f:
    try:
      yield
    finally:
      path.unlink(missing_ok=True)  # (before the lock is released with the file)


def part_path(output: str | os.PathLike, process: int, num_processes: int) -> Path:
  return Path(f"{output}.part-{process}-of-{num_processes}")


RECORD_START = b'{"id": '  # (every record's first key)


def _read_records(path: Path, repair: bool) -> list[dict[str, Any]]:
  """Complete records of a JSONL file; with `repair`, a torn tail (a record a crash cut short)
  is truncated away. A file holding anything else is refused, untouched: it is not an output
  of this command."""
  if not path.exists():
    return []
  data = path.read_bytes()
  end = data.rfind(b"\n") + 1
  records = []
  for number, line in enumerate(data[:end].splitlines(), 1):
    if line.strip():
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
      if not isinstance(record, dict) or "line" not in record:
        raise UserError(f"--output: line {number} of {str(path)!r} is not a record of jaxinfer "
                        f"generate; name another --output, or pass --overwrite to replace it")
      records.append(record)
  tail = data[end:]  # a record a crash cut short starts as every record does, and is no JSON
  if tail and (not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail))
               or _whole_object_but_no_record(tail)):
    raise UserError(f"--output: the last line of {str(path)!r} is not a record of jaxinfer "
                    f"generate; name another --output, or pass --overwrite to replace it")
  if repair and end != len(data):
    with open(path, "r+b") as f:
      f.truncate(end)
  return records


def _whole_object_but_no_record(tail: bytes) -> bool:
  """Whether a last line without its newline is a whole JSON object other than a record (a
  one-line prompts file, say, named as --output by mistake): not a tail a crash cut short."""
  try:
    value = json.loads(tail)
  except (ValueError, RecursionError):
    return False
  return not (isinstance(value, dict) and "line" in value)


def completed(output: str | os.PathLike, num_processes: int,
              repair_part: int | None = None) -> list[dict[str, Any]]:
  """Every record already written by an earlier run (the merged file and all parts)."""
  records = _read_records(Path(output), repair=num_processes == 1)
  if num_processes > 1:
    for i in range(num_processes):
      records += _read_records(part_path(output, i, num_processes), repair=i == repair_part)
  return records


def record_key(record: dict[str, Any]) -> tuple:
  """Identity of an input line's record: a completion is known by its id (unique among valid
  requests), an error by its line (a bad line may repeat or lack an id)."""
  if "error" in record or record.get("id") is None:
    return ("line", record.get("line"))
  return ("id", json.dumps(record["id"]))


class RecordWriter:
  """Appends whole records and makes them durable (write, flush, fsync) on a thread of its own,
  so a slow disk never stalls generation: records queued while one group is being synced go out
  together in the next (group commit). A record not yet synced when the process dies is simply
  absent from the file, and its request runs again on restart. `close` waits for every queued
  record. Safe to share between threads."""

  def __init__(self, path: str | os.PathLike):
    self._f = open(path, "a", encoding="utf-8")
    self._queue: list[str] = []  # encoded records, each a whole line
    self._busy = False  # a group is being written
    self._closed = False
    self._error: BaseException | None = None
    self._cv = threading.Condition()
    self._thread = threading.Thread(target=self._sync_loop, name="record-writer", daemon=True)
    self._thread.start()

  def write(self, records: Iterable[dict[str, Any]]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    with self._cv:
      self._check()
      if self._closed:
        raise ValueError("RecordWriter: write after close")
      if lines:
        self._queue.extend(lines)
        self._cv.notify_all()

  def flush(self) -> None:
    """Returns once every record written so far is on disk."""
    with self._cv:
      self._cv.wait_for(lambda: (not self._queue and not self._busy) or self._error is not None)
      self._check()

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    self._thread.join()
    try:
      self._f.close()
    except OSError as e:  # (what a failed write left buffered fails again: keep the first)
      self._error = self._error or e
    self._check()

  @property
  def error(self) -> BaseException | None:
    """Why writing failed (None: it has not)."""
    return self._error

  def _check(self) -> None:
    if self._error is not None:
      raise OSError(f"writing {self._f.name} failed: {self._error}") from self._error

  def _sync_loop(self) -> None:
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._queue or self._closed)
        if not self._queue:
          return  # closed, and everything is written
        group, self._queue, self._busy = self._queue, [], True
      try:
        self._f.write("".join(group))
        self._f.flush()
        os.fsync(self._f.fileno())
      except BaseException as e:  # surfaced by the next write, flush or close
        with self._cv:
          self._error, self._busy = e, False
          self._cv.notify_all()
        return
      with self._cv:
        self._busy = False
        self._cv.notify_all()


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
  """Appends records to a JSONL file, one line each (a benchmark's results), making its folder
  if missing."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


def _one_per_line(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each record once (`record_key`), without the error of a line that has since completed (a
  bad line corrected, then run again)."""
  completed_lines = {r.get("line") for r in records if "error" not in r}
  seen, kept = set(), []
  for record in records:
    key = record_key(record)
    if key not in seen and not ("error" in record and record.get("line") in completed_lines):
      seen.add(key)
      kept.append(record)
  return kept


def rewrite(output: str | os.PathLike, records: list[dict[str, Any]]) -> None:
  """Writes `output` anew, atomically (a crash leaves the old file or the new one)."""
  write_atomically(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def stray_part_counts(output: str | os.PathLike, num_processes: int) -> list[int]:
  """The process counts of part files a run of another count left beside `output`."""
  out = Path(output)
  counts = set()
  for p in out.parent.glob(glob.escape(out.name) + ".part-*-of-*"):
    m = re.fullmatch(re.escape(out.name) + r"\.part-\d+-of-(\d+)", p.name)
    if m and int(m.group(1)) != num_processes:
      counts.add(int(m.group(1)))
  return sorted(counts)


def part_records(output: str | os.PathLike, num_processes: int) -> list[dict[str, Any]]:
  """The records in the part files of a run of `num_processes` (a torn tail left as it is)."""
  return [r for i in range(num_processes)
          for r in _read_records(part_path(output, i, num_processes), repair=False)]


def merge_parts(output: str | os.PathLike, num_processes: int,
                reconcile: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
                ) -> int:
  """Process 0, after every process finished: one --output with one record per input line
  (`reconcile`: as the input now reads, `reconciled`)."""
  merged = _one_per_line(completed(output, num_processes))
  if reconcile is not None:
    merged = reconcile(merged)
  rewrite(output, merged)
  for i in range(num_processes):
    part_path(output, i, num_processes).unlink(missing_ok=True)
  return len(merged)


def reconciled(written: list[dict[str, Any]], line_of: dict[str, int],
               errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records written (a single process's --output, or a run's output and parts) as this run's
  --prompts now reads: each completion with the line its id is on now (lines inserted or
  removed since), and only the error records this run's lines still give (a corrected line's
  goes; this run writes the errors it lacks), one record per line. `line_of`: json.dumps(id)
  -> line of every request (each completion's id is one of them)."""
  current = {(e["line"], e["error"]) for e in errors}
  fresh = []
  for r in written:
    if "error" not in r:
      line = line_of[json.dumps(r["id"])]
      fresh.append(r if r.get("line") == line else {**r, "line": line})
    elif (r.get("line"), r["error"]) in current:
      fresh.append(r)
  return _one_per_line(fresh)
