"""The documentation stays true to the code: the generated pages (docs/flags.md, the results
page) equal what their scripts make now, no page names a flag no command defines, and relative
links point at files that exist. No model is built: one subprocess imports the CLI's flags."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS_PAGE = ROOT / "experiments" / "results" / "README.md"

# flags the pages may name that no jaxinfer command defines: absl's own (every command takes
# them), XLA's (XLA_FLAGS, set by tests/conftest.py) and TensorBoard's
NOT_JAXINFER = {"help", "helpfull", "verbosity", "xla_backend_optimization_level",
                "xla_cpu_use_fusion_emitters", "xla_cpu_parallel_codegen_split_count",
                "xla_force_host_platform_device_count", "logdir"}
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def experiment(name: str):
  """experiments/<name>.py as a module (its main does not run)."""
  spec = importlib.util.spec_from_file_location(f"_docs_{name}", ROOT / "experiments" /
                                                f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def results_page():
  """experiments/results_page as a package, as `python experiments/results_readme.py` imports
  it (experiments/ itself is not a package)."""
  if "results_page" not in sys.modules:
    folder = ROOT / "experiments" / "results_page"
    spec = importlib.util.spec_from_file_location("results_page", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sys.modules["results_page"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["results_page"])
  return sys.modules["results_page"]


@pytest.fixture(scope="module")
def commands():
  """{command: {summary, description, flags}} as the CLI defines them now (a fresh process: each
  command's flags go into absl's one registry, which this one must not share)."""
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "docs_flags.py"), "--json"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def cli_flags(commands) -> set[str]:
  return {f["name"] for c in commands.values() for f in c["flags"]}


def test_flags_page_is_current(commands):
  assert set(commands) >= {"generate", "train", "train-draft", "compile"}
  assert "model" in cli_flags(commands) and "speculative" in cli_flags(commands)
  assert (ROOT / "docs" / "flags.md").read_text() == experiment("docs_flags").render(commands), (
      "docs/flags.md is stale: run python experiments/docs_flags.py")


def test_command_help_lists_the_commands_flags(commands):
  """`jaxinfer <command> --help` (as the flag errors and docs/flags.md point to it) lists the
  command's own flags and exits 0."""
  proc = subprocess.run([sys.executable, "-m", "jaxinfer", "train-draft", "--help"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", proc.stdout, re.M))
  assert listed == {f["name"] for f in commands["train-draft"]["flags"]}, proc.stdout


def test_results_page_is_current():
  files = results_page().load().files
  assert {"bench_speculative.jsonl", "long_context.json", "recorded.jsonl"} <= set(files)
  assert "claims.json" not in files
  proc = subprocess.run([sys.executable, "experiments/results_readme.py", "--check"],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr


def test_results_page_check_sees_a_changed_record(tmp_path, capsys):
  page = results_page()
  shutil.copytree(page.RESULTS, tmp_path, dirs_exist_ok=True)
  assert page.main(["results_readme.py"], tmp_path) == 0
  assert page.main(["results_readme.py", "--check"], tmp_path) == 0
  decode = tmp_path / "bench_decode.jsonl"
  decode.write_text(decode.read_text().replace('"step_ms": 0.181', '"step_ms": 0.182', 1))
  assert page.main(["results_readme.py", "--check"], tmp_path) == 1
  assert "is stale" in capsys.readouterr().err


def test_claims_name_fields_their_results_files_have():
  """A misspelt field in claims.json would leave its claim "not measured yet" for good."""
  results = results_page().load()
  for c in results.claims:
    ours = c["ours"]
    if ours is None:
      continue
    recs = results.files[ours["file"]]
    if ours["kind"] == "speculative_pair":
      recs = [{**r, "method": None, **m} for r in recs for m in r["methods"].values()]
    have = {k for r in recs for k in r}
    wheres = [ours.get("where", {})] + [ours[s]["where"] for s in ("a", "b") if s in ours]
    unknown = {k for w in wheres for k in w} - have
    assert not unknown, f"{c['claim']}: {ours['file']} has no field {sorted(unknown)}"


def test_results_page_reports_every_file_and_plot():
  text = RESULTS_PAGE.read_text()
  assert text.startswith("<!-- Generated by `python experiments/results_readme.py`")
  for path in sorted((ROOT / "experiments" / "results").iterdir()):
    if path.suffix in (".jsonl", ".json", ".png"):
      assert f"({path.name})" in text, f"{path.name} is not linked from the results page"
  assert "## Reproductions" in text
  for claim in results_page().load().claims:
    assert f"| {claim['claim']} |" in text, f"claims.json's {claim['claim']!r} is not on the page"
    # a claim with records behind it shows our figure; one without says it is not measured
    row = next(line for line in text.splitlines() if line.startswith(f"| {claim['claim']} |"))
    assert ("not measured yet" in row) == (claim.get("ours") is None), claim["claim"]


def test_pages_name_only_flags_a_command_defines(commands):
  defined = cli_flags(commands) | NOT_JAXINFER
  unknown = sorted({f"{page.relative_to(ROOT)}: --{name}" for page in PAGES
                    for name in FLAG.findall(page.read_text()) if name not in defined})
  assert not unknown, f"flags no jaxinfer command defines: {unknown}"


def test_results_page_commands_use_defined_flags(commands):
  """Its commands run experiments/*.py, whose flags are theirs."""
  defined = cli_flags(commands) | NOT_JAXINFER
  for script in (ROOT / "experiments").glob("*.py"):
    defined |= set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', script.read_text()))
  unknown = sorted(set(FLAG.findall(RESULTS_PAGE.read_text())) - defined)
  assert not unknown, f"the results page names undefined flags: {unknown}"


def anchors(page: Path) -> set[str]:
  """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
  titles = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
  return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_relative_links_resolve():
  broken = []
  for page in PAGES + [RESULTS_PAGE]:
    for target, anchor in LINK.findall(page.read_text()):
      if "://" in target:
        continue
      path = (page.parent / target) if target else page
      if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
        broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
  assert not broken, broken


def test_readme_keeps_the_setup_commands_and_the_api_marker():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci in readme, ".ci/run's command must be the README's second set-up command"
  assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
          "jaxinfer quickstart") in readme
  assert "<!-- python-api -->" in readme
