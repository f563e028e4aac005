"""The embedded-model pipeline end to end (smoke recipe: same code, seconds instead of minutes)."""

import json
import subprocess
import sys

from conftest import own_devices_env
from jaxinfer import embedded
from jaxinfer.checkpoint import load_model


def test_stdlib_corpus_split_is_deterministic():
  recipe = embedded.RECIPES["default"]
  train, heldout = embedded.stdlib_files(recipe)
  assert len(train) > 200 and len(heldout) > 5
  assert not set(train) & set(heldout)
  assert embedded.stdlib_files(recipe) == (train, heldout)
  assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in train)


def test_the_cache_is_in_the_users_cache_directory(monkeypatch, tmp_path):
  """$JAXINFER_CACHE, else $XDG_CACHE_HOME's jaxinfer/, else ~/.cache's; an empty
  $XDG_CACHE_HOME counts as unset (it put the cache in ./jaxinfer, wherever the command ran)."""
  from pathlib import Path
  monkeypatch.delenv("JAXINFER_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", "")
  assert embedded.cache_root() == Path.home() / ".cache" / "jaxinfer"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert embedded.cache_root() == tmp_path / "jaxinfer"
  monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "mine"))
  assert embedded.cache_root() == tmp_path / "mine"


def test_quickstart_builds_caches_and_generates(tmp_path):
  env = {**own_devices_env(), "JAXINFER_CACHE": str(tmp_path / "cache")}  # (one device)
  cmd = [sys.executable, "-m", "jaxinfer", "quickstart", "--recipe=smoke",
         f"--output_dir={tmp_path / 'out'}", "--max_new_tokens=8", "--medusa_steps=20"]
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
  assert first.returncode == 0, first.stderr
  assert "building" in first.stdout and "held-out loss" in first.stdout and "tok/s" in first.stdout
  assert "tau" in first.stdout and first.stdout.count("outputs identical to plain greedy: 4/4") == 2
  assert "training Medusa heads" in first.stdout and "top-1 accuracy per head" in first.stdout
  model_dir = embedded.model_dir(tmp_path / "cache", embedded.RECIPES["smoke"])
  report = json.loads((model_dir / "report.json").read_text())
  assert report["heldout_loss_nats_per_token"] < 6.0  # below uniform over 512 tokens (6.24)
  records = [json.loads(l) for l in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
  assert len(records) == 16 and all("error" not in r for r in records)
  stop = [r for r in records if r["id"] == "stop_at_blank_line"][0]
  assert "\n\n" not in stop["completion"]
  metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert metrics["num_failed"] == 0 and metrics["decode_tokens_per_second"] > 0

  # a second run builds nothing (the speculative demos, run above, are left out: they would
  # only compile again)
  assert (model_dir.parent / "medusa-20" / "medusa_config.json").is_file()
  second = subprocess.run(cmd + ["--speculative_prompts=0"], capture_output=True, text=True,
                          env=env, timeout=900)
  assert second.returncode == 0 and "(cached)" in second.stdout
  assert "building" not in second.stdout and "training Medusa" not in second.stdout
  # a cache directory that cannot be made: one line (it was a traceback)
  (tmp_path / "file").write_text("")
  third = subprocess.run(cmd + [f"--cache_dir={tmp_path / 'file' / 'cache'}"],
                         capture_output=True, text=True, env=env, timeout=900)
  assert third.returncode == 2 and "Traceback" not in third.stderr, third.stderr
  assert third.stderr.strip().splitlines()[-1].startswith("error: --cache_dir: cannot use")
  # the cached model is a plain Hugging Face directory
  cfg, params, tok = load_model(str(model_dir))
  assert cfg.vocab_size == 512 and tok.decode(tok.encode("def f(x):")) == "def f(x):"
