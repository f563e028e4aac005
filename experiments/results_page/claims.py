"""Reproductions: the seed papers' claims (claims.json) against ours, computed from the records
each time the page is built.

Each claim's "ours" names a results file and how its records give our figure ("kind"), or is null
where nothing is built to measure it; the claim then reads "not measured yet", as it does when
the records it names do not exist yet.
"""

from __future__ import annotations

import string

from .markdown import NA, markdown_table
from .results import CLAIMS, Results, matches, spec_rows

BATCHES = (1, 4, 16)  # bench_speculative's batch sizes, in every comparison of two methods


def _triple(values, unit: str = "") -> str:
  return " / ".join(f"{v:.2f}{unit}" for v in values)


def _setting(row: dict) -> tuple:
  """What a row's figures depend on besides the method: its protocol and prompts."""
  return row.get("protocol"), row.get("prompt_set"), row.get("num_prompts")


def _pair(rows: list[dict], where_a: dict, where_b: dict):
  """(a's rows, b's rows, how they pair), one per batch size: from the last record holding both
  (one run, so their speeds compare: "one run"), else the latest rows of the two on the same
  protocol and prompts ("separate runs"), else each method's latest row ("different prompts":
  not comparable)."""
  out_a, out_b, how = [], [], "one run"
  for batch in BATCHES:
    a = [r for r in rows if matches(r, {**where_a, "batch_size": batch})]
    b = [r for r in rows if matches(r, {**where_b, "batch_size": batch})]
    if not a or not b:
      return None
    shared = {r["_record"] for r in a} & {r["_record"] for r in b}
    if shared:
      a = [r for r in a if r["_record"] == max(shared)]
      b = [r for r in b if r["_record"] == max(shared)]
    else:
      alike = [(x, y) for x in a for y in b if _setting(x) == _setting(y)]
      if alike:
        a, b = [max(alike, key=lambda xy: min(xy[0]["_record"], xy[1]["_record"]))[i]
                for i in (0, 1)]
        a, b = [a], [b]
        how = "different prompts" if how == "different prompts" else "separate runs"
      else:
        how = "different prompts"
    out_a.append(a[-1])
    out_b.append(b[-1])
  return out_a, out_b, how


def _lossless(value) -> bool:
  """identical_to_plain: true, or "n/n" rows identical."""
  if isinstance(value, str) and "/" in value:
    same, rows = value.split("/")
    return same == rows
  return value is True


def speculative_pair(recs: list[dict], spec: dict) -> str | None:
  """Method a's τ against b's per batch size, then each of `compare`'s fields the same way."""
  found = _pair(spec_rows(recs), spec["a"]["where"], spec["b"]["where"])
  if found is None:
    return None
  a, b, how = found
  label_a, label_b = spec["a"]["label"], spec["b"]["label"]
  tau_a, tau_b = [r["tau"] for r in a], [r["tau"] for r in b]
  ratios = _triple([x / y for x, y in zip(tau_a, tau_b)], "×")
  parts = [f"{label_a} τ {_triple(tau_a)} against {label_b} {_triple(tau_b)} (batch "
           f"{' / '.join(map(str, BATCHES))}): {ratios}"]
  for c in spec.get("compare", []):
    parts.append(f"{c['label']} {_triple([r[c['field']] for r in a], c['unit'])} against "
                 f"{_triple([r[c['field']] for r in b], c['unit'])}")
  if how == "different prompts":  # (an earlier protocol's row on one side)
    parts[0] += (" (from runs on different prompts or protocols: not comparable; not measured "
                 "side by side under the current protocol)")
  elif spec.get("compare") and how == "separate runs":
    parts[-1] += " (separate runs)"
  if spec.get("identical_to_plain"):
    same = all(_lossless(r.get("identical_to_plain")) for r in a + b)
    parts.append(f"outputs {'identical to' if same else 'differ from'} plain decoding")
  return "; ".join(parts)


class _Fields(string.Formatter):
  """str.format over a record: a list formats element by element; a missing or null field
  raises LookupError."""

  def format_field(self, value, format_spec):
    if value is None:
      raise LookupError("null field")
    if isinstance(value, list):
      return ", ".join(format(v, format_spec) for v in value)
    return format(value, format_spec)


def _fill(r: dict, template: str, fallback: str | None) -> str | None:
  for text in (template, fallback):
    try:
      return _Fields().vformat(text, (), r) if text else None
    except LookupError:
      continue
  return None


def from_records(recs: list[dict], spec: dict) -> str | None:
  """`template` filled from each record matching `where` (only the last if `last`), or
  `fallback` where the template names a field the record lacks; joined (a text repeated by a
  later record, once), after `prefix`."""
  sel = [r for r in recs if matches(r, spec.get("where", {}))]
  sel = sel[-1:] if spec.get("last") else sel
  texts = list(dict.fromkeys(t for r in sel if (t := _fill(r, spec["template"],
                                                             spec.get("fallback")))))
  return spec.get("prefix", "") + spec.get("join", "; ").join(texts) if texts else None


def long_context(recs: list[dict], spec: dict) -> str | None:
  """One pattern's loss beyond the training length against dense attention and against the text
  scored in windows of the training length, from the last long_context record."""
  r = recs[-1]
  p, dense = r["patterns"].get(spec["pattern"]), r["patterns"].get("dense")
  if p is None or dense is None:
    return None
  y = r["yardstick_windows_of_train_len"]
  return (f"{r['seq_len']} tokens ({r['seq_len'] // y['train_len']}× the training length): loss "
          f"{p['loss']:.3f} with `{spec['pattern']}` against {dense['loss']:.3f} dense and "
          f"{y['loss']:.3f} scored in training-length windows; {p['tiles_visited']:.0%} of "
          "tiles visited")


KINDS = {"speculative_pair": speculative_pair, "records": from_records,
         "long_context": long_context}


def ours(spec: dict | None, files: dict[str, list[dict]]) -> str | None:
  if spec is None:
    return None
  if spec.get("kind") not in KINDS:
    raise ValueError(f"{CLAIMS}: kind {spec.get('kind')!r} of {spec}: expected one of "
                     f"{sorted(KINDS)}")
  recs = files.get(spec["file"], [])
  return KINDS[spec["kind"]](recs, spec) if recs else None


def reproductions(results: Results) -> list[str]:
  rows = [[c["claim"], c["paper"], ours(c.get("ours"), results.files) or "not measured yet",
           f"`{c['command']}`" if c.get("command") else NA, c["note"]] for c in results.claims]
  return (["## Reproductions", "",
           "The seed papers' claims that jaxinfer can test on its own hardware. \"Ours\" is "
           "computed from the records below each time this page is built; where no record "
           "exists yet it says so. Our runs are on a 2-core CPU with the embedded 1.3M-parameter "
           "model unless a row says otherwise, so speed claims made on GPUs are mostly not "
           "tested by them. Paper numbers are the authors' own, or Spec-Bench's where marked "
           "independent.", ""] +
          markdown_table(["claim", "paper", "ours", "command", "note"], rows) +
          ["", f"Claims, and the records each of ours is computed from: [`{CLAIMS}`]({CLAIMS})."])
