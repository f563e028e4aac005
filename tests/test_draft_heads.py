"""Draft heads (Medusa-1 and -2 heads, Hydra heads, the EAGLE draft layer): training on a frozen base learns, the
base stays bitwise frozen, the files round-trip, Medusa's tree is prefix-closed, and serving
them is lossless."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import checkpoint
from jaxinfer import model as M
from jaxinfer.draft_heads import eagle, hydra, medusa, medusa2
from jaxinfer.speculative.proposers import Eagle, Hydra, Medusa
from jaxinfer.train.lm import TokenWindows
from jaxinfer.train.loop import TrainConfig, train
from tests.engine_runs import requests, speculates_losslessly


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

  # Served: greedy output equals plain greedy.
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  st, _ = speculates_losslessly((cfg, base), requests((prompt[:n], 30) for n in (9, 20, 33)),
                                Medusa(paths=tuple(paths)), loaded)
  assert st.row_steps > 0


@pytest.mark.parametrize("method", ["medusa", "medusa2", "hydra", "eagle"])
def test_train_draft_cli_and_generate_with_heads(tmp_path, tiny_model_dir, method):
  """Medusa through the CLI (a thin layer), the others through jaxinfer.train_draft."""
  import jaxinfer
  data = tmp_path / "data.txt"
  data.write_text(("def add(a, b):\n    return a + b\n\n" * 300))
  out = tmp_path / "heads"
  # trained on a mesh: batches over `data`, the frozen base sharded over `model`
  options = dict(steps=20, batch_size=4, seq_len=32, num_heads=2, tree_nodes=6, progress=False,
                 method=method, mesh="data:2,model:2")
  if method == "medusa":  # chat data, self-distilled: the model rewrites each last reply
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Add {i} and b."},
        {"role": "assistant", "content": f"def add(b):\n    return {i} + b"}]}) + "\n"
        for i in range(20)))
    options.update(self_distill=8, distill_new_tokens=48)
  if method == "eagle":  # (one draft layer: no heads, its tree chosen when serving)
    options["draft_vocab"] = 64
    del options["num_heads"], options["tree_nodes"]
  if method == "hydra":  # Hydra++, heads-only training from the model's cached hidden states
    options.update(hidden_cache=str(tmp_path / "cache"), prefix_layer=True, head_layers=2)
  if method == "medusa":
    cmd = [sys.executable, "-m", "jaxinfer", "train-draft", f"--model={tiny_model_dir}",
           f"--data={data}", f"--output={out}", "--cpu_devices=4"] + [
               f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
               for k, v in options.items()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
  else:
    result = jaxinfer.train_draft(str(tiny_model_dir), str(data), str(out), **options)
    assert result.path == out and "accuracy_top1" in result.info
  if method == "medusa":
    replies = (tmp_path / "heads.run" / "distill" / "distill_outputs.jsonl").read_text()
    assert len(replies.splitlines()) == 8
  if method == "hydra":
    cache = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert cache["written"] == cache["num_windows"] > 0 and cache["seq_len"] == 32
    hydra_info = json.loads((out / "hydra_config.json").read_text())
    assert hydra_info["prefix_layer"] and hydra_info["head_layers"] == 2
  if method in ("medusa", "medusa2", "hydra"):
    info = json.loads((out / f"{method.rstrip('2')}_config.json").read_text())
    assert len(info["accuracy_top1"]) == 2 and len(info["tree"]) == 6
    # --tree=nodes:N re-grows the static tree from the stored accuracies
    from jaxinfer.runner import GenerateJob, UserError
    from jaxinfer.speculative.registry import build
    cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
    job = lambda tree: GenerateJob(prompts=str(data), output=str(tmp_path / "x.jsonl"),
                                   speculative=method.rstrip("2"),
                                   draft_heads=str(out), tree=tree)
    small, _ = build(job("nodes:3"), cfg, params, None)
    assert small.tree_size == 4 and set(small.paths) <= set(map(tuple, medusa.build_tree(
        np.asarray(info["accuracy_topk"]), 6)))
    with pytest.raises(UserError, match="--tree"):
      job("nodes:0").validate()
  else:
    info = json.loads((out / "eagle_config.json").read_text())
    assert 0.0 <= info["accuracy_top1"] <= info["accuracy_top5"] <= 1.0
    assert info["draft_vocab_size"] == 64 and 0.0 < info["draft_vocab_coverage"] <= 1.0
  run_dir = tmp_path / "heads.run"
  metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  evals = [m for m in metrics if "predicted_tau" in m]  # held-out evaluation during training
  assert evals and evals[-1]["step"] == 20 and evals[-1]["predicted_tau"] >= 1.0
  top1 = "eval_top1" if method == "eagle" else "eval_head1_top1"
  assert 0.0 <= evals[-1][top1] <= 1.0
  png = (run_dir / "training.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"id": 1, "prompt": "def add(a, b):\n", "max_new_tokens": 16})
                     + "\n")
  # Medusa-2 adapted the base: its heads are served on the adapted model it wrote
  model = out / "model" if method == "medusa2" else tiny_model_dir
  if method == "medusa2":
    assert info["method"] == "medusa2" and 0.0 <= info["greedy_agreement"] <= 1.0
  base = [sys.executable, "-m", "jaxinfer", "generate", f"--model={model}",
          f"--prompts={prompts}", "--progress=false"]
  plain = subprocess.run(base + [f"--output={tmp_path / 'a.jsonl'}", "--scheduler=static"],
                         capture_output=True, text=True, timeout=600)
  served = "medusa" if method == "medusa2" else method
  spec = subprocess.run(base + [f"--output={tmp_path / 'b.jsonl'}", f"--speculative={served}",
                                f"--draft_heads={out}", f"--metrics_output={tmp_path / 'm.json'}",
                                "--speculation=always"],
                        capture_output=True, text=True, timeout=600)
  assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
  a = json.loads((tmp_path / "a.jsonl").read_text())
  b = json.loads((tmp_path / "b.jsonl").read_text())
  assert a["completion_ids"] == b["completion_ids"]
  m = json.loads((tmp_path / "m.json").read_text())
  assert m["speculative"] == served and m["speculative_batches"] > 0
  if method != "medusa2":  # (Medusa-2's heads load as Medusa's)
    bad = subprocess.run(base + [f"--output={tmp_path / 'c.jsonl'}", f"--speculative={served}",
                                 f"--draft_heads={tmp_path}"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "--draft_heads" in bad.stderr and "Traceback" not in bad.stderr


def _hidden(base, cfg, batch):
  positions = jnp.broadcast_to(jnp.arange(batch.shape[1]), batch.shape)
  return M.forward(base, jnp.asarray(batch), positions, cfg)[0]


def test_eagle_draft_learns_on_a_frozen_base_and_serves_losslessly(tmp_path, tiny_model_dir):
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  before = jax.tree_util.tree_map(np.asarray, base)
  dcfg = eagle.draft_config(cfg)
  assert dcfg.num_layers == 1
  tokens = _periodic_tokens(cfg.vocab_size)
  windows = TokenWindows(tokens, 8, 32)
  held = lambda: TokenWindows(_periodic_tokens(cfg.vocab_size, 3000), 1, 32).sequential(20)
  fresh = lambda: eagle.init_draft(dcfg, jax.random.key(0))
  acc0 = eagle.accuracy(eagle.EagleHeads(fresh()), base, cfg, held())
  loss_fn = eagle.eagle_loss_fn(cfg)
  l0, _ = loss_fn(fresh(), base, jnp.asarray(windows(0)), jax.random.key(0))
  tcfg = TrainConfig(steps=100, learning_rate=1e-2, warmup_steps=10, weight_decay=0.0,
                     log_every=20, checkpoint_every=100, progress=False)
  draft, _ = train(loss_fn, fresh(), windows, tcfg, tmp_path / "run", frozen=base)
  l1, m1 = loss_fn(draft, base, jnp.asarray(windows(0)), jax.random.key(0))
  acc = eagle.accuracy(eagle.EagleHeads(draft), base, cfg, held())
  # one step ahead, against the base's own greedy token (what greedy verification accepts)
  assert float(l1) < float(l0) and acc[0] > 0.45 and acc[0] > 2 * acc0[0], (acc0, acc)
  after = jax.tree_util.tree_map(np.asarray, base)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                  jax.tree_util.tree_leaves(after)))

  # A draft vocabulary of the 48 tokens the base predicts most often: scored on those only,
  # the draft still learns.
  vocab = eagle.frequent_tokens(base, cfg, [windows(i) for i in range(8)], 48)
  pred = np.concatenate([np.asarray(jnp.argmax(M.logits(base, _hidden(base, cfg, w)),
                                               -1)).reshape(-1) for w in map(windows, range(8))])
  counts = np.bincount(pred, minlength=cfg.vocab_size)
  assert len(vocab) == 48 and counts[vocab].min() >= np.delete(counts, vocab).max()
  small, _ = train(eagle.eagle_loss_fn(cfg, vocab=vocab), fresh(), windows, tcfg,
                   tmp_path / "run_vocab", frozen=base)
  small_heads = eagle.serving_heads(small, base, vocab)
  assert small_heads.proj.shape == (cfg.embed, 48)
  acc_small = eagle.accuracy(small_heads, base, cfg, held())
  assert acc_small[0] > 0.45, acc_small

  out = eagle.save(tmp_path / "eagle", draft, {"steps": 100})
  loaded, no_vocab, info = eagle.load(out, cfg)
  assert no_vocab is None
  np.testing.assert_array_equal(np.asarray(loaded.fc), np.asarray(draft.fc))
  np.testing.assert_array_equal(np.asarray(loaded.layer.mlp.up), np.asarray(draft.layer.mlp.up))
  assert info["format"] == eagle.FORMAT and eagle.is_eagle(out)
  out_small = eagle.save(tmp_path / "eagle_small", small, {"steps": 100}, vocab)
  _, vocab2, info2 = eagle.load(out_small, cfg)
  np.testing.assert_array_equal(vocab2, vocab)
  assert info2["draft_vocab_size"] == 48
  repeated = vocab.copy()
  repeated[1] = repeated[0]  # (its draws of that token would be verified at one id's chance)
  with pytest.raises(ValueError, match="its draft vocabulary repeats token ids"):
    eagle.load(eagle.save(tmp_path / "eagle_repeated", small, {"steps": 100}, repeated), cfg)
  with pytest.raises(FileNotFoundError, match="not an EAGLE draft"):
    eagle.load(tmp_path, cfg)
  import dataclasses
  with pytest.raises(ValueError, match="shape"):
    eagle.load(out, dataclasses.replace(cfg, embed=2 * cfg.embed))

  # Served (greedy, mixed lengths): equal to plain greedy, with drafts accepted at several
  # depths, so the draft's catch-up on ragged accepted paths is exercised.
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  reqs = requests((prompt[:n], m) for n, m in ((9, 30), (20, 7), (33, 30)))
  for heads in (eagle.serving_heads(loaded, base, None), small_heads):
    st, _ = speculates_losslessly((cfg, base), reqs, Eagle(dcfg, num_draft_tokens=4), heads,
                                  decode_steps=3)
    assert st.accepted_hist[1:].sum() > 0 and st.decode_tokens > st.row_steps


def test_hydra_heads_learn_depend_on_their_path_and_serve_losslessly(tmp_path, tiny_model_dir):
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  before = jax.tree_util.tree_map(np.asarray, base)
  windows = TokenWindows(_periodic_tokens(cfg.vocab_size), 8, 32)
  heads0 = hydra.init_heads(base, 3, jax.random.key(0))
  assert [w.shape[0] for w in heads0.w_in] == [2 * cfg.embed, 3 * cfg.embed, 4 * cfg.embed]
  # zero-initialised output weights: every head starts as the base's next-token predictor
  h = jax.random.normal(jax.random.key(1), (2, cfg.embed))
  path = jax.random.normal(jax.random.key(2), (2, 2, cfg.embed))
  np.testing.assert_allclose(np.asarray(hydra.head_logits(heads0, 1, h, path)),
                             np.asarray(M.logits(base, h)), rtol=1e-5, atol=1e-5)
  heads, _ = train(hydra.hydra_loss_fn(cfg, teacher=False), heads0, windows, TrainConfig(
      steps=60, learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, log_every=10,
      checkpoint_every=60, progress=False), tmp_path / "run", frozen=base)
  acc = hydra.topk_accuracy(heads, base, cfg, TokenWindows(
      _periodic_tokens(cfg.vocab_size, 3000, seed=0), 1, 32).sequential(max_batches=20))
  assert acc.shape == (3, 10) and (acc[:, 0] > 0.5).all()  # chance is 1/vocab
  after = jax.tree_util.tree_map(np.asarray, base)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                  jax.tree_util.tree_leaves(after)))
  # sequential dependence: head 1's prediction changes with the drafted token it is given
  other = path.at[:, 1].set(jnp.take(base.embed, jnp.array([3, 4]), axis=0))
  assert not np.allclose(np.asarray(hydra.head_logits(heads, 1, h, path)),
                         np.asarray(hydra.head_logits(heads, 1, h, other)))
  # the teacher loss (default) trains too
  tl = hydra.hydra_loss_fn(cfg)
  assert np.isfinite(float(tl(heads, base, jnp.asarray(windows(0)), None)[0]))

  paths = medusa.build_tree(acc, 8)
  out = hydra.save(tmp_path / "heads", heads, {"tree": [list(p) for p in paths]})
  loaded, info = hydra.load(out)
  np.testing.assert_array_equal(np.asarray(loaded.w_in[2]), np.asarray(heads.w_in[2]))
  assert info["num_heads"] == 3 and hydra.is_hydra(out)
  with pytest.raises(FileNotFoundError, match="not Hydra heads"):
    hydra.load(tmp_path)

  # Served (the tree drafted level by level, per branch): greedy output equals plain greedy at
  # mixed lengths.
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  st, _ = speculates_losslessly((cfg, base), requests(
      (prompt[:n], m) for n, m in ((9, 30), (20, 7), (33, 30))), Hydra(paths=tuple(paths)),
      loaded, decode_steps=3)
  assert st.decode_tokens > st.row_steps


def test_medusa2_adapts_the_base_and_the_kl_term_keeps_its_outputs(tmp_path, tiny_model_dir):
  """Joint heads + LoRA: the adapters start as a no-op, the heads learn, and the KL term is what
  keeps the adapted base's greedy predictions on the original's: with it (weight 10) they agree
  on >= 85% of held-out positions, without it (weight 0) on fewer than half."""
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  before = jax.tree_util.tree_map(np.asarray, base)
  lora = medusa2.init_lora(base, 4, jax.random.key(0))
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(medusa2.merge(base, lora))))
  tokens = _periodic_tokens(cfg.vocab_size)
  runs = {}
  for kl in (10.0, 0.0):
    heads, tuned, info = medusa2.train_medusa2(
        cfg, base, tokens[:18000], tokens[18000:], tmp_path / f"run{kl}", num_heads=3,
        tree_nodes=6, rank=4, kl_weight=kl, steps=60, batch_size=8, seq_len=32,
        learning_rate=1e-2, warmup_steps=5, checkpoint_every=60, progress=False)
    runs[kl] = (heads, tuned, info)
    assert min(info["accuracy_top1"]) > 0.8
  assert runs[10.0][2]["greedy_agreement"] >= 0.85 > 0.5 > runs[0.0][2]["greedy_agreement"]
  after = jax.tree_util.tree_map(np.asarray, base)  # the original itself is never changed
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                  jax.tree_util.tree_leaves(after)))
  metrics = [json.loads(l) for l in (tmp_path / "run10.0" / "metrics.jsonl").read_text()
             .splitlines()]
  assert "eval_greedy_agreement" in metrics[-1] and "kl" in metrics[-1]

  # Served on the adapted model: lossless with respect to that model.
  heads, tuned, info = runs[10.0]
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  speculates_losslessly((cfg, tuned), requests((prompt[:n], 20) for n in (9, 20)),
                        Medusa(paths=tuple(map(tuple, info["tree"]))), heads)


def test_hidden_cache_builds_resumes_refuses_and_trains_like_the_base(
    tmp_path, tiny_model_dir, monkeypatch):
  from tests.conftest import make_tiny_model_dir

  from jaxinfer.draft_heads import hidden_cache as hc
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  tokens = _periodic_tokens(cfg.vocab_size, 24 * 16 + 1)
  path = tmp_path / "cache"
  windows = tokens[:24 * 16 + 1][np.arange(24)[:, None] * 16 + np.arange(17)[None]]

  # A build that crashes after its second batch keeps what it wrote; the next one finishes it.
  finish = hc._finish
  def crash(p, config, end, *writes):
    finish(p, config, end, *writes)
    if end >= 10:
      raise RuntimeError("killed")
  monkeypatch.setattr(hc, "_finish", crash)
  with pytest.raises(RuntimeError, match="killed"):
    hc.build(path, base, cfg, tokens, 16, batch_size=5, progress=False)
  monkeypatch.setattr(hc, "_finish", finish)
  assert json.loads((path / "cache.json").read_text())["written"] == 10
  with pytest.raises(ValueError, match="incomplete"):
    hc.HiddenCache(path)
  cache = hc.build(path, base, cfg, tokens, 16, batch_size=5, progress=False)
  assert cache.num_windows == 24
  np.testing.assert_array_equal(cache.tokens.read().result(), windows)
  np.testing.assert_allclose(cache.hidden.read().result(), _hidden(base, cfg, windows[:, :-1]),
                             rtol=1e-5, atol=1e-5)

  # Refused: other data, another window length, another model.
  with pytest.raises(ValueError, match="other data"):
    hc.build(path, base, cfg, tokens[::-1].copy(), 16, batch_size=5, progress=False)
  with pytest.raises(ValueError, match="seq_len"):
    hc.build(path, base, cfg, tokens, 8, batch_size=5, progress=False)
  _, other, _ = checkpoint.load_model(str(make_tiny_model_dir(tmp_path / "other", seed=1)))
  with pytest.raises(ValueError, match="another model"):
    hc.build(path, other, cfg, tokens, 16, batch_size=5, progress=False)

  # Batches: each epoch a permutation of the windows, fixed by (seed, step) — a fresh reader (a
  # resumed run) reads what a running one (prefetching) does.
  reader, fresh = hc.HiddenBatches(cache, 8, seed=3), hc.HiddenBatches(cache, 8, seed=3)
  seen = [reader.indices(s) for s in range(6)]
  assert sorted(np.concatenate(seen[:3])) == list(range(24))
  assert sorted(np.concatenate(seen[3:])) == list(range(24))
  assert not np.array_equal(np.concatenate(seen[:3]), np.concatenate(seen[3:]))
  batches = [reader(s) for s in range(5)]
  late = fresh(4)
  for key in ("tokens", "hidden"):
    np.testing.assert_array_equal(late[key], batches[4][key])
  np.testing.assert_array_equal(batches[1]["tokens"], windows[seen[1]])
  np.testing.assert_array_equal(batches[1]["hidden"], cache.hidden.read().result()[seen[1]])

  # Every heads-only loss is the same on a cached batch as on its token windows.
  b = jnp.asarray(batches[1]["tokens"])
  cached = jax.tree_util.tree_map(jnp.asarray, batches[1])
  draft = eagle.init_draft(eagle.draft_config(cfg), jax.random.key(1))
  for fn, p in [(medusa.medusa_loss_fn(cfg), medusa.init_heads(base, 2)),
                (hydra.hydra_loss_fn(cfg), hydra.init_heads(base, 2, jax.random.key(0))),
                (eagle.eagle_loss_fn(cfg), draft)]:
    (l_tok, _), g_tok = jax.value_and_grad(fn, has_aux=True)(p, base, b, jax.random.key(2))
    (l_c, _), g_c = jax.value_and_grad(fn, has_aux=True)(p, base, cached, jax.random.key(2))
    np.testing.assert_allclose(float(l_c), float(l_tok), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(g_c), jax.tree_util.tree_leaves(g_tok)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_hydra_plus_plus_trains_reads_context_and_serves_from_its_cache(tmp_path,
                                                                        tiny_model_dir):
  """Hydra++: the prefix-attention layer and deeper heads (two residual blocks each here)."""
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  pcfg = hydra.prefix_config(cfg)
  heads0 = hydra.init_heads(base, 3, jax.random.key(0), pcfg, head_layers=2)
  assert heads0.head_layers == 2 and heads0.block_in[0].shape == (1, cfg.embed, cfg.embed)
  # self-distilled data: the base's own greedy continuations (teacher loss, as served)
  from jaxinfer.generation import Generator, RowRequest
  src = _periodic_tokens(cfg.vocab_size, 1000, seed=1)
  tokens = np.concatenate([r.tokens for r in Generator(cfg, base).generate(
      [RowRequest(list(src[i * 50:i * 50 + 16]), 200, jax.random.key(i)) for i in range(16)])])
  windows = TokenWindows(tokens.astype(np.int32), 8, 32)
  batch = jnp.asarray(windows(0))
  # At initialisation the layer passes h / rms(h): the heads still start as the base's predictor.
  h = _hidden(base, cfg, batch[:, :-1])
  pos = jnp.broadcast_to(jnp.arange(32), (8, 32))
  state0, _ = hydra.prefix_forward(heads0, base, h, pos, pcfg)
  np.testing.assert_array_equal(np.argmax(hydra.head_logits(heads0, 0, state0, jnp.take(
      base.embed, batch[:, 1:, None], axis=0)), -1), np.argmax(M.logits(base, h), -1))
  heads, _ = train(hydra.hydra_loss_fn(cfg), heads0, windows, TrainConfig(
      steps=60, learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, log_every=10,
      checkpoint_every=60, progress=False), tmp_path / "run", frozen=base)
  acc = hydra.topk_accuracy(heads, base, cfg, TokenWindows(
      windows.tokens, 1, 32).sequential(max_batches=20))
  assert (acc[:, 0] > 0.15).all()  # chance is 1/vocab
  # the layer and the heads' second blocks were trained
  assert float(jnp.abs(heads.prefix.attn.o).max()) > 0
  assert float(jnp.abs(heads.block_out[2]).max()) > 0
  # Causal over the prefix: changing an early state changes later outputs, never earlier ones.
  state, _ = hydra.prefix_forward(heads, base, h, pos, pcfg)
  moved, _ = hydra.prefix_forward(heads, base, h.at[:, 10].add(1.0), pos, pcfg)
  np.testing.assert_array_equal(moved[:, :10], state[:, :10])
  assert not np.allclose(moved[:, 11:], state[:, 11:])

  out = hydra.save(tmp_path / "heads", heads, {"tree": [[0], [0, 0], [0, 0, 0], [1]]})
  with pytest.raises(ValueError, match="config"):
    hydra.load(out)
  loaded, info = hydra.load(out, jnp.float32, cfg)
  assert info["prefix_layer"] and info["head_layers"] == 2
  np.testing.assert_array_equal(loaded.prefix.mlp.down, heads.prefix.mlp.down)
  np.testing.assert_array_equal(loaded.block_out[1], heads.block_out[1])

  # Serving keeps the layer's own cache: prompt prefill, then per step the accepted path's
  # states — what the heads read equals the layer run over the whole sequence at once.
  proposer = Hydra(paths=((0,), (0, 0), (0, 0, 0), (1,)), prefix=pcfg)
  length, n_prompt = jnp.array([9, 5]), jnp.array([9, 5])
  st = proposer.prefill((loaded, base), h[:2, :12], n_prompt, 40)
  for accepted in ([2, 0], [0, 3], [1, 1]):
    got, st = proposer.heads_input((loaded, base), st)
    want = state[jnp.arange(2), st.start + st.count - 1]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    n = jnp.asarray(accepted)
    chain = jnp.broadcast_to(jnp.array([0, 1, 2, 3, 4]), (2, 5))  # path = the chain's nodes
    verify = jnp.stack([h[r, int(length[r]):int(length[r]) + 5] for r in range(2)])
    st = proposer.update_prefix(st, verify, jnp.zeros((2, 5), jnp.int32), chain, n,
                                jnp.zeros(2, jnp.int32), length, jnp.array([True, True]))
    length = length + n + 1

  from jaxinfer.engine import Engine, EngineConfig
  with pytest.raises(ValueError, match="prefix"):
    Engine(cfg, base, EngineConfig(), 64, proposer=Hydra(paths=((0,),)), draft_params=loaded)
  prompt = list(_periodic_tokens(cfg.vocab_size, 40, seed=0))
  st, _ = speculates_losslessly((cfg, base), requests(
      (prompt[:n], m) for n, m in ((9, 30), (20, 7), (33, 30))),
      Hydra(paths=tuple(map(tuple, medusa.build_tree(acc, 8))), prefix=pcfg), loaded,
      decode_steps=3)
  assert st.decode_tokens >= 1.15 * st.row_steps


def test_eagle_training_time_test_sees_what_drafting_sees(tmp_path, tiny_model_dir):
  """Step j of the training-time test at anchor t equals drafting j tokens ahead from the true
  pairs up to t (the draft's own cache, fed its own predictions); with it the draft trains."""
  from jaxinfer.kv_cache import KVCache
  cfg, base, _ = checkpoint.load_model(str(tiny_model_dir))
  dcfg = eagle.draft_config(cfg)
  draft = eagle.init_draft(dcfg, jax.random.key(1))
  o = 0.05 * jax.random.normal(jax.random.key(2), draft.layer.attn.o.shape)
  down = 0.05 * jax.random.normal(jax.random.key(3), draft.layer.mlp.down.shape)
  draft = draft.replace(layer=draft.layer.replace(attn=draft.layer.attn.replace(o=o),
                                                  mlp=draft.layer.mlp.replace(down=down)))
  batch = jnp.asarray(TokenWindows(_periodic_tokens(cfg.vocab_size), 2, 24)(0))
  feats = _hidden(base, cfg, batch[:, :-1])
  preds = eagle.ttt_predictions(draft, base, feats, batch, dcfg, steps=3)
  pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
  one, _ = eagle.draft_forward(draft, base, feats, batch[:, 1:], pos, dcfg)
  np.testing.assert_allclose(preds[0], one, rtol=1e-5, atol=1e-5)  # step 1: EAGLE-1's input
  for t in (0, 7, 19):
    cache = KVCache.init(dcfg, 2, 32)
    _, cache = eagle.draft_forward(draft, base, feats, batch[:, 1:25],
                                   jnp.where(pos <= t, pos, 32), dcfg, cache)
    feat = preds[0][:, t]
    for j in (1, 2):  # feed the previous step's prediction and the next token
      out, cache = eagle.draft_forward(draft, base, feat[:, None], batch[:, t + j + 1, None],
                                       jnp.full((2, 1), t + j), dcfg, cache, kv_source="cache")
      np.testing.assert_allclose(preds[j][:, t], out[:, 0], rtol=1e-4, atol=1e-5)
      feat = preds[j][:, t]

  loss_fn = eagle.eagle_loss_fn(cfg, ttt_steps=3)
  windows = TokenWindows(_periodic_tokens(cfg.vocab_size), 8, 32)
  l0, m0 = loss_fn(eagle.init_draft(dcfg, jax.random.key(0)), base, jnp.asarray(windows(0)),
                   jax.random.key(0))
  assert {"top1", "top1_step2", "top1_step3"} <= set(m0)
  trained, _ = train(loss_fn, eagle.init_draft(dcfg, jax.random.key(0)), windows, TrainConfig(
      steps=40, learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, log_every=20,
      checkpoint_every=40, progress=False), tmp_path / "run", frozen=base)
  l1, m1 = loss_fn(trained, base, jnp.asarray(windows(0)), jax.random.key(0))
  assert float(l1) < float(l0) and float(m1["top1_step3"]) > float(m0["top1_step3"])
  held = list(TokenWindows(_periodic_tokens(cfg.vocab_size, 3000), 1, 32).sequential(20))
  by_step = eagle.step_accuracy(eagle.EagleHeads(trained), base, cfg, held, steps=3)
  assert by_step.shape == (3,) and by_step[0] == pytest.approx(
      eagle.accuracy(eagle.EagleHeads(trained), base, cfg, held)[0], abs=1e-6)
  with pytest.raises(ValueError, match="ttt_steps"):
    eagle.eagle_loss_fn(cfg, ttt_steps=0)


@pytest.mark.parametrize("method,options,needle", [
    ("eagle", dict(num_heads=3), "num_heads="),
    ("eagle", dict(tree_nodes=8), "tree_nodes="),
    ("medusa", dict(lora_rank=4), "lora_rank="),
    ("hydra", dict(ttt_steps=2), "ttt_steps="),
    ("medusa", dict(prefix_layer=True), "prefix_layer="),
    ("medusa", dict(distill_new_tokens=32), "distill_new_tokens="),
    # (the last head learnt from nothing: a NaN loss, NaN in its config's accuracies)
    ("medusa", dict(seq_len=4), "seq_len: must exceed num_heads=4"),
    ("eagle", dict(seq_len=4, ttt_steps=4), "seq_len: must exceed ttt_steps=4"),
])
def test_train_draft_refuses_options_its_method_would_ignore(tmp_path, method, options, needle):
  """Before any file is read: an option the method never reads is refused by name."""
  import jaxinfer
  from jaxinfer.errors import UserError
  with pytest.raises(UserError, match=needle):
    jaxinfer.train_draft(str(tmp_path / "no_model"), str(tmp_path / "no_data"),
                         str(tmp_path / "heads"), method=method, **options)


def test_heads_are_served_only_on_their_model_from_files_read_whole(tmp_path, tiny_model_dir,
                                                                    monkeypatch):
  """Heads record the model they were trained on: served on another (other weights of the same
  shapes, or another depth) they are refused in one line (they were served silently, drafting
  nothing of use); the same model in bfloat16 serves them. Damaged files are one line each
  (they were tracebacks: a cut-short weights file, a config missing a field, a tree whose node
  has no parent)."""
  import dataclasses

  from safetensors.numpy import save_file

  from conftest import make_tiny_model_dir
  from jaxinfer.draft_heads import files
  from jaxinfer.runner import GenerateJob, UserError
  from jaxinfer.speculative.registry import build
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  good = tmp_path / "heads"
  info = dict(tree=[[0], [1], [0, 0]], accuracy_topk=[[0.5, 0.2], [0.3, 0.1]],
              base=files.base_record(cfg, params))
  medusa.save(good, medusa.init_heads(params, 2), info)
  job = lambda d: GenerateJob(prompts="p", output="o", speculative="medusa", draft_heads=str(d))
  assert build(job(good), cfg, params, None)[0].tree_size == 4
  half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  build(job(good), dataclasses.replace(cfg, dtype="bfloat16"), half, None)
  for seed, overrides, needle in ((1, {}, "another model of the same shapes"),
                                  (0, dict(num_layers=3), "num_layers 2 \\(the model's 3\\)")):
    other = make_tiny_model_dir(tmp_path / f"other{seed}", seed=seed, **overrides)
    ocfg, oparams, _ = checkpoint.load_model(str(other))
    with pytest.raises(UserError, match=needle):
      build(job(good), ocfg, oparams, None)
  config = json.loads((good / "medusa_config.json").read_text())
  broken = {"cut short": lambda d: (d / "heads.safetensors").write_bytes(
                (d / "heads.safetensors").read_bytes()[:100]),
            "no tree": lambda d: (d / "medusa_config.json").write_text(json.dumps(
                {k: v for k, v in config.items() if k != "tree"})),
            "orphan": lambda d: (d / "medusa_config.json").write_text(json.dumps(
                {**config, "tree": [[0], [1, 0]]})),
            "a list": lambda d: (d / "medusa_config.json").write_text("[]"),
            "other tensors": lambda d: save_file({"w_out": np.zeros((2, 2), np.float32)},
                                                 str(d / "heads.safetensors")),
            "ragged accuracy": lambda d: (d / "medusa_config.json").write_text(json.dumps(
                {**config, "accuracy_topk": [[0.5], [0.3, 0.1]]}))}
  for name, needle in (("cut short", "heads.safetensors: not readable"),
                       ("no tree", "its config has no 'tree'"),
                       ("orphan", "node \\[1, 0\\] is not a path"),
                       ("a list", "expected a JSON object"),
                       ("other tensors", "heads.safetensors lacks \\['w', 'b', 'proj'\\]"),
                       ("ragged accuracy", "its accuracy_topk is not a row")):
    bad = tmp_path / name.replace(" ", "_")
    shutil.copytree(good, bad)
    broken[name](bad)
    with pytest.raises(UserError, match=f"^--draft_heads: .*{needle}"):
      build(job(bad), cfg, params, None)
  # a tree stored children first (it was a KeyError when drafting), and "~" as the home
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "unordered").mkdir()
  shutil.copytree(good, tmp_path / "unordered", dirs_exist_ok=True)
  (tmp_path / "unordered" / "medusa_config.json").write_text(json.dumps(
      {**config, "tree": [[0, 0], [0], [1]]}))
  assert build(job("~/unordered"), cfg, params, None)[0].paths == ((0,), (1,), (0, 0))
  # EAGLE-2 taking more drafts a node than its draft vocabulary holds (a traceback mid-run)
  eagle.save(tmp_path / "eagle", eagle.init_draft(eagle.draft_config(cfg), jax.random.key(0)),
             {}, vocab=np.arange(8))
  with pytest.raises(UserError, match="^--tree: dynamic:16,10,3 takes the top 10 drafts of a "
                                      "node, but .* drafts over 8 tokens"):
    build(dataclasses.replace(job(tmp_path / "eagle"), speculative="eagle",
                              tree="dynamic:16,10,3"), cfg, params, None)


def test_train_draft_stops_a_diverged_run_before_writing(tmp_path, tiny_model_dir):
  """Heads trained into NaN (a learning rate far too high) are not written (they were, and the
  run ended well): one error naming learning_rate, the output left absent."""
  import jaxinfer
  from jaxinfer.errors import UserError
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 50)
  with pytest.raises(UserError, match="^learning_rate: training diverged"):
    jaxinfer.train_draft(str(tiny_model_dir), str(data), str(tmp_path / "heads"), num_heads=2,
                         tree_nodes=4, steps=3, batch_size=2, seq_len=16, warmup_steps=0,
                         learning_rate=1e30, progress=False)
  assert not (tmp_path / "heads").exists()


def test_train_draft_refuses_a_draft_vocabulary_of_the_whole(tmp_path, tiny_model_dir):
  import jaxinfer
  from jaxinfer.errors import UserError
  with pytest.raises(UserError, match="draft_vocab: 300 is not below .* vocabulary of 300"):
    jaxinfer.train_draft(str(tiny_model_dir), str(tmp_path / "no_data"), str(tmp_path / "h"),
                         method="eagle", draft_vocab=300)
  # windows past the model's context (it trained on positions it has no rotary table for)
  with pytest.raises(UserError, match="^seq_len: 100000 is past the model's context"):
    jaxinfer.train_draft(str(tiny_model_dir), str(tmp_path / "no_data"), str(tmp_path / "h2"),
                         method="medusa", seq_len=100000)


def test_train_draft_refuses_an_output_it_could_not_write_before_training(tmp_path):
  """An empty output (the working directory) or one under a file was found at the save, after
  the training (or written into the working directory)."""
  import jaxinfer
  from jaxinfer.errors import UserError
  (tmp_path / "f").write_text("")
  for output, needle in (("", "output: empty"), (str(tmp_path / "f" / "heads"), "is a file")):
    with pytest.raises(UserError, match=needle):
      jaxinfer.train_draft(str(tmp_path / "no_model"), str(tmp_path / "no_data"), output)
  # heads of another method there: the two would be mixed (medusa_config.json beside Hydra's
  # weights, served as Medusa's, was a traceback)
  (tmp_path / "heads").mkdir()
  (tmp_path / "heads" / "hydra_config.json").write_text("{}")
  with pytest.raises(UserError, match="output: .* holds hydra heads"):
    jaxinfer.train_draft(str(tmp_path / "no_model"), str(tmp_path / "no_data"),
                         str(tmp_path / "heads"), method="medusa")


def test_self_distillation_writes_its_data_with_the_base_the_heads_train_on(
    tmp_path, tiny_model_dir, monkeypatch):
  """The text the heads learn is written by the model directory the heads train on (its
  resolved place: an `embedded` name's --cache_dir), in the --dtype they train on."""
  import jaxinfer
  from jaxinfer import runner
  from jaxinfer.errors import UserError
  calls = []

  def generate_file(prompts, output, model, **options):
    calls.append((model, options))
    raise UserError("stopped here")

  monkeypatch.setattr(runner, "generate_file", generate_file)
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 50)
  with pytest.raises(UserError, match="stopped here"):
    jaxinfer.train_draft(str(tiny_model_dir), str(data), str(tmp_path / "heads"),
                         dtype="bfloat16", self_distill=2, progress=False)
  [(model, options)] = calls
  assert model == str(checkpoint.resolve_model_dir(str(tiny_model_dir), None))
  assert options["dtype"] == "bfloat16"
