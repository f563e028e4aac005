"""`python experiments/results_readme.py [--check]`: rewrite the page, or exit 1 if it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from .page import COMMAND, render
from .results import RESULTS, load


def main(argv: list[str], folder: Path = RESULTS) -> int:
  args = argv[1:]
  if args not in ([], ["--check"]):
    print(f"usage: {COMMAND} [--check]; got {args}", file=sys.stderr)
    return 2
  page, text = folder / "README.md", render(load(folder))
  if args == ["--check"]:
    if not page.is_file() or page.read_text() != text:
      print(f"{page} is stale: run {COMMAND}", file=sys.stderr)
      return 1
    return 0
  page.write_text(text)
  print(f"wrote {page}")
  return 0
