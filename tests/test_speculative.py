"""Speculative decoding end to end, proposer by proposer, in the paged engine: every proposer's
greedy output equals plain greedy decoding token for token (float32), for a request alone and
for more requests of mixed prompt and output lengths than slots; sampled speculation draws what
plain sampling draws; sliding windows, sparsity patterns and meshes keep both. (The engine's own
mechanics with speculation: test_engine_speculation.)"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import checkpoint
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.policy import Plain, TreePolicy, policy_metrics
from jaxinfer.runtime import Runtime
from jaxinfer.speculative import proposers as P
from tests.conftest import make_tiny_model_dir
from tests.engine_runs import (plain_greedy, requests, run_engine, same_distribution,
                               speculates_losslessly)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  return cfg, params


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
  d = make_tiny_model_dir(tmp_path_factory.mktemp("draft"), seed=7, num_layers=1)
  cfg, params, _ = checkpoint.load_model(str(d))
  return cfg, params


def _rows(cfg, n, seed=0, temperature=0.0):
  """n requests of 3..29 prompt tokens (every other one repetitive: n-gram lookup has something
  to find) and budgets of 1, 5, 17 or 40 tokens."""
  rng = np.random.RandomState(seed)
  rows = []
  for i in range(n):
    prompt = list(rng.randint(1, cfg.vocab_size, size=rng.randint(3, 30)))
    if i % 2:
      prompt = (prompt[:5] * 6)[:rng.randint(8, 30)]
    rows.append((prompt, rng.choice([1, 5, 17, 40])))
  return requests(rows, temperature)
def _eagle(cfg):
  """An untrained EAGLE layer with random (not identity) output projections."""
  from jaxinfer.draft_heads import eagle
  dcfg = eagle.draft_config(cfg)
  draft = eagle.init_draft(dcfg, jax.random.key(1))
  o = 0.05 * jax.random.normal(jax.random.key(2), draft.layer.attn.o.shape)
  return P.Eagle(dcfg, num_draft_tokens=3), eagle.EagleHeads(draft.replace(
      layer=draft.layer.replace(attn=draft.layer.attn.replace(o=o))))


def _proposers(cfg, params, other):
  from jaxinfer.speculative.dynamic_tree import EagleTree
  layer_cfg, layer_params = P.layer_skip_draft(cfg, params, (0,))
  chain, heads = _eagle(cfg)
  return {
      "eagle": (chain, heads),
      "eagle-tree": (EagleTree(chain.cfg, num_nodes=7, top_k=2, depth=3), heads),
      "ngram": (P.NGram(num_draft_tokens=4), None),
      "lookahead": (P.Lookahead(num_nodes=7, depth=3, num_candidates=6), None),
      "recycling": (P.Recycling(branching=(3, 2, 1)), None),
      "layerskip": (P.DraftModel(layer_cfg, num_draft_tokens=3), layer_params),
      # Big-Little's fallback: rows stop drafting at an unsure draft
      "draft-fallback": (P.DraftModel(other[0], num_draft_tokens=3, fallback=0.3), other[1]),
      "draft": (P.DraftModel(other[0], num_draft_tokens=2), other[1]),
  }


def _head_proposers(cfg, params):
  """Medusa, Hydra and Hydra++ heads, untrained (random where zeros would make them trivial)."""
  from jaxinfer.draft_heads import hydra, medusa
  paths = ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
  mh = medusa.init_heads(params, 3)
  mh = mh.replace(w=0.3 * jax.random.normal(jax.random.key(3), mh.w.shape))
  pcfg = hydra.prefix_config(cfg)
  return {
      "medusa": (P.Medusa(paths=paths), mh),
      "hydra": (P.Hydra(paths=paths), hydra.init_heads(params, 3, jax.random.key(4))),
      "hydra++": (P.Hydra(paths=paths, prefix=pcfg),
                  hydra.init_heads(params, 3, jax.random.key(5), pcfg)),
  }


@pytest.fixture(scope="module")
def plain(target):
  """{n: (requests, plain greedy tokens by uid)} for the lossless tests' workloads."""
  return {n: (reqs, plain_greedy(target, reqs)) for n, reqs in (
      (1, _rows(target[0], 1, seed=1)), (9, _rows(target[0], 9, seed=21)))}


@pytest.mark.parametrize("name", ["ngram", "lookahead", "recycling", "layerskip", "draft",
                                  "draft-fallback", "eagle", "eagle-tree", "medusa", "hydra",
                                  "hydra++"])
def test_greedy_speculative_equals_greedy(target, other_draft, plain, name):
  """Nine requests of mixed prompt and output lengths in three slots (ragged rows, each
  accepting its own number of tokens per step, slots refilled as rows finish), then one request
  alone: every output equals plain greedy decoding, delivered as rows finish."""
  cfg, params = target
  proposer, draft_params = (_proposers(cfg, params, other_draft) | _head_proposers(cfg, params))[
      name]
  reqs, want = plain[9]
  st, eng = speculates_losslessly(target, reqs, proposer, draft_params, plain=want)
  assert st.row_steps > 0 and st.decode_tokens >= st.row_steps
  assert len(st.accepted_hist) == proposer.max_depth + 1
  assert st.prefill_tokens == sum(len(r.prompt_ids) for r in reqs)  # each whole, once
  reqs, want = plain[1]
  seen = []
  eng.run(reqs, seen.append)
  assert {r.uid: r.tokens for r in seen} == want
  assert st.compilations <= eng.max_shapes


def test_a_sampled_request_samples_what_it_would_alone(target, other_draft):
  """A request's sampled output depends on its own key only: the same alone, next to any other
  requests and in any order of arrival (keys follow the request's progress, not the step's)."""
  cfg, params = target
  proposer, draft_params = _proposers(cfg, params, other_draft)["draft"]
  reqs = _rows(cfg, 7, seed=5, temperature=1.0)
  _, _, eng = run_engine(target, [], proposer, draft_params=draft_params, speculation="always")
  def tokens(batch):
    out = {}
    eng.run(batch, lambda r: out.__setitem__(r.uid, r.tokens))
    return out
  alone = {r.uid: tokens([r])[r.uid] for r in reqs[:3]}
  together = tokens(reqs)
  assert {u: together[u] for u in alone} == alone
  assert tokens(reqs[::-1]) == together


@pytest.mark.parametrize("proposer", [P.NGram(num_draft_tokens=4),
                                      P.Lookahead(num_nodes=8, depth=4)])
def test_lookup_proposers_accept_on_repetitive_text(target, proposer):
  """A random tiny model's greedy output cycles; prompt lookup then has drafts accepted."""
  st, _ = speculates_losslessly(target, requests([([5, 6, 7, 8] * 8, 40)]), proposer)
  assert st.decode_tokens / st.row_steps > 1.5, st.accepted_hist


def test_nothing_compiles_outside_the_counted_steps(target):
  """Every computation of a speculating run happens in a compiled step the engine counts: no
  small eager operation compiles on first use beside them. (Caches cleared first, so that
  operations another test compiled cannot hide one.)"""
  from jaxinfer.compilation_cache import CompileClock
  reqs = requests([([5, 6, 7, 8] * 4, 12)] * 3)
  _, _, eng = run_engine(target, [], P.NGram(num_draft_tokens=4), speculation="always")
  jax.clear_caches()
  before, counted = CompileClock.totals(), eng.stats.compilations
  eng.run(reqs, lambda r: None)
  after = CompileClock.totals()
  assert after[1] - before[1] == eng.stats.compilations - counted > 0


def test_ngram_drafts_the_known_continuation_of_a_match():
  from jaxinfer.sampling import SamplingParams
  rows = [[1, 2, 3, 9, 1, 2],  # "1 2" before: 3 9 then 1 2 (the root) are known
          [7, 8, 9, 7],  # "7": 8 9 7 known, the fourth draft is not
          [1, 2, 3]]  # no earlier match: the row decodes plainly
  hist = np.zeros((3, 16), np.int32)
  for i, r in enumerate(rows):
    hist[i, :len(r)] = r
  ctx = P.Context(jnp.asarray(hist), jnp.asarray([len(r) - 1 for r in rows]),
                  SamplingParams.make(3), jax.random.split(jax.random.key(0), 3))
  draft = jax.jit(lambda c: P.NGram(num_draft_tokens=4).draft(None, (), c)[1])(ctx)
  assert np.asarray(draft.tokens)[:2, 1:].tolist() == [[3, 9, 1, 2], [8, 9, 7, 7]]
  assert np.asarray(draft.limit).tolist() == [4, 3, 0]


def test_lookahead_builds_the_trie_of_the_best_matches():
  from jaxinfer.sampling import SamplingParams
  from pallas_kernels.tree_attention import ancestor_matrix
  # Row 0: the last tokens "1 2" occur three times before, followed by 3 7 5, 4 9 1 and 3 9 1.
  row0 = [1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 7, 5, 1, 2]
  row1 = [6, 7, 8, 9, 10, 11]  # no earlier match of its last token
  hist = np.zeros((2, 24), np.int32)
  hist[0, :len(row0)], hist[1, :len(row1)] = row0, row1
  ctx = P.Context(jnp.asarray(hist), jnp.asarray([len(row0) - 1, len(row1) - 1]),
                  SamplingParams.make(2), jax.random.split(jax.random.key(0), 2))
  def draft(**kw):
    d = jax.jit(lambda c: P.Lookahead(depth=3, **kw).propose((), c)[1])(ctx)
    return np.asarray(d.tokens), np.asarray(d.parents)
  # heaviest first: "3" (two matches), then "4", then depth 2 by recency: "3 7", "4 9", "3 9"
  tokens, parents = draft(num_nodes=4)
  assert tokens[0].tolist() == [2, 3, 4, 7, 9] and parents[0].tolist() == [-1, 0, 0, 1, 2]
  tokens, parents = draft(num_nodes=6)
  assert tokens[0].tolist() == [2, 3, 4, 7, 9, 9, 5]
  assert parents[0].tolist() == [-1, 0, 0, 1, 2, 1, 3]
  # the whole trie (8 nodes), then unused slots chained below its deepest node
  tokens, parents = draft(num_nodes=11)
  assert parents[0].tolist() == [-1, 0, 0, 1, 2, 1, 3, 4, 5, 8, 9, 10]
  assert tokens[0, :9].tolist() == [2, 3, 4, 7, 9, 9, 5, 1, 1]
  assert parents[1].tolist() == list(range(-1, 11))  # no match: one chain
  # worth trying: the trie's nodes (three deep), not the unused chain; no match, none
  assert jax.jit(lambda c: P.Lookahead(depth=3, num_nodes=11).propose((), c)[1].limit)(
      ctx).tolist() == [3, 0]
  # Valid trees for the lossless rule: parents first, siblings distinct.
  rng = np.random.RandomState(0)
  hist = jnp.asarray(rng.randint(0, 4, size=(3, 64)), jnp.int32)
  ctx = P.Context(hist, jnp.asarray([10, 40, 63]), SamplingParams.make(3),
                  jax.random.split(jax.random.key(0), 3))
  d = P.Lookahead(num_nodes=12, depth=4).propose((), ctx)[1]
  tok, par = np.asarray(d.tokens), np.asarray(d.parents)
  assert (par[:, 1:] < np.arange(1, 13)).all() and (par[:, 1:] >= 0).all()
  for r in range(3):
    for node in range(13):
      kids = tok[r, 1:][par[r, 1:] == node]
      assert len(set(kids.tolist())) == len(kids), (r, node)
  assert np.asarray(ancestor_matrix(jnp.asarray(par))).sum(-1).max() <= 13


def test_big_little_fallback_stops_drafting_at_an_unsure_draft(target):
  """With fallback 1.0 no draft is sure enough: every row stops after its first draft, so no
  step accepts two drafts, and decode-only steps verify only the root and that draft (its
  limit); without it the same draft model gets deeper, over the whole chain; both lossless."""
  cfg, params = target
  layer_cfg, layer_params = P.layer_skip_draft(cfg, params, (0, 1))
  reqs = requests([([5, 6, 7, 8] * 8, 40), ([9, 3, 9, 3, 9, 3], 25)])
  want = plain_greedy(target, reqs)
  hists = {}
  nodes = {}
  for fallback in (0.0, 1.0):
    st, _ = speculates_losslessly(target, reqs, P.DraftModel(
        layer_cfg, num_draft_tokens=4, fallback=fallback), layer_params, plain=want)
    hists[fallback], nodes[fallback] = st.accepted_hist, st.verified_nodes / st.row_steps
  # (a step that prefills prompts beside the trees computes them whole)
  assert nodes[0.0] == 5 and nodes[1.0] < 2.5
  assert hists[1.0][2:].sum() == 0 and hists[1.0][1] > 0
  assert hists[0.0][2:].sum() > 0


def test_sampling_runs_and_respects_budgets(target):
  cfg, params = target
  reqs = _rows(cfg, 4, seed=9, temperature=1.0)
  runs = [run_engine(target, reqs, P.NGram(num_draft_tokens=3), speculation="always")[0]
          for _ in range(2)]
  for r in reqs:
    o = runs[0][r.uid]
    assert 1 <= len(o.tokens) <= r.max_new_tokens
    assert all(0 <= t < cfg.vocab_size for t in o.tokens)
    assert o.finished_by_eos or len(o.tokens) == r.max_new_tokens
  assert {u: o.tokens for u, o in runs[1].items()} == {u: o.tokens for u, o in runs[0].items()}


def test_auto_policy_measures_every_level_and_stays_lossless(target, other_draft):
  """Run after run, the engine's auto policy (trees affordable from the start) measures plain
  decoding, the proposer's tree and a halved tree, then picks among them by measured speed;
  outputs equal plain greedy whichever ran, and the metrics say what ran."""
  cfg, params = target
  reqs = _rows(cfg, 5, seed=11)
  want = plain_greedy(target, reqs)
  proposer, draft_params = _proposers(cfg, params, other_draft)["layerskip"]
  _, _, eng = run_engine(target, [], proposer, draft_params=draft_params, speculation="auto",
                         decode_steps=2)
  assert [p.tree_size for p in eng.ladder] == [4, 2, 1]  # 3 drafted tokens, 1, plain decoding
  assert isinstance(eng.policy, TreePolicy) and isinstance(eng.ladder[-1], Plain)
  eng.policy.AMORTIZE = 0.0  # (a tree's compilation is paid for at once)
  eng.policy.start_call()
  for _ in range(4):
    out = {}
    eng.run(reqs, lambda r: out.__setitem__(r.uid, r.tokens))
    assert out == want
  policy = eng.policy
  assert all(n >= TreePolicy.MEASURED for n in policy.measured), policy.measured
  assert all(policy.tps(level) > 0 for level in range(3)) and policy.tau(2) == 1.0
  m = policy_metrics([policy], eng.cfg.num_slots)
  assert m["plain_batches"] == policy.dispatches[2] > 0
  assert m["speculative_batches"] == policy.dispatches[0] + policy.dispatches[1]
  assert {k: v["batches"] for k, v in m["tree_sizes"].items()} == {
      "4": policy.dispatches[0], "2": policy.dispatches[1]}
  assert all(v["tokens_per_second"] > 0 for v in m["tree_sizes"].values())
  assert m["speculation"].startswith("speculating in ")
  assert sum(eng.stats.accepted_hist) == eng.stats.row_steps
  # the work in sight: what is left of the budgets at the share of them that the finished
  # requests used (budgets taken whole, requests ending at EOS made a short job look long)
  assert eng._finished == [sum(map(len, want.values())), sum(r.max_new_tokens for r in reqs)]
  eng._finished, eng._budget = [10, 400], 4000
  assert eng._work_s() == pytest.approx(max(100 * eng._life_s / eng._life_tokens, eng._life_s))


def test_generate_job_with_speculation(tmp_path, tiny_model_dir):
  from jaxinfer.runner import GenerateJob, UserError, run
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": 1, "prompt": "def add(a, b):\n    return a + b\n\ndef add(", "max_new_tokens": 20},
      {"id": 2, "prompt_ids": [5, 6, 7, 8] * 6, "max_new_tokens": 30},
      {"id": 3, "prompt": "class Point:", "max_new_tokens": 12, "stop": ["e"]}]))

  def job(name, **kw):
    out = tmp_path / f"{name}.jsonl"
    kw.setdefault("mesh", "data:1")  # one replica (each compiles its own steps) unless asked
    m = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(tiny_model_dir),
                        batch_size=2, progress=False, **kw))
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}, m

  plain, _ = job("plain", scheduler="static")  # (the plain steps, in static waves)
  for method, shape, policy in (("ngram", dict(num_draft_tokens=2), "auto"),
                                ("recycling", dict(tree="2,1"), "always")):
    # (every proposer: test_greedy_speculative_equals_greedy)
    spec, m = job(method, speculative=method, speculation=policy, **shape)
    assert {i: r["completion_ids"] for i, r in spec.items()} == {
        i: r["completion_ids"] for i, r in plain.items()}, method
    assert m["speculative"] == method and m["mean_accepted_tokens"] >= 1.0
    assert sum(m["accepted_length_histogram"]) == m["verify_steps"] > 0
    assert m["scheduler"] == "continuous"
    assert sum(v["batches"] for v in m["tree_sizes"].values()) == m["speculative_batches"]
    if policy == "always":  # the proposer's tree (2,1: 5 tokens), every dispatch
      assert set(m["tree_sizes"]) == {"5"} and m["plain_batches"] == 0
      assert m["speculation"] == "speculating throughout with 5-token trees"
    else:  # a job this short does not pay for compiling trees: the policy says so
      assert m["speculative_batches"] == 0 and m["plain_batches"] > 0
      assert "decoded plainly throughout: trees not tried yet" in m["speculation"]
  # Several samples per prompt, sampled speculatively in slots: each sample as it would be
  # drawn alone (its own key), the records whole; the same on two replicas each over an fsdp
  # axis (rows, their pages and the draft caches split between its devices)
  from jaxinfer.requests import Defaults
  hot = dict(speculative="ngram", num_samples=2, speculation="always",
             defaults=Defaults(temperature=1.0))
  one, m = job("hot1", **hot)
  assert all(len(r["samples"]) == 2 for r in one.values()) and m["num_samples"] == 2
  assert len({tuple(s["completion_ids"]) for s in one[2]["samples"]}) > 1
  split, m = job("hot2", mesh="data:2,fsdp:2", **hot)
  assert m["replicas"] == 2 and m["verify_steps"] > 0 and split == one
  # a draft model of as many tokens, two of them with each other's ids
  other_tokens = tmp_path / "other_tokens"
  shutil.copytree(tiny_model_dir, other_tokens)
  tok = json.loads((other_tokens / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  a, b = sorted(vocab)[100:102]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (other_tokens / "tokenizer.json").write_text(json.dumps(tok))
  for kw, flag in ((dict(speculative="ngram", decode_steps=0), "--decode_steps"),
                   (dict(speculative="ngram", speculation="never"), "--speculation"),
                   (dict(speculative="draft"), "--draft_model"),
                   (dict(speculative="recycling", tree="4,x"), "--tree"),
                   (dict(speculative="ngram", tree="dynamic"), "--tree"),
                   (dict(speculative="ngram", tree="nodes:4"), "--tree"),
                   (dict(speculative="lookahead", tree="2,1"), "--tree"),
                   (dict(speculative="ngram", draft_fallback=0.5),
                    "--draft_fallback"),
                   (dict(speculative="layerskip", draft_fallback=2.0),
                    "--draft_fallback"),
                   (dict(speculative="eagle", tree="dynamic:99,2,3",
                         draft_heads=str(tmp_path)), "--tree"),
                   (dict(speculative="draft", draft_model=str(other_tokens)),
                    "--draft_model: its tokenizer is not the model's \\(token .* is id")):
    with pytest.raises(UserError, match=flag):
      run(GenerateJob(prompts=str(prompts), output=str(tmp_path / "x.jsonl"),
                      model=str(tiny_model_dir), progress=False, **kw))


@pytest.mark.parametrize("name", ["draft-fallback", "recycling", "lookahead", "eagle",
                                  "eagle-tree"])
def test_sampled_speculation_matches_plain_sampling(target, other_draft, name):
  """The joint distribution of the first three tokens (drawn by verifications: accepted drafts
  or the rule's residual) equals plain sampling's, two-sample chi-square over 1000 requests
  each; top_k = 3 keeps the support small. The draft model is the target's first layer
  (Big-Little's fallback on: here it cuts every second draft), whose distribution differs from
  the target's. (Prompt lookup and
  that draft without the fallback: test_engine_speculation.)"""
  cfg, params = target
  layer_cfg, layer_params = P.layer_skip_draft(cfg, params, (0,))
  proposer, draft_params = (_proposers(cfg, params, other_draft) | {"draft-fallback": (
      P.DraftModel(layer_cfg, num_draft_tokens=2, fallback=0.1), layer_params)})[name]
  prompt = [5, 6, 7, 292, 292, 5, 6, 7, 292]  # (the tiny model often continues 5)
  reqs = lambda salt: requests([(prompt, 3)] * 1000, 1.0, 3, salt)
  kw = dict(num_slots=32, chunk_lanes=8, decode_steps=2)
  plain, _, _ = run_engine(target, reqs(0), **kw)
  spec, st, _ = run_engine(target, reqs(1), proposer, draft_params=draft_params,
                           speculation="always", **kw)
  assert st.decode_tokens > st.row_steps  # drafts were accepted
  same_distribution(plain, spec)


def test_dynamic_tree_draft_attention_matches_dense():
  """Tree-growing attention: each query sees the cache prefix (positions < prefix_len) and the
  tree slots its mask marks, nothing else (checked against a per-query dense softmax)."""
  from jaxinfer.speculative.dynamic_tree import _TreeDraftLayer
  rng = np.random.RandomState(0)
  b, t, n, kh, h, s, nt = 2, 3, 4, 2, 8, 10, 6
  f = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)
  q, k, v, tk, tv = f(b, t, n, h), f(kh, b, s, h), f(kh, b, s, h), f(kh, b, nt, h), f(kh, b, nt, h)
  prefix = np.array([4, 7])
  mask = rng.rand(b, t, nt) < 0.5
  layer = _TreeDraftLayer(k, v, tk, tv, jnp.asarray(prefix), jnp.asarray(mask), 0)
  out = np.asarray(layer.attend(None, q, None))
  g = n // kh
  for bi in range(b):
    for ti in range(t):
      for ni in range(n):
        hk = ni // g
        keys = np.concatenate([np.asarray(k)[hk, bi, :prefix[bi]],
                               np.asarray(tk)[hk, bi, mask[bi, ti]]])
        vals = np.concatenate([np.asarray(v)[hk, bi, :prefix[bi]],
                               np.asarray(tv)[hk, bi, mask[bi, ti]]])
        sc = keys @ np.asarray(q)[bi, ti, ni] / np.sqrt(h)
        p = np.exp(sc - sc.max())
        np.testing.assert_allclose(out[bi, ti, ni], (p / p.sum()) @ vals, rtol=1e-4, atol=1e-5)


def test_dynamic_tree_shapes_and_chain_equivalence(target):
  """A dynamic tree is a valid per-row tree (parents earlier, depth <= depth); with top_k = 1 it
  is the greedy chain the chain proposer drafts."""
  from jaxinfer import model as M
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.speculative.dynamic_tree import EagleTree
  from pallas_kernels.tree_attention import ancestor_matrix
  cfg, params = target
  chain, heads = _eagle(cfg)
  b, max_len = 3, 64
  rng = np.random.RandomState(3)
  history = jnp.asarray(rng.randint(1, cfg.vocab_size, size=(b, max_len)), jnp.int32)
  prompt_len = jnp.asarray([5, 17, 30], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
  feats, _ = M.forward(params, history, pos, cfg)
  ctx = P.Context(history, prompt_len, SamplingParams.make(b),
                  jax.random.split(jax.random.key(0), b))
  def drafted(proposer):
    @jax.jit
    def run(heads, params, feats, ctx):
      st = proposer.prefill((heads, params), feats, ctx.history, ctx.length,
                            ctx.history[jnp.arange(b), ctx.length], max_len)
      return proposer.propose((heads, params), st, ctx)[1]
    return run(heads, params, feats, ctx)

  for tree in (EagleTree(chain.cfg, num_nodes=4, top_k=1, depth=4),
               EagleTree(chain.cfg, num_nodes=9, top_k=3, depth=3)):
    draft = drafted(tree)
    parents = np.asarray(draft.parents)
    assert draft.tokens.shape == (b, tree.tree_size) and parents.shape == (b, tree.tree_size)
    assert (parents[:, 0] == -1).all() and (parents[:, 1:] < np.arange(1, tree.tree_size)).all()
    assert (parents[:, 1:] >= 0).all()
    depth = np.asarray(ancestor_matrix(jnp.asarray(parents))).sum(-1) - 1
    assert depth.max() <= tree.depth
    if tree.top_k == 1:
      want = drafted(P.Eagle(chain.cfg, num_draft_tokens=4))
      np.testing.assert_array_equal(np.asarray(draft.tokens), np.asarray(want.tokens))
      np.testing.assert_array_equal(parents, np.broadcast_to(np.arange(-1, 4), (b, 5)))
    else:  # siblings are distinct tokens
      tokens = np.asarray(draft.tokens)
      for r in range(b):
        for p in set(parents[r, 1:]):
          kids = tokens[r, 1:][parents[r, 1:] == p]
          assert len(set(kids)) == len(kids)


def test_shrink_halves_every_proposers_tree(target, other_draft):
  """Each proposer's smaller trees: strictly smaller, still valid trees (parents before
  children), a static heads tree's kept paths closed under prefixes and, given the heads'
  accuracies, the tree Medusa's construction grows for that size."""
  from jaxinfer.draft_heads.medusa import build_tree
  cfg, params = target
  every = _proposers(cfg, params, other_draft) | _head_proposers(cfg, params)
  for name, (proposer, _) in every.items():
    sizes, p = [proposer.tree_size], proposer
    while (p := P.shrink(p)) is not None:
      assert p.tree_size < sizes[-1] and p.name == proposer.name, name
      assert p.max_depth <= proposer.max_depth, name  # its histogram fits the original's
      sizes.append(p.tree_size)
      if isinstance(p, (P.Medusa, P.Hydra)):
        assert all(q[:-1] in p.paths or len(q) == 1 for q in p.paths), name
      if isinstance(p, P.Recycling):
        assert (P.tree_parents(p.branching)[1:] < np.arange(1, p.tree_size)).all()
    assert sizes[-1] == 2, (name, sizes)  # down to a single drafted token
  acc = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.1], [0.4, 0.2, 0.05]])
  med = P.Medusa(paths=tuple(build_tree(acc, 20)), accuracy=tuple(map(tuple, acc)))
  while (med := P.shrink(med)) is not None:
    assert med.paths == tuple(build_tree(acc, med.tree_size - 1))
  # Token Recycling's smaller trees read and refresh the adjacency of the full one
  full = P.Recycling(branching=(4, 2, 1))
  small = P.shrink(P.shrink(full))
  adj = full.init_adjacency(cfg.vocab_size)
  logits = jax.random.normal(jax.random.key(0), (2, small.tree_size, cfg.vocab_size))
  tokens = jnp.arange(2 * small.tree_size, dtype=jnp.int32).reshape(2, -1) + 3
  new = small.update(adj, tokens, logits)
  k = adj.shape[1]  # (the full tree's width)
  np.testing.assert_array_equal(new[tokens], jax.lax.top_k(logits, k)[1])
  untouched = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(tokens).ravel())
  np.testing.assert_array_equal(new[untouched], adj[untouched])
  # a row not live (an idle or finished slot, verified over what it last held) writes nothing
  from types import SimpleNamespace
  new = small.observe(None, adj, SimpleNamespace(tokens=tokens, logits=logits,
                                                 live=jnp.asarray([True, False])))
  np.testing.assert_array_equal(new[tokens[0]], jax.lax.top_k(logits[0], k)[1])
  np.testing.assert_array_equal(new[tokens[1]], adj[tokens[1]])
  # Lookahead tries no deeper than its trie (its unused slots' chain reaches further)
  assert P.Lookahead(num_nodes=16, depth=4).max_depth == 4


def test_sliding_window_model_speculates_losslessly(tmp_path):
  """A Mistral-style model (every layer slides over 12 positions, shorter than the outputs):
  a chain through the XLA tree attention and a trie (a tree, its accepted path moved) through
  the Pallas kernel equal plain greedy decoding; a tree larger than the window is refused."""
  cfg, params, _ = checkpoint.load_model(str(make_tiny_model_dir(tmp_path, sliding_window=12, family="mistral")))
  reqs = _rows(cfg, 5, seed=31)
  want = plain_greedy((cfg, params), reqs)
  assert any(len(r.prompt_ids) + len(want[r.uid]) > 12 for r in reqs)
  for proposer, impl in ((P.NGram(num_draft_tokens=4), "xla"),
                         (P.Lookahead(num_nodes=7, depth=3, num_candidates=6), "pallas")):
    speculates_losslessly((cfg, params), reqs, proposer, runtime=Runtime(implementation=impl),
                          plain=want)
  with pytest.raises(ValueError, match="sliding window"):
    Engine(cfg, params, EngineConfig(), 64, proposer=P.Lookahead(num_nodes=12))
  # a window no layer uses (Qwen's max_window_layers past the last layer) limits no tree
  from jaxinfer.speculative.protocol import check_fits
  from jaxinfer.sparsity import DENSE
  check_fits(P.Lookahead(num_nodes=12), dataclasses.replace(
      cfg, layer_types=("full_attention",) * cfg.num_layers), DENSE)
  # one-layer draft configurations of a model with per-layer attention kinds
  from jaxinfer.draft_heads import eagle, hydra
  mixed = dataclasses.replace(cfg, layer_types=("full_attention",) * (cfg.num_layers - 1)
                              + ("sliding_attention",))
  for one in (eagle.draft_config(mixed), hydra.prefix_config(mixed)):
    assert one.num_layers == 1 and one.layer_window(0) == 12
  skip_cfg, _ = P.layer_skip_draft(mixed, params, (cfg.num_layers - 1, 0))  # (in layer order)
  assert skip_cfg.layer_types == ("full_attention", "sliding_attention")


def test_sinks_window_sparsity_speculates_losslessly(target, other_draft):
  """--sparsity=sinks_window (StreamingLLM: 2 sinks + a window of 10, shorter than the outputs)
  on the target: prefill lanes, tree verification (a trie through the Pallas kernel, EAGLE-2
  trees through XLA) and plain steps all keep the pattern, so greedy speculation equals plain
  greedy decoding under it; a tree past the window and the dynamic patterns are refused."""
  from jaxinfer.sparsity import parse
  cfg, params = target
  sparse = Runtime(sparsity=parse("sinks_window:2,10"))
  reqs = _rows(cfg, 5, seed=41)
  reqs.append(dataclasses.replace(reqs[1], uid=5, prompt_ids=reqs[1].prompt_ids + [7] * 9,
                                  max_new_tokens=30))
  want = plain_greedy(target, reqs, sparse)
  assert want != plain_greedy(target, reqs)  # the pattern matters here
  eagle_tree, heads = _proposers(cfg, params, other_draft)["eagle-tree"]
  for proposer, impl, draft_params in (
      (P.Lookahead(num_nodes=7, depth=3, num_candidates=6), "pallas", None),
      (eagle_tree, "xla", heads)):
    speculates_losslessly(target, reqs, proposer, draft_params, plain=want,
                          runtime=dataclasses.replace(sparse, implementation=impl))
  with pytest.raises(ValueError, match="window"):
    Engine(cfg, params, EngineConfig(), 64, sparse, P.Lookahead(num_nodes=12))
  with pytest.raises(ValueError, match="speculation under block_topk"):
    Engine(cfg, params, EngineConfig(), 64, Runtime(sparsity=parse("block_topk:2,16")),
           P.NGram())


def test_a_draft_model_attends_with_the_targets_sparsity(target):
  """Under sinks_window the engine hands the target's pattern to a draft model: the target
  drafting for itself then proposes exactly what it verifies, every draft accepted (but where
  a request's budget or EOS cut its last verification short), although the outputs run well
  past the 12 positions the pattern lets a token see (a draft left to attend densely has 13% of
  its first drafts accepted here)."""
  from jaxinfer.sparsity import parse
  cfg, params = target
  sparse = Runtime(sparsity=parse("sinks_window:2,10"))
  reqs = [dataclasses.replace(r, max_new_tokens=40) for r in _rows(cfg, 4, seed=43)]
  st, eng = speculates_losslessly(target, reqs, P.DraftModel(cfg, num_draft_tokens=3), params,
                                  sparse)
  assert eng.proposer.runtime.sparsity == sparse.sparsity
  assert st.accepted_hist[:-1].sum() <= len(reqs) and st.accepted_hist[-1] > 0


@pytest.mark.parametrize("name", ["eagle", "eagle-tree", "hydra++"])
def test_draft_layers_attend_with_the_targets_sparsity(target, other_draft, name):
  """Under sinks_window the engine hands the target's pattern to EAGLE's (chain and dynamic
  tree) and Hydra++'s draft layers: after prefilling 40-token prompts, overwriting their
  cache's keys and values between the 2 sinks and the 10-token window changes none of the
  drafts, and the same layer left dense drafts differently from the overwritten cache."""
  from jaxinfer import model as M
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.sparsity import parse
  cfg, params = target
  sparsity = parse("sinks_window:2,10")
  proposer, heads = (_proposers(cfg, params, other_draft) | _head_proposers(cfg, params))[name]
  if name == "hydra++":  # the prefix layer's output projection starts at zero: make it read
    o = 0.05 * jax.random.normal(jax.random.key(2), heads.prefix.attn.o.shape)
    heads = heads.replace(prefix=heads.prefix.replace(attn=heads.prefix.attn.replace(o=o)))
  served = Engine(cfg, params, EngineConfig(num_slots=2, page_size=8), 64,
                  Runtime(sparsity=sparsity), proposer, draft_params=heads).proposer
  assert served.runtime.sparsity == sparsity
  b, n, max_len = 2, 40, 64
  prompts = jax.random.randint(jax.random.key(9), (b, n), 1, cfg.vocab_size)
  hidden, _ = M.forward(params, prompts, jnp.broadcast_to(jnp.arange(n), (b, n)), cfg,
                        runtime=Runtime(sparsity=sparsity))
  first = jnp.argmax(M.logits(params, hidden[:, -1]), axis=-1).astype(jnp.int32)
  history = jnp.zeros((b, max_len), jnp.int32).at[:, :n].set(prompts).at[:, n].set(first)
  prompt_len = jnp.full((b,), n, jnp.int32)
  ctx = P.Context(history, prompt_len, SamplingParams.make(b), jax.random.split(
      jax.random.key(0), b))
  noise = lambda x: x.at[:, :, 2:n - 12].set(
      100.0 * jax.random.normal(jax.random.key(1), x[:, :, 2:n - 12].shape, x.dtype))

  def drafts(proposer):
    """(drafts from the prefilled state, drafts from it with the hidden positions noised)."""
    @jax.jit
    def run(heads, params):
      if isinstance(proposer, P.Hydra):
        st = proposer.prefill((heads, params), hidden, prompt_len, max_len)
      else:
        st = proposer.prefill((heads, params), hidden, history, prompt_len, first, max_len)
      # positions the pattern hides from every query from n - 1 on
      noised = st.replace(cache=st.cache.replace(k=tuple(map(noise, st.cache.k)),
                                                 v=tuple(map(noise, st.cache.v))))
      return tuple(proposer.propose((heads, params), x, ctx)[1].tokens for x in (st, noised))
    return map(np.asarray, run(heads, params))

  np.testing.assert_array_equal(*drafts(served))
  dense, noised = drafts(dataclasses.replace(served, runtime=Runtime()))
  assert (dense != noised).any()


@pytest.mark.parametrize("name", ["eagle", "layerskip"])
def test_drafts_take_their_logits_as_the_target_on_its_mesh(target, other_draft, name):
  """A draft over the target's output projection (EAGLE's over the whole vocabulary, layer
  skip's) takes its logits as the target's, the vocabulary split as the rules split it, and
  filters them whole on each device: split over the vocabulary, sorting them moved rows x
  vocabulary arrays between devices at every draft step (Llama-3-8B on --mesh=model:4: 7.8 GiB
  of a verification dispatch's collectives per device)."""
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.sharding import make_mesh
  cfg, params = target
  proposer, draft = _proposers(cfg, params, other_draft)[name]
  served = proposer.attend_as(Runtime(make_mesh("model:2", jax.devices()[:2])))
  b, n, max_len = 2, 8, 32
  history = jnp.ones((b, max_len), jnp.int32)
  prompt_len = jnp.full((b,), n, jnp.int32)
  ctx = P.Context(history, prompt_len, SamplingParams.make(b), jax.random.split(
      jax.random.key(0), b))

  def drafts(draft, params):
    if name == "eagle":
      hidden = jnp.zeros((b, n, cfg.embed), cfg.jnp_dtype)
      st = served.prefill((draft, params), hidden, history, prompt_len, history[:, n], max_len)
    else:
      st = served.prefill(draft, history, prompt_len, max_len)
    return served.draft(P.Weights(draft, params), st, ctx)[1].tokens

  split = [e for e in jax.make_jaxpr(drafts)(draft, params).eqns
           if e.primitive.name == "sharding_constraint" and "model" in e.params["sharding"].spec]
  assert split and all(e.outvars[0].aval.shape[-1] == cfg.vocab_size for e in split)
  whole = [e for e in jax.make_jaxpr(drafts)(draft, params).eqns if e.primitive.name ==
           "shard_map" and any(v.aval.shape[-1:] == (cfg.vocab_size,) for v in e.invars)]
  assert len(whole) == served.num_draft_tokens


@pytest.mark.parametrize("mesh_spec", ["model:2", "fsdp:2,model:2", "fsdp:2"])
def test_sharded_speculation_equals_greedy(tiny_model_dir, plain, mesh_spec):
  """Weights sharded over `model` and / or `fsdp`, the page pools' KV heads over `model`: a
  tree verified by the Pallas kernel per shard equals plain greedy decoding."""
  from jaxinfer.sharding import make_mesh
  mesh = make_mesh(mesh_spec, jax.devices()[:4 if "," in mesh_spec else 2])
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir), None, mesh)
  reqs, want = plain[9]
  st, eng = speculates_losslessly((cfg, params), reqs, P.Lookahead(num_nodes=6, depth=3),
                                  runtime=Runtime(mesh, implementation="pallas"), plain=want)
  assert st.compilations <= eng.max_shapes
  heads = (tuple(eng.k[0].sharding.spec) + (None,))[0]  # a pool: (K/c, P, ps, c*H)
  assert heads == ("model" if "model" in mesh_spec else None)
