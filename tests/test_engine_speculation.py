"""Speculative decoding inside the paged engine: draft trees verified in the engine's mixed step
beside prompt lanes, over its one page pool; greedy equal to the plain engine, sampling equal
to plain sampling in distribution, the per-dispatch tree policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import checkpoint
from jaxinfer.draft_heads import eagle, hydra, medusa
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.policy import Plain, TreePolicy, ladder
from jaxinfer.engine.scheduler import EngineRequest
from jaxinfer.runtime import Runtime
from jaxinfer.speculative import proposers as P
from tests.engine_runs import run_engine, same_distribution


@pytest.fixture(scope="module")
def target(tiny_model_dir):
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  return cfg, params


def _requests(n=9, **sampling):
  """Prompts that repeat themselves (so lookups draft well), half behind a shared header of
  three full pages, budgets 3..24."""
  rng = np.random.RandomState(0)
  header = [int(x) for x in rng.randint(3, 50, 24)]
  reqs = []
  for i in range(n):
    body = [int(x) for x in rng.randint(3, 50, 5 + 3 * i)]
    reqs.append(EngineRequest(i, (header if i % 2 else []) + body + body[:6],
                              int(rng.randint(3, 25)), np.asarray([0, i], np.uint32),
                              **sampling))
  return reqs


def test_speculating_engine_equals_the_plain_engine(target):
  """Greedy: every lookup proposer's, a draft model's, Medusa and Hydra heads' and the draft
  layers' over the target's features (EAGLE's, Hydra++'s) outputs equal plain decoding's, bit for
  bit (a row's first verification, which computes the hidden state the heads read, drafts
  nothing), with more requests than slots, prompts prefilled in lanes beside
  verification and a shared header read by reference (never recomputed or copied); stop strings
  end a request where the plain engine ends it, and every emitted token is delivered or counted
  as discarded. Also
  with the auto policy switching between trees and the plain engine's steps every few dispatches:
  rows turn from trees to plain decoding (the host feeds each row its last emitted token) and back
  (each row's tokens so far re-admitted onto the device), dispatches in flight read first."""
  reqs = _requests()
  stop = lambda uid, toks: uid == 4 and len(toks) >= 5
  ref, _, _ = run_engine(target, reqs, should_stop=stop)
  # heads that propose the target's own next token (zero residual blocks)
  paths = ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))
  heads = medusa.init_heads(target[1], 3)
  hheads = hydra.init_heads(target[1], 3, jax.random.key(0))
  hheads = hheads.replace(w_out=tuple(jnp.zeros_like(w) for w in hheads.w_out))
  cases = [(P.NGram(num_draft_tokens=3), {}), (P.Lookahead(num_nodes=6, depth=3), {}),
           (P.Recycling(branching=(2, 2, 1)), {}),
           (P.Medusa(paths=paths), dict(draft_params=heads)),
           (P.Hydra(paths=paths), dict(draft_params=hheads)),
           (P.NGram(num_draft_tokens=4), dict(speculation="auto", decode_steps=2,
                                              picks=(0, 3, 3, 1, 3, 0, 0, 2))),
           # a draft model (the target itself: every draft accepted), its K/V in the engine's
           # pages, written by the lanes before the drafts of the step that prefills them and
           # fed by the plain steps between trees
           (P.DraftModel(target[0], num_draft_tokens=3),
            dict(draft_params=target[1], speculation="auto", decode_steps=2,
                 picks=(0, 2, 2, 1, 0, 2, 0, 0))),
           (P.Lookahead(num_nodes=4, depth=2), dict(runtime=Runtime(implementation="pallas")))]
  # draft layers over the target's features, their K/V in the engine's pages (written from the
  # lanes), as initialised (EAGLE's drafts the root again, Hydra++'s the target's next token);
  # Hydra++ with the auto policy, whose plain steps feed its layer every token they compute
  dcfg, pcfg = eagle.draft_config(target[0]), hydra.prefix_config(target[0])
  layer = eagle.EagleHeads(eagle.init_draft(dcfg, jax.random.key(1)))
  prefixed = hydra.init_heads(target[1], 3, jax.random.key(0), pcfg)
  prefixed = prefixed.replace(w_out=tuple(jnp.zeros_like(w) for w in prefixed.w_out))
  cases += [(P.Eagle(dcfg, num_draft_tokens=3), dict(draft_params=layer)),
            (P.Hydra(paths=paths, prefix=pcfg), dict(draft_params=prefixed, speculation="auto",
                                                     decode_steps=2,
                                                     picks=(0, 3, 3, 1, 0, 3, 2, 0)))]
  for proposer, kw in cases:
    kw.setdefault("speculation", "always")
    out, st, eng = run_engine(target, reqs, proposer, should_stop=stop, **kw)
    assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in ref.items()}, (
        proposer, kw)
    assert out[4].stopped and len(out[4].tokens) == 5
    # the header's pages, by reference (but the last, for a layer whose K/V at a position
    # hold the token after it: the prompts differ there)
    assert st.prefill_tokens_saved >= 3 * (24 if not proposer.feature_lookahead else 16)
    assert st.decode_tokens == sum(len(r.tokens) for r in out.values()) + \
        st.decode_tokens_discarded
    assert st.decode_tokens > st.row_steps > 0  # more than one token per verification
    assert sum(st.accepted_hist) == st.row_steps
    # the lookups verify as deep as their known drafts reach; recycling always drafts its tree
    if isinstance(proposer, (P.NGram, P.Lookahead)):
      assert st.row_steps < st.verified_nodes < proposer.tree_size * st.row_steps
    elif isinstance(proposer, P.Recycling):
      assert st.verified_nodes == proposer.tree_size * st.row_steps
    assert st.compilations <= eng.max_shapes  # the fixed shapes only
    if isinstance(proposer, P.DraftModel):  # the target drafting for itself
      assert st.accepted_hist[-1] > 0 and st.decode_tokens > 2 * st.row_steps
    if "picks" in kw:
      assert isinstance(eng.ladder[max(kw["picks"])], Plain)
      decode = ("decode", True) + ("fed",) * proposer.paged_layers  # (feeding its layer)
      assert decode in eng._compiled and ("trees", 0, True) in eng._compiled
      # greedy requests only: steps compiled without the sampling filters
      assert not any(" sort(" in eng._compiled[k].as_text() for k in (decode, ("trees", 0, True)))
      if proposer.paged_layers:  # rows turned from trees to plain steps
        assert "flush" in eng._compiled


def test_switching_to_plain_steps_when_every_row_ends_meanwhile(target):
  """One slot, the auto policy switching every dispatch or two: reading the dispatches in flight
  before a switch may end every row (nothing left to lay out); outputs stay plain decoding's."""
  reqs = _requests(4)
  ref, _, _ = run_engine(target, reqs, num_slots=1)
  out, st, eng = run_engine(target, reqs, P.NGram(num_draft_tokens=3), speculation="auto",
                      num_slots=1, decode_steps=2, picks=(2, 0, 2, 1))
  assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in ref.items()}
  assert st.decode_tokens == sum(len(r.tokens) for r in out.values()) + \
      st.decode_tokens_discarded
  assert st.compilations <= eng.max_shapes
  # Two slots and a stop string the host finds: a row admitted into a freed slot by a tree
  # dispatch that ran no step (another row had ended on the device) switches to plain steps
  # from its prompt's last token
  reqs = [EngineRequest(i, p, m, np.asarray([0, i], np.uint32)) for i, (p, m) in enumerate(
      [([13, 7, 26, 17], 7), ([6, 27, 19, 49, 18], 6), ([23, 24], 4), ([40, 25, 30, 15, 15], 2),
       ([29, 15, 10, 26], 7), ([15, 41, 30, 8], 4)])]
  stop = lambda uid, toks: uid % 3 == 0 and len(toks) >= 5
  ref, _, _ = run_engine(target, reqs, num_slots=2, should_stop=stop)
  out, _, _ = run_engine(target, reqs, P.NGram(num_draft_tokens=3), speculation="auto",
                         num_slots=2, decode_steps=3, max_len=64, should_stop=stop,
                         picks=(0, 0, 2))
  assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in ref.items()}


def test_greedy_rows_beside_sampled_ones_stay_lossless(target):
  """Trees' steps compile for runs of greedy requests only (no sampling filters) and for the
  rest: in a run with sampled requests the greedy ones equal plain decoding's all the same."""
  greedy = _requests(6)
  hot = [EngineRequest(10 + i, r.prompt_ids, r.max_new_tokens, r.key_data, 1.0, 3)
         for i, r in enumerate(_requests(2))]
  ref, _, _ = run_engine(target, greedy)
  out, _, eng = run_engine(target, greedy[:3] + hot + greedy[3:], P.NGram(num_draft_tokens=3),
                     speculation="always")
  assert {u: out[u].tokens for u in ref} == {u: r.tokens for u, r in ref.items()}
  assert all(out[r.uid].tokens for r in hot)
  assert {k[2] for k in eng._compiled if k[0] in ("tree", "trees")} == {False}
  text = eng._compiled[("trees", 0, False)].as_text()  # the general step: it draws, sorting
  assert "threefry" in text and " sort(" not in text  # nothing (`sampling.filtered_logits`)


def test_rows_without_a_match_verify_their_root_alone(target):
  """Prompts of distinct tokens, and first tokens the prompts do not hold: neither verification
  of a row (rooted at its prompt's last token, then at its first) has a lookup match, and the
  target computes one token in the second (a plain step). The first shares its step with the
  prompt's lanes, and a step that prefills verifies whole trees. One request at a time, so no
  other row's lanes share the second."""
  cfg, params = target
  reqs = [EngineRequest(i, list(range(3 + 7 * i, 19 + 7 * i)), 2, np.asarray([0, i], np.uint32))
          for i in range(6)]
  ref, _, _ = run_engine(target, reqs)
  reqs = [r for r in reqs if ref[r.uid].tokens[0] not in r.prompt_ids]
  assert len(reqs) >= 3
  eng = Engine(cfg, params, EngineConfig(num_slots=2, chunk_size=16, chunk_lanes=2, page_size=8),
               max_len=128, proposer=P.NGram(num_draft_tokens=4), speculation="always")
  for r in reqs:
    out = []
    st = eng.run([r], out.append)
    assert out[0].tokens == ref[r.uid].tokens
  assert st.row_steps == 2 * len(reqs)
  assert st.verified_nodes == (5 + 1) * len(reqs)


def test_speculating_engine_on_a_mesh_equals_one_device(target):
  """One replica over two devices (pages' heads over `model`): the same greedy outputs."""
  import jax
  from jaxinfer.serving.placement import on_replica
  from jaxinfer.sharding import make_mesh
  reqs = _requests(5)
  ref, _, _ = run_engine(target, reqs, P.NGram(num_draft_tokens=3), speculation="always")
  mesh = make_mesh("model:2", jax.devices()[:2])
  cfg, params = target
  out, _, _ = run_engine((cfg, on_replica(params, mesh, [mesh])), reqs,
                         P.NGram(num_draft_tokens=3), Runtime(mesh), speculation="always")
  assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in ref.items()}


def test_sampled_engine_speculation_matches_plain_sampling(target):
  """The joint distribution of the first three tokens (drawn by verification: accepted drafts
  or the rule's residual) equals the plain engine's, two-sample chi-square over 1000 requests
  each (top_k = 3 keeps the support small): prompt lookup's deterministic drafts, and a draft
  model's sampled ones (the target's first layer: its distribution differs from the target's,
  so rejections draw from the residual)."""
  n, prompt = 1000, [5, 6, 7, 292, 292, 5, 6, 7, 292]  # (the tiny model often continues 5)
  reqs = lambda salt: [EngineRequest(i, prompt, 3, np.asarray([salt, i], np.uint32), 1.0, 3)
                       for i in range(n)]
  kw = dict(num_slots=32, chunk_lanes=8, decode_steps=2)
  plain, _, _ = run_engine(target, reqs(0), **kw)
  layer_cfg, layer_params = P.layer_skip_draft(*target, (0,))
  for proposer, draft in ((P.NGram(num_draft_tokens=2), {}),
                          (P.DraftModel(layer_cfg, num_draft_tokens=2),
                           dict(draft_params=layer_params))):
    spec, st, _ = run_engine(target, reqs(1), proposer, speculation="always", **kw, **draft)
    assert st.decode_tokens > st.row_steps  # drafts were accepted
    same_distribution(plain, spec)


def test_a_proposer_short_of_its_weights_is_refused(target):
  cfg, params = target
  with pytest.raises(ValueError, match="the medusa proposer needs draft_params"):
    Engine(cfg, params, EngineConfig(), 64, proposer=P.Medusa(((0,), (0, 0))))


def test_tree_policy_explores_then_runs_the_fastest():
  """auto: plain decoding, the proposer's tree, then smaller trees while they gain; then the
  fastest, other levels re-tried now and then; a tree compiled only once the work in sight pays
  for it; always: the proposer's tree only. A level's tau
  is its depths' share of the acceptance by depth that any tree measured (a smaller chain's
  follows from the largest's before it ever runs)."""
  levels = ladder(P.NGram(num_draft_tokens=4), "auto")
  assert [p.tree_size for p in levels] == [5, 3, 2, 1] and isinstance(levels[-1], Plain)
  accept = np.array([0.5, 0.8, 0.6, 0.4])  # a draft's chance given the one before it
  step_s = {0: 3.0, 1: 1.6, 2: 1.3, 3: 1.0}  # tau 2.24, 1.9, 1.5, 1: 3 tokens the fastest

  def dispatch(policy, level, rows=10):
    depth = levels[level].max_depth
    reach = np.cumprod(np.append(1.0, accept[:depth]))  # P(accepting a or more drafts)
    hist = rows * (reach - np.append(reach[1:], 0.0))  # rows accepting exactly a
    policy.record(level, float(rows * reach.sum()), rows, 1, step_s[level], accepted=hist)

  policy = TreePolicy(levels, "auto", explore_every=4)
  dispatch(policy, 0)
  assert policy.tau(1) == pytest.approx(1.9) and policy.tau(2) == pytest.approx(1.5)
  assert policy.tau(0) == pytest.approx(2.236) and policy.tau(3) == 1.0
  policy = TreePolicy(levels, "auto", explore_every=4)
  picks = []
  for _ in range(400):
    picks.append(policy.pick())
    dispatch(policy, picks[-1])
  # plain, tree, halved, quartered, each for HOLD dispatches in a row
  assert picks[:12] == [3, 3, 3, 0, 0, 0, 1, 1, 1, 2, 2, 2]
  rest = picks[12:]
  assert rest.count(1) > 0.8 * len(rest) and set(rest) == {0, 1, 2, 3}
  runs = [(level, len(list(g))) for level, g in __import__("itertools").groupby(rest)]
  assert min(n for _, n in runs[:-1]) >= TreePolicy.HOLD  # a re-try runs long enough to time
  # each re-try that loses again waits longer than the one before (backoff)
  starts = np.flatnonzero(np.diff(np.asarray(rest) == 3, prepend=0) == 1)
  gaps = np.diff(starts)
  assert len(gaps) >= 2 and np.all(gaps[1:] >= 0.9 * gaps[:-1]) and gaps[-1] > gaps[0], gaps
  # the summary compares this call's own timed decode-only dispatches, per live row
  policy.start_call()
  assert "too few decode-only dispatches of trees" in policy.summary([0, 1, 0, 1])
  for level in (1, 1, 3):
    dispatch(policy, level)
  assert "at 1.19x plain decoding's" in policy.summary([0, 2, 0, 1])  # 1.9 / 1.6 over 1 / 1
  policy.call[3, 0] = 0  # plain dispatches timed that emitted nothing (it said "infx")
  assert "too few decode-only dispatches of plain decoding" in policy.summary([0, 2, 0, 1])
  always = TreePolicy(ladder(P.NGram(num_draft_tokens=4), "always"), "always")
  assert {always.pick(work_s=0.0) for _ in range(5)} == {0}
  # a tree is compiled to be tried only once the work in sight pays for it: AMORTIZE times
  # TREE_COMPILE times plain decoding's compilation, then a compiled tree's
  policy = TreePolicy(levels, "auto", explore_every=4)
  bar = TreePolicy.AMORTIZE * TreePolicy.TREE_COMPILE * 0.5
  for i in range(3):
    level = policy.pick(work_s=0.9 * bar)
    assert level == 3
    policy.compiled(level, 0.25 * (i < 2))  # (plain decoding's shapes add up: 0.5 s)
    dispatch(policy, level)
  assert [policy.pick(work_s=0.9 * bar) for _ in range(50)] == [3] * 50
  assert "trees not tried yet, compiling them (about 1.5 s)" in policy.summary([0, 0, 0, 50])
  assert policy.pick(work_s=bar) == 0  # the work in sight grew: the proposer's tree
  policy.compiled(0, 4.0)
  for _ in range(2):
    dispatch(policy, 0)
  # the next tree (0 lost to plain decoding) is expected to compile as the first did, and the
  # work in sight pays for both (each paying for itself alone, a ladder of trees spent several
  # times 1 / AMORTIZE of a short job)
  assert policy._exploring(TreePolicy.AMORTIZE * 4.0) is None
  assert policy._exploring(TreePolicy.AMORTIZE * 7.9) is None
  assert policy._exploring(TreePolicy.AMORTIZE * 8.0) == 1
  # a draft layer's feeding starts when a tree would be tried: not before plain decoding is
  # measured, whatever the work in sight (early estimates of it count prefill as decoding)
  policy = TreePolicy(levels, "auto", explore_every=4)
  assert not policy.wants_trees(work_s=1e9)
  policy.compiled(3, 0.5)
  dispatch(policy, 3)
  assert not policy.wants_trees(work_s=1e9)
  dispatch(policy, 3)
  assert policy.wants_trees(work_s=bar) and not policy.wants_trees(work_s=0.9 * bar)
  with pytest.raises(ValueError, match="speculation policy"):
    ladder(P.NGram(), "never")


def _feature_proposers(cfg, params):
  """EAGLE (chain and dynamic tree) and Hydra++ with random draft layers (not the identity they
  start as: their attention and EAGLE's token embeddings change their drafts)."""
  dcfg = eagle.draft_config(cfg)
  draft = eagle.init_draft(dcfg, jax.random.key(1))
  o = lambda shape, seed: 0.5 * jax.random.normal(jax.random.key(seed), shape)
  heads = eagle.EagleHeads(draft.replace(
      fc=draft.fc.at[cfg.embed:].set(o((cfg.embed, cfg.embed), 4)),
      layer=draft.layer.replace(attn=draft.layer.attn.replace(o=o(draft.layer.attn.o.shape,
                                                                    2)))))
  pcfg = hydra.prefix_config(cfg)
  hh = hydra.init_heads(params, 3, jax.random.key(5), pcfg)
  hh = hh.replace(prefix=hh.prefix.replace(attn=hh.prefix.attn.replace(
      o=o(hh.prefix.attn.o.shape, 3))))
  return {"eagle": (P.Eagle(dcfg, num_draft_tokens=3), heads),
          "eagle-tree": (P.EagleTree(dcfg, num_nodes=7, top_k=2, depth=3), heads),
          "hydra++": (P.Hydra(paths=((0,), (1,), (0, 0), (0, 1), (0, 0, 0)), prefix=pcfg), hh)}


@pytest.mark.parametrize("name", ["eagle", "eagle-tree", "hydra++"])
def test_draft_layers_in_the_engines_pages_draft_as_in_a_cache_of_their_own(target, name):
  """A draft layer over the target's features keeps its K/V in the engine's page layout: the
  prefill lanes' hidden states written there in chunks of 8 through scattered page tables, and
  the pending pair (the one a row's first verification gives it) fed, its drafts (tokens and q)
  equal those from a cache of the layer's own filled over the whole prompt; its state
  after a verification, drafting again, too. A row not live writes no page."""
  from jaxinfer import model as M
  from jaxinfer.kv_cache import KVCache
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.speculative.protocol import Context, Prompt, Verified, Weights
  cfg, params = target
  proposer, heads = _feature_proposers(cfg, params)[name]
  w = Weights(heads, params)
  rng = np.random.RandomState(0)
  lens, width, ps, m = np.asarray([30, 21]), 32, 8, 6
  history = rng.randint(3, cfg.vocab_size, (2, 64)).astype(np.int32)
  hidden, _ = M.forward(params, jnp.asarray(history[:, :width]), jnp.arange(width)[None],
                        cfg, KVCache.init(cfg, 2, width), kv_source="chunk")
  first = history[np.arange(2), lens]  # the token after each prompt
  prompt = Prompt(hidden, hidden[np.arange(2), lens - 1], jnp.asarray(history),
                  jnp.asarray(lens), jnp.asarray(first), jnp.arange(2), max_len=m * ps)
  dense = proposer.init_state(w, cfg, 2, m * ps)
  dense = proposer.admit(w, dense, prompt)
  # the engine's: the pages of each row scattered over a pool of 16
  tables = jnp.asarray(rng.permutation(16)[:2 * m].reshape(2, m).astype(np.int32))
  paged = proposer.init_pages(w, cfg, 2, 16, ps)
  for start in range(0, width, 8):  # lanes of 8: one per row, the prompt's last token left out
    pos = start + np.arange(8)[None] + np.zeros((2, 1), int)
    pos = np.where(pos < lens[:, None] - 1, pos, m * ps)
    nxt = np.take_along_axis(history, np.minimum(pos + 1, 63), axis=1)
    paged = proposer.lanes(w, paged, jnp.asarray(history[:, start:start + 8]),
                           hidden[:, start:start + 8], jnp.asarray(nxt), jnp.asarray(pos), tables)
  paged = paged.replace(features=dense.features, tokens=dense.tokens, start=dense.start,
                        count=dense.count)  # what the first verification pends
  sampling = SamplingParams(jnp.asarray([0.0, 1.0]), jnp.zeros(2, jnp.int32), jnp.ones(2),
                            jnp.zeros(2))
  keys = jax.random.split(jax.random.key(7), 2)
  hist = jnp.asarray(history).at[np.arange(2), lens].set(first)
  for step in range(2):
    ctx = Context(hist, jnp.asarray(lens + step), sampling, keys)
    dense, d1 = proposer.draft(w, dense, ctx)
    paged, d2 = proposer.draft(w, paged, ctx.replace(pages=tables))
    np.testing.assert_array_equal(d1.tokens, d2.tokens)
    np.testing.assert_array_equal(d1.parents, d2.parents)
    if d1.q is not None:
      np.testing.assert_allclose(d1.q, d2.q, atol=1e-5)
    # a verification accepting the first draft of each row
    t = d1.tokens.shape[1]
    vh = jax.random.normal(jax.random.key(step), (2, t, cfg.embed))
    path = jnp.zeros((2, t), jnp.int32).at[:, 1].set(1)
    verified = Verified(d1.tokens, vh, None, path, jnp.ones(2, jnp.int32), d1.tokens[:, 2],
                        jnp.asarray(lens + step), jnp.ones(2, bool))
    dense, paged = (proposer.observe(w, s, verified) for s in (dense, paged))
    hist = hist.at[np.arange(2), lens + step + 1].set(d1.tokens[:, 1])
  before = jax.tree_util.tree_map(np.asarray, paged.cache)
  ctx = Context(hist, jnp.asarray(lens + 3), sampling, keys, jnp.full((2, m), -1, jnp.int32))
  after, _ = proposer.draft(w, paged, ctx)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after.cache)):
    np.testing.assert_array_equal(a, b)


def test_a_draft_models_cache_in_the_engines_pages_drafts_as_its_own_prefill(target):
  """A draft model keeps its K/V in the engine's page layout: the prefill lanes' tokens written
  there in chunks of 8 through scattered page tables, its drafts (tokens and q, a greedy and a
  sampled row) equal those from its own cache prefilled over the prompt, and those from pages
  it wrote from the tokens as the rows were admitted (rows caught up); after verifications
  accepting one draft, then the whole chain (whose last draft it never fed: pending, fed before
  the next root), they equal those of a fresh prefill over everything decoded, with Big-Little's
  fallback too (drafts past the row's stop never fed). Turning to plain
  steps (`flush`) writes a row's pending token through its own table alone; a row not live
  writes no page."""
  import dataclasses

  from jaxinfer.sampling import SamplingParams
  from jaxinfer.speculative.protocol import Context, Prompt, Verified, Weights
  cfg, params = target
  dcfg, dparams = P.layer_skip_draft(cfg, params, (0,))
  proposer, w = P.DraftModel(dcfg, num_draft_tokens=3), Weights(dparams, params)
  rng = np.random.RandomState(0)
  lens, width, ps, m = np.asarray([30, 21]), 32, 8, 6
  history = jnp.asarray(rng.randint(3, cfg.vocab_size, (2, m * ps)).astype(np.int32))
  tables = jnp.asarray(rng.permutation(16)[:2 * m].reshape(2, m).astype(np.int32))
  paged = proposer.init_pages(w, cfg, 2, 16, ps)
  for start in range(0, width, 8):  # lanes of 8: one per row, the prompt's last token left out
    pos = start + np.arange(8)[None] + np.zeros((2, 1), int)
    pos = jnp.asarray(np.where(pos < lens[:, None] - 1, pos, m * ps))
    paged = proposer.lanes(w, paged, history[:, start:start + 8], None, None, pos, tables)
  dense = proposer.prefill(dparams, history, jnp.asarray(lens), m * ps)
  lanes_written, prompts = paged, history
  # the same K/V written from the rows' tokens as they are admitted (a row caught up)
  caught = proposer.admit(w, proposer.init_pages(w, cfg, 2, 16, ps), Prompt(
      None, None, history[:, :width], jnp.asarray(lens), jnp.zeros(2, jnp.int32), jnp.arange(2),
      max_len=m * ps, pages=tables))
  sampling = SamplingParams(jnp.asarray([0.0, 1.0]), jnp.zeros(2, jnp.int32), jnp.ones(2),
                            jnp.zeros(2))
  keys = jax.random.split(jax.random.key(7), 2)
  length, rows = jnp.asarray(lens - 1), np.arange(2)  # the root: each prompt's last token

  def same(d1, d2):
    np.testing.assert_array_equal(d1.tokens, d2.tokens)
    np.testing.assert_allclose(d1.q, d2.q, atol=1e-5)

  for accepted in (1, 3, None):
    ctx = Context(history, length, sampling, keys)
    dense, d1 = proposer.draft(w, dense, ctx)
    paged, d2 = proposer.draft(w, paged, ctx.replace(pages=tables))
    same(d1, d2)
    if accepted == 1:
      same(d1, proposer.draft(w, caught, ctx.replace(pages=tables))[1])
    if accepted is None:  # as drafted from a fresh prefill over everything so far
      _, d3 = proposer.draft(w, proposer.prefill(dparams, history, length + 1, m * ps), ctx)
      same(d1, d3)
      break
    n = jnp.full((2,), accepted, jnp.int32)
    nxt = jnp.asarray(rng.randint(3, cfg.vocab_size, 2).astype(np.int32))
    verified = Verified(d1.tokens, None, None, jnp.tile(jnp.arange(4), (2, 1)), n, nxt, length,
                        jnp.ones(2, bool))
    dense, paged = (proposer.observe(w, st, verified) for st in (dense, paged))
    for j in range(1, accepted + 1):
      history = history.at[rows, length + j].set(d1.tokens[:, j])
    length = length + accepted + 1
    history = history.at[rows, length].set(nxt)
    if accepted == 3:  # the chain's last draft is pending in both
      np.testing.assert_array_equal(paged.position, length - 1)
      flushed = proposer.flush(w, paged, tables.at[1].set(-1))
      np.testing.assert_array_equal(flushed.position, [-1, length[1] - 1])
      got = flushed.cache.over(tables).rows(cfg.head_dim)
      was = paged.cache.over(tables).rows(cfg.head_dim)
      for a, b in zip(got.k, was.k):
        a, b = np.asarray(a), np.asarray(b)
        assert not np.allclose(a[:, 0, length[0] - 1], b[:, 0, length[0] - 1])
        np.testing.assert_array_equal(np.delete(a[:, 0], int(length[0]) - 1, axis=1),
                                      np.delete(b[:, 0], int(length[0]) - 1, axis=1))
        np.testing.assert_array_equal(a[:, 1], b[:, 1])
  before = jax.tree_util.tree_map(np.asarray, paged.cache)
  after, _ = proposer.draft(w, paged, Context(history, length, sampling, keys,
                                              jnp.full((2, m), -1, jnp.int32)))
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after.cache)):
    np.testing.assert_array_equal(a, b)
  # Big-Little's fallback: every row falls back after its first draft, which is never fed;
  # accepted, it is pending, and the next drafts are a fresh prefill's
  fb, length = dataclasses.replace(proposer, fallback=1.0), jnp.asarray(lens - 1)
  st, d = fb.draft(w, lanes_written, Context(prompts, length, sampling, keys, tables))
  nxt = jnp.asarray([5, 7], jnp.int32)
  st = fb.observe(w, st, Verified(d.tokens, None, None, jnp.tile(jnp.arange(4), (2, 1)),
                                  jnp.ones(2, jnp.int32), nxt, length, jnp.ones(2, bool)))
  prompts = prompts.at[rows, length + 1].set(d.tokens[:, 1]).at[rows, length + 2].set(nxt)
  ctx = Context(prompts, length + 2, sampling, keys)
  same(fb.draft(w, fb.prefill(dparams, prompts, length + 3, m * ps), ctx)[1],
       fb.draft(w, st, ctx.replace(pages=tables))[1])


def test_a_draft_layer_in_the_pages_is_fed_once_trees_would_pay(target):
  """auto with EAGLE's layer in the pages: a run too short to pay for compiling trees runs the
  plain engine's own steps, which feed no draft layer. Once trees would pay (here from a run's
  third dispatch on), the plain steps feed it, prompt pages computed before are no longer shared
  (their layer K/V were never written), and trees wait until the rows that began unfed have
  ended. Outputs equal plain decoding's throughout."""
  cfg, params = target
  proposer, heads = _feature_proposers(cfg, params)["eagle"]
  reqs = _requests(15)
  ref, _, _ = run_engine(target, reqs)
  tokens = lambda out: {u: r.tokens for u, r in out.items()}
  out, _, eng = run_engine(target, reqs, proposer, draft_params=heads, speculation="auto",
                           decode_steps=2)
  assert tokens(out) == tokens(ref)
  assert not eng._feeding and not any("fed" in k or k[0] in ("tree", "trees")
                                      for k in eng._compiled if isinstance(k, tuple))
  assert "trees not tried yet, compiling them" in eng.policy.summary(eng.policy.dispatches)
  holds, pick = [], eng.policy.pick
  eng.policy.pick = lambda **kw: holds.append(kw["hold_trees"]) or pick(**kw)
  pay = lambda st: setattr(eng.policy, "AMORTIZE", 0.0 if len(holds) > 2 else 1e9)
  out = {}
  eng.run(reqs, lambda r: out.__setitem__(r.uid, r), on_step=pay)
  assert tokens(out) == tokens(ref)
  assert eng._feeding and ("decode", True, "fed") in eng._compiled
  # the rows begun before held trees back, then trees ran
  held = [i for i, h in enumerate(holds) if h]
  assert held and held[0] >= 2 and not holds[-1]
  assert sum(eng.policy.dispatches[:-1]) > 0 and eng.stats.compilations <= eng.max_shapes


def test_a_draft_model_in_the_pages_catches_rows_up_once_trees_would_pay(target):
  """auto with a draft model's K/V in the pages: as for a draft layer, the plain steps feed it
  only once trees would pay, but the rows begun before are not held back: each is caught up from
  its tokens so far (prompt and plain output) as it turns to trees, and drafts as well as the
  rows fed all along (the target drafting for itself: whole chains accepted). Outputs equal
  plain decoding's."""
  import dataclasses
  reqs = [dataclasses.replace(r, max_new_tokens=24) for r in _requests(3)]  # one per slot
  ref, _, _ = run_engine(target, reqs)
  eng = run_engine(target, reqs[:1], P.DraftModel(target[0], num_draft_tokens=3),
                   draft_params=target[1], speculation="auto", decode_steps=2)[2]
  assert not eng._feeding  # (a job too short for trees)
  holds, plain = [], len(eng.ladder) - 1
  # three plain dispatches (every row begins unfed), then trees would pay: the whole chain
  eng.policy.pick = lambda **kw: holds.append(kw["hold_trees"]) or (plain if len(holds) <= 3
                                                                    else 0)
  eng.policy.wants_trees = lambda work_s: len(holds) >= 3
  before, out = eng.stats.accepted_hist.copy(), {}
  eng.run(reqs, lambda r: out.__setitem__(r.uid, r))
  assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in ref.items()}
  assert eng._feeding and not any(holds) and not eng._unfed
  assert any(isinstance(k, tuple) and k[-1] == "caught up" for k in eng._compiled)
  assert eng.stats.compilations <= eng.max_shapes
  hist = eng.stats.accepted_hist - before
  assert hist[-1] > 2 * hist[1:-1].sum()  # the caught-up rows' K/V are right


@pytest.mark.parametrize("name", ["eagle", "draft"])
def test_plain_steps_feed_a_draft_layer_in_the_pages_what_its_own_prefill_would(target, name):
  """The auto policy's plain level runs the plain engine's steps, which feed a draft layer in
  the pages every token they compute (EAGLE's: the target's hidden state there with the token
  after it; a draft model's: the token): mixed steps (the prompts in lanes through scattered
  page tables, then decode rows) and a decode dispatch of four steps leave in the layer's pages
  the K/V its own prefill over prompt and output writes. A row turning from trees to plain
  steps first has EAGLE's pending pairs written (`Proposer.flush`): pages of rows not turning
  are left alone."""
  from functools import partial

  from jaxinfer import model as M
  from jaxinfer.engine import speculate
  from jaxinfer.engine.engine import engine_decode, engine_step
  from jaxinfer.kv_cache import KVCache, PagedKVCache, gather_rows
  from jaxinfer.speculative.protocol import Weights
  cfg, params = target
  if name == "draft":
    dcfg, heads = P.layer_skip_draft(cfg, params, (1,))
    proposer = P.DraftModel(dcfg, num_draft_tokens=3)
  else:
    proposer, heads = _feature_proposers(cfg, params)[name]
  w, rt = Weights(heads, params), Runtime()
  rng = np.random.RandomState(1)
  s, ps, m, pool, q, steps = 2, 8, 6, 16, 24, 5
  lens = np.asarray([20, 13])
  prompts = [rng.randint(3, cfg.vocab_size, n).astype(np.int32) for n in lens]
  table = rng.permutation(pool)[:s * m].reshape(s, m).astype(np.int32)
  far = m * ps  # out of range: nothing written
  # a mixed step: one lane per prompt (all but its last token), no decode row sampling
  tokens, nxt = np.zeros(s + s * q, np.int32), np.zeros(s + s * q, np.int32)
  positions = np.full(s + s * q, far, np.int32)
  for i, p in enumerate(prompts):
    base = s + i * q
    tokens[base:base + len(p) - 1] = p[:-1]
    nxt[base:base + len(p) - 1] = p[1:]
    positions[base:base + len(p) - 1] = np.arange(len(p) - 1)
  k, v = PagedKVCache.init_pools(cfg, pool, ps)
  layer = proposer.init_pages(w, cfg, s, pool, ps)
  feed = partial(speculate.feed, proposer=proposer, runtime=rt)
  zeros = lambda dtype=np.int32: np.zeros(s, dtype)
  sp = (zeros(np.float32), zeros(), np.ones(s, np.float32), zeros(np.float32))
  key_data = np.zeros((s, 2), np.uint32)
  step = jax.jit(partial(engine_step, cfg=cfg, runtime=rt, feed=feed))
  k, v, _, _, layer = step(params, k, v, zeros(), tokens, np.zeros_like(tokens, bool), positions,
                           table, table, zeros(), np.zeros(s, bool), key_data, *sp, nxt, heads,
                           layer)
  # a mixed step of decode rows alone (each prompt's last token), then four decode steps: greedy
  last = np.asarray([p[-1] for p in prompts])
  k, v, last, first, layer = step(
      params, k, v, zeros(), last, np.zeros(s, bool), (lens - 1).astype(np.int32), table,
      np.zeros((0, m), np.int32), zeros(), np.ones(s, bool), key_data, *sp, zeros(), heads,
      layer)
  k, v, _, out, layer = jax.jit(partial(engine_decode, max_steps=steps - 1, cfg=cfg, runtime=rt,
                                        feed=feed))(
      params, k, v, last, zeros(), np.ones(s, bool), lens.astype(np.int32), table,
      np.ones(s, np.int32), np.ones(s, bool), key_data, *sp, np.int32(steps - 1), heads, layer)
  out = np.concatenate([np.asarray(first)[None], np.asarray(out)])
  # its own prefill over prompt and output: the pairs at positions < len + steps - 1
  n = lens + steps
  history = np.zeros((s, m * ps), np.int32)
  for i, p in enumerate(prompts):
    history[i, :n[i]] = np.concatenate([p, out[:, i]])
  if name == "draft":
    dense = proposer.prefill(heads, jnp.asarray(history), jnp.asarray(n), m * ps)
  else:
    hidden, _ = M.forward(params, jnp.asarray(history), jnp.arange(m * ps)[None], cfg,
                          KVCache.init(cfg, s, m * ps), kv_source="chunk")
    dense = proposer.prefill(w, hidden, jnp.asarray(history), jnp.asarray(n),
                             jnp.zeros(s, jnp.int32), m * ps)
  for got, want in zip(layer.cache.k + layer.cache.v, dense.cache.k + dense.cache.v):
    rows = np.asarray(gather_rows(got, jnp.asarray(table), got.dtype, want.shape[-1])[0])
    for i in range(s):
      np.testing.assert_allclose(rows[:, i, :n[i] - 1], np.asarray(want)[:, i, :n[i] - 1],
                                 atol=2e-5)
  if name == "draft":  # (its flush: test_a_draft_models_cache_in_the_engines_pages_...)
    return
  # the flush writes the pending pairs of the rows turning (row 0), through their tables only
  pending = layer.replace(features=jnp.ones_like(layer.features), tokens=layer.tokens + 1,
                          start=jnp.asarray(n - 1), count=jnp.ones(s, jnp.int32))
  flushed = proposer.flush(w, pending, jnp.asarray(table).at[1].set(-1))
  for got, was in zip(flushed.cache.k, layer.cache.k):
    got, was = (np.asarray(gather_rows(x, jnp.asarray(table), x.dtype)[0]) for x in (got, was))
    assert not np.allclose(got[:, 0, n[0] - 1], was[:, 0, n[0] - 1])
    np.testing.assert_array_equal(got[:, 1], was[:, 1])
    np.testing.assert_array_equal(got[:, 0, :n[0] - 1], was[:, 0, :n[0] - 1])
