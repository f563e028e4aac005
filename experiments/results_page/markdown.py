"""Cells, the one table renderer, and a results file's section of the page.

A table is a list of columns, each a header and a function of one row (a record, or a dict
built from one); every table starts with the row's date, device and jax. A field a row lacks
shows "—".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

NA = "—"
STAMP = ["date", "device", "jax"]
Column = tuple[str, Callable[[dict], object]]  # (header, cell of a row)


def fmt(v, digits: int = 2, unit: str = "") -> str:
  if v is None:
    return NA
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.{digits}f}{unit}"
  if isinstance(v, list):
    return ", ".join(fmt(x, digits) for x in v)
  return f"{v}{unit}"


def ratio(v) -> str:
  return fmt(v, 2, "×")


def get(row: dict, key: str):
  """row[key]; a dotted key reads into nested dicts."""
  for part in key.split("."):
    row = row.get(part) if isinstance(row, dict) else None
  return row


def field(header: str, key: str, digits: int = 2, unit: str = "") -> Column:
  """A column showing one field of each row."""
  return header, lambda r: fmt(get(r, key), digits, unit)


def stamp(r: dict) -> list[str]:
  """date, device, jax of a record. A date of null was not written down at the time; a record
  without `device` shows the device kind its ceilings were measured on, or its backend."""
  device = r.get("device") or r.get("ceilings", {}).get("device_kind") or r.get("backend")
  date = "not recorded" if "date" in r and r["date"] is None else fmt(r.get("date"))
  return [date, fmt(device), fmt(r.get("jax"))]


def cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def table(columns: Sequence[Column], rows: list[dict]) -> list[str]:
  """The page's table of measurements: date, device and jax of each row, then `columns`."""
  return markdown_table(STAMP + [h for h, _ in columns],
                        [stamp(r) + [f(r) for _, f in columns] for r in rows])


def part(title: str, text: str, columns: Sequence[Column], rows: list[dict]) -> list[str]:
  """A titled sub-table, with what it shows."""
  return ["", f"### {title}", ""] + ([text, ""] if text else []) + table(columns, rows)


@dataclasses.dataclass(frozen=True)
class Section:
  """One results file's part of the page: a title, what its runs did, and a table with a row per
  record (`columns`) or the tables `body` builds from the records."""
  title: str
  intro: str | Callable[[list[dict]], str]
  columns: Sequence[Column] = ()
  body: Callable[[list[dict]], list[str]] | None = None
  plot: Callable[[dict], str] | None = None  # a record's plot file: linked in its row, shown below
  plots_caption: str = ""


def render_section(section: Section, name: str, recs: list[dict], plots: list[str]) -> list[str]:
  intro = section.intro(recs) if callable(section.intro) else section.intro
  out = [f"## {section.title}", "", intro]
  if section.body is not None:
    out += section.body(recs)
  else:
    columns, shown = list(section.columns), []
    if section.plot is not None:
      shown = list(dict.fromkeys(p for p in map(section.plot, recs) if p in plots))
      columns.append(("plot", lambda r: f"[plot]({section.plot(r)})" if section.plot(r) in plots
                      else NA))
    out += [""] + table(columns, recs)
    if shown:
      out += ["", section.plots_caption, ""] + [f"![{p}]({p})" for p in shown]
  return out + ["", f"Records: [`{name}`]({name})."]


# ---------------------------------------------------------------------------------------------
# any results file without a section of its own

NOT_COLUMNS = {"date", "device", "jax", "table", "measured_with"}


def _flatten(r: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in r.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _every_field(recs: list[dict]) -> list[str]:
  flat = [_flatten(r) for r in recs]
  cols = list(dict.fromkeys(k for f in flat for k in f if k not in NOT_COLUMNS))
  return table([(k, lambda r, k=k: fmt(_flatten(r).get(k), 3)) for k in cols], recs)


def every_field(recs: list[dict]) -> list[str]:
  """Every field of every record as written, one column each. Records with a `table` field go
  into one sub-table per value, titled by it, with what they were `measured_with`."""
  if not any("table" in r for r in recs):
    return [""] + _every_field(recs)
  out = []
  for title in dict.fromkeys(r.get("table") for r in recs):
    group = [r for r in recs if r.get("table") == title]
    how = "; ".join(dict.fromkeys(r["measured_with"] for r in group if r.get("measured_with")))
    out += ["", f"### {title}", ""] + ([f"Measured with {how}.", ""] if how else [])
    out += _every_field(group)
  return out


def generic_section(name: str) -> Section:
  return Section(name, "Every field of every record, as written.", body=every_field)


def short_model(name) -> str:
  if isinstance(name, str) and "/" in name:  # a cache path: keep its last two parts
    return "/".join(Path(name).parts[-2:])
  return fmt(name)
