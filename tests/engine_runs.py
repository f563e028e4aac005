"""Running requests through the paged engine in tests, and plain greedy decoding to hold its
speculative outputs against (the static `Generator`: an implementation of its own)."""

import collections

import numpy as np

from jaxinfer.engine import Engine, EngineConfig, EngineRequest
from jaxinfer.generation import Generator, RowRequest
from jaxinfer.runtime import Runtime


def requests(prompts_and_budgets, temperature=0.0, top_k=0, salt=0) -> list[EngineRequest]:
  """Requests 0, 1, ... of (prompt ids, max new tokens), each keyed by (salt, its uid)."""
  return [EngineRequest(i, [int(t) for t in prompt], int(budget),
                        np.asarray([salt, i], np.uint32), temperature, top_k)
          for i, (prompt, budget) in enumerate(prompts_and_budgets)]


def run_engine(target, reqs, proposer=None, runtime=Runtime(), should_stop=None, picks=None,
               max_len=128, **kw):
  """({uid: EngineResult}, the engine's stats, the engine) of one engine run over `reqs` (3 slots,
  2 lanes of 16 prompt tokens and pages of 8 unless `kw` says otherwise); picks: the ladder
  levels the auto policy is made to pick, in turn, trees wanted from the start (None: its
  own)."""
  cfg, params = target
  ecfg = EngineConfig(**{"num_slots": 3, "chunk_size": 16, "chunk_lanes": 2, "page_size": 8} |
                      {k: kw.pop(k) for k in ("decode_steps", "num_slots", "chunk_lanes", "waves",
                                              "kv_cache_dtype", "kv_pages")
                       if k in kw})
  eng = Engine(cfg, params, ecfg, max_len=max_len, runtime=runtime, proposer=proposer, **kw)
  if picks is not None:  # (a draft layer in the pages fed from the start, as trees may run)
    cycle = iter(picks * 1000)
    eng.policy.pick = lambda mixed=False, live=1, work_s=None, hold_trees=False: next(cycle)
    eng.policy.wants_trees = lambda work_s: True
  out = {}
  st = eng.run(reqs, lambda r: out.__setitem__(r.uid, r), should_stop)
  # the auto policy's work in sight is used up: every token taken and every early end counted once
  assert proposer is None or eng._budget == 0, eng._budget
  # every dispatch the policy counts ran, and was read
  assert proposer is None or sum(eng.policy.dispatches) == st.dispatches
  return out, st, eng


def plain_greedy(target, reqs, runtime=Runtime()) -> dict[int, list[int]]:
  """{uid: tokens} of greedy decoding in one static batch."""
  import jax
  cfg, params = target
  rows = [RowRequest(r.prompt_ids, r.max_new_tokens, jax.random.key(r.uid)) for r in reqs]
  return {r.uid: res.tokens for r, res in zip(reqs, Generator(cfg, params, runtime)
                                              .generate(rows))}


def speculates_losslessly(target, reqs, proposer, draft_params=None, runtime=Runtime(),
                          plain=None, **kw):
  """Runs greedy `reqs` through a speculating engine (`speculation="always"` unless `kw` says
  otherwise), asserts every output equals plain greedy decoding's (`plain`, else computed) and
  returns (the engine's stats, the engine)."""
  kw.setdefault("speculation", "always")
  plain = plain_greedy(target, reqs, runtime) if plain is None else plain
  out, st, eng = run_engine(target, reqs, proposer, runtime, draft_params=draft_params, **kw)
  assert {u: r.tokens for u, r in out.items()} == plain, proposer
  return st, eng


def same_distribution(plain, spec):
  """Asserts two runs' outputs ({uid: EngineResult}) are draws of one distribution of token
  sequences: two-sample chi-square at p = 1e-4, rare cells pooled."""
  a, b = (collections.Counter(tuple(r.tokens) for r in res.values()) for res in (plain, spec))
  keys = sorted(set(a) | set(b))
  ca = np.array([a.get(k, 0) for k in keys], float)
  cb = np.array([b.get(k, 0) for k in keys], float)
  keep = ca + cb >= 10  # pool rare cells
  ca, cb = np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())
  used = ca + cb > 0
  ca, cb = ca[used], cb[used]
  chi2 = (((ca - cb) ** 2) / (ca + cb)).sum()
  df = len(ca) - 1
  crit = df * (1 - 2 / (9 * df) + 3.719 * np.sqrt(2 / (9 * df))) ** 3  # p = 1e-4
  assert chi2 < crit, (chi2, df, crit)
