"""experiments/results/README.md from the results files beside it: every measured table, each row
with its device, jax version and date, plots beside their tables, and the reproductions of the
seed papers' claims.

The page is never edited by hand: a benchmark appends its rows to its JSONL file, figures measured
without one go into recorded.jsonl, the papers' claims live in claims.json, and
`python experiments/results_readme.py` is run again. Records are shown in file order (oldest
first); a field a record lacks shows "—". Output depends only on the files. No jax needed.

  results.py      the folder read into memory
  markdown.py     cells, the one table renderer, a file's section (and every field as written)
  tables.py       the sections of the benchmark files
  speculative.py  the sections of the speculative benchmarks
  claims.py       Reproductions: claims.json against the records
  page.py         the page in order
  cli.py          rewrite or --check
"""

from .cli import main
from .page import render
from .results import RESULTS, load

__all__ = ["RESULTS", "load", "main", "render"]
