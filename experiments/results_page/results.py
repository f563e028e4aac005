"""The results folder read into memory: each results file's records in file order, the plots, and
the papers' claims. Nothing here formats."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
CLAIMS = "claims.json"  # the papers' claims (not records: it is read by claims.py)


@dataclasses.dataclass(frozen=True)
class Results:
  files: dict[str, list[dict]]  # results file name -> its records, oldest first
  plots: list[str]              # the folder's .png names, sorted
  claims: list[dict]            # claims.json, in page order


def load(folder: Path = RESULTS) -> Results:
  """Every *.jsonl (a record a line) and *.json (one record or a list) but claims.json."""
  files = {}
  for path in sorted(folder.glob("*.jsonl")):
    files[path.name] = [json.loads(line) for line in path.read_text().splitlines()
                        if line.strip()]
  for path in sorted(folder.glob("*.json")):
    if path.name != CLAIMS:
      data = json.loads(path.read_text())
      files[path.name] = data if isinstance(data, list) else [data]
  claims_path = folder / CLAIMS
  claims = json.loads(claims_path.read_text()) if claims_path.is_file() else []
  return Results(files, [p.name for p in sorted(folder.glob("*.png"))], claims)


def matches(row: dict, where: dict) -> bool:
  """Every field in `where` equals the row's (None also matches a row that lacks the field)."""
  return all(row.get(k) == v for k, v in where.items())


def spec_rows(recs: list[dict]) -> list[dict]:
  """bench_speculative's rows, one per (record, method): the record's fields, the method's name
  under "method" and its fields, and the record's index under "_record"."""
  return [{**{k: v for k, v in r.items() if k != "methods"}, "_record": i, "method": name, **m}
          for i, r in enumerate(recs) for name, m in r.get("methods", {}).items()]
