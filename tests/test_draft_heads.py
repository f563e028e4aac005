"""Medusa-1 heads: training on a frozen base learns, the base stays bitwise frozen, the files
round-trip, the tree is prefix-closed, and serving them is lossless."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import checkpoint
from jaxinfer.draft_heads import medusa
from jaxinfer.generation import Generator, RowRequest
from jaxinfer.speculative.decode import SpeculativeGenerator
from jaxinfer.speculative.proposers import Medusa
from jaxinfer.train.lm import TokenWindows
from jaxinfer.train.loop import TrainConfig, train


def _periodic_tokens(vocab, n=20000, period=7, seed=0):
  """A synthetic task a head can learn: a fixed cycle of tokens with occasional noise."""
  rng = np.random.RandomState(seed)
  cycle = rng.randint(1, vocab, size=period)
  toks = np.tile(cycle, n // period + 1)[:n]
  noise = rng.rand(n) < 0.05
  toks[noise] = rng.randint(1, vocab, size=noise.sum())
  return toks.astype(np.int32)


def test_medusa_heads_learn_on_a_frozen_base(tmp_path, tiny_model_dir):
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  before = jax.tree_util.tree_map(np.asarray, base)
  windows = TokenWindows(_periodic_tokens(cfg.vocab_size), 8, 32)
  heads0 = medusa.init_heads(base, 3)
  assert not np.shares_memory(np.asarray(heads0.proj[0]), np.asarray(heads0.proj[1]))
  loss_fn = medusa.medusa_loss_fn(cfg)
  l0, m0 = loss_fn(heads0, base, jnp.asarray(windows(0)), None)
  heads, logged = train(loss_fn, heads0, windows, TrainConfig(
      steps=60, learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, log_every=10,
      checkpoint_every=60, progress=False), tmp_path / "run", frozen=base)
  l1, m1 = loss_fn(heads, base, jnp.asarray(windows(0)), None)
  assert float(l1) < 0.5 * float(l0)
  acc = medusa.topk_accuracy(heads, base, cfg, TokenWindows(
      _periodic_tokens(cfg.vocab_size, 3000, seed=0), 1, 32).sequential(max_batches=20))
  assert acc.shape == (3, 10) and (acc[:, 0] > 0.5).all()  # chance is 1/vocab
  after = jax.tree_util.tree_map(np.asarray, base)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                  jax.tree_util.tree_leaves(after)))
  # heads are separate weights: training moved them differently
  assert not np.allclose(np.asarray(heads.w[0]), np.asarray(heads.w[1]))

  paths = medusa.build_tree(acc, 8)
  assert len(paths) == 8 and all(p[:-1] in set(paths) | {()} for p in paths)
  assert paths == sorted(paths, key=lambda p: (len(p), p))
  out = medusa.save(tmp_path / "heads", heads, {"tree": [list(p) for p in paths]})
  loaded, info = medusa.load(out)
  np.testing.assert_array_equal(np.asarray(loaded.proj), np.asarray(heads.proj))
  assert info["num_heads"] == 3 and info["tree"][0] == list(paths[0])
  with pytest.raises(FileNotFoundError, match="not Medusa heads"):
    medusa.load(tmp_path)

  # Served: greedy output equals plain greedy, and the trained heads get drafts accepted.
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  rows = [RowRequest(prompt[:n], 30, jax.random.key(n)) for n in (9, 20, 33)]
  plain = Generator(cfg, base).generate(rows)
  spec = SpeculativeGenerator(cfg, base, Medusa(paths=tuple(paths)), draft_params=loaded,
                              page_size=8, policy="always")
  assert [r.tokens for r in spec.generate(rows)] == [r.tokens for r in plain]
  assert spec.stats.mean_accepted_tokens >= 1.0


def test_train_draft_cli_and_generate_with_heads(tmp_path, tiny_model_dir):
  data = tmp_path / "data.txt"
  data.write_text(("def add(a, b):\n    return a + b\n\n" * 300))
  out = tmp_path / "heads"
  cmd = [sys.executable, "-m", "jaxinfer", "train-draft", f"--model={tiny_model_dir}",
         f"--data={data}", f"--output={out}", "--steps=20", "--batch_size=4", "--seq_len=32",
         "--num_heads=2", "--tree_nodes=6", "--progress=false"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr
  info = json.loads((out / "medusa_config.json").read_text())
  assert len(info["accuracy_top1"]) == 2 and len(info["tree"]) == 6
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"id": 1, "prompt": "def add(a, b):\n", "max_new_tokens": 16})
                     + "\n")
  base = [sys.executable, "-m", "jaxinfer", "generate", f"--model={tiny_model_dir}",
          f"--prompts={prompts}", "--scheduler=static", "--progress=false"]
  plain = subprocess.run(base + [f"--output={tmp_path / 'a.jsonl'}"], capture_output=True,
                         text=True, timeout=600)
  spec = subprocess.run(base + [f"--output={tmp_path / 'b.jsonl'}", "--speculative=medusa",
                                f"--draft_heads={out}", f"--metrics_output={tmp_path / 'm.json'}"],
                        capture_output=True, text=True, timeout=600)
  assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
  a = json.loads((tmp_path / "a.jsonl").read_text())
  b = json.loads((tmp_path / "b.jsonl").read_text())
  assert a["completion_ids"] == b["completion_ids"]
  assert json.loads((tmp_path / "m.json").read_text())["speculative"] == "medusa"
  bad = subprocess.run(base + [f"--output={tmp_path / 'c.jsonl'}", "--speculative=medusa",
                               f"--draft_heads={tmp_path}"], capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 2 and "--draft_heads" in bad.stderr and "Traceback" not in bad.stderr
