"""Speculative decoding end to end: every proposer's greedy output equals plain greedy decoding
token for token (float32), at batch 1 and batch > 1 with mixed prompt and output lengths."""

import jax
import numpy as np
import pytest

from jaxinfer import checkpoint
from jaxinfer.generation import Generator, RowRequest
from jaxinfer.speculative import proposers as P
from jaxinfer.speculative.decode import SpeculativeGenerator
from tests.conftest import make_tiny_model_dir


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
  rng = np.random.RandomState(seed)
  rows = []
  for i in range(n):
    prompt = list(rng.randint(1, cfg.vocab_size, size=rng.randint(3, 30)))
    if i % 2:  # a repetitive prompt: n-gram lookup has something to find
      prompt = (prompt[:5] * 6)[:rng.randint(8, 30)]
    rows.append(RowRequest(prompt, int(rng.choice([1, 5, 17, 40])), jax.random.key(100 + i),
                           temperature=temperature))
  return rows


def _proposers(cfg, params, other):
  layer_cfg, layer_params = P.layer_skip_draft(cfg, params, (0,))
  return {
      "ngram": (P.NGram(num_draft_tokens=4), None),
      "recycling": (P.Recycling(branching=(3, 2, 1)), None),
      "layerskip": (P.DraftModel(layer_cfg, num_draft_tokens=3), layer_params),
      "draft": (P.DraftModel(other[0], num_draft_tokens=2), other[1]),
  }


@pytest.mark.parametrize("name", ["ngram", "recycling", "layerskip", "draft"])
def test_greedy_speculative_equals_greedy(target, other_draft, name):
  cfg, params = target
  proposer, draft_params = _proposers(cfg, params, other_draft)[name]
  for n in (1, 6):
    rows = _rows(cfg, n, seed=n)
    plain = Generator(cfg, params).generate(rows)
    spec = SpeculativeGenerator(cfg, params, proposer, draft_params=draft_params,
                                steps_per_sync=4, page_size=8)
    out = spec.generate(rows)
    for i, (a, b) in enumerate(zip(plain, out)):
      assert b.tokens == a.tokens, (name, n, i)
      assert b.finished_by_eos == a.finished_by_eos
    st = spec.stats
    assert st.verify_steps > 0 and st.mean_accepted_tokens >= 1.0
    assert len(st.per_depth_acceptance()) == proposer.tree_size - 1


def test_ngram_accepts_on_repetitive_text(target):
  cfg, params = target
  rows = [RowRequest([5, 6, 7, 8] * 8, 40, jax.random.key(0))]
  spec = SpeculativeGenerator(cfg, params, P.NGram(num_draft_tokens=4), page_size=8)
  plain = Generator(cfg, params).generate(rows)
  assert spec.generate(rows)[0].tokens == plain[0].tokens
  # A random tiny model's greedy output cycles; prompt lookup should then accept drafts.
  assert spec.stats.mean_accepted_tokens > 1.5, spec.stats.accepted_hist


def test_pallas_tree_kernel_in_the_model(target):
  cfg, params = target
  rows = _rows(cfg, 3, seed=4)
  ref = SpeculativeGenerator(cfg, params, P.Recycling(branching=(2, 2)), page_size=8)
  pal = SpeculativeGenerator(cfg, params, P.Recycling(branching=(2, 2)), page_size=8,
                             implementation="pallas")
  assert [r.tokens for r in pal.generate(rows)] == [r.tokens for r in ref.generate(rows)]


def test_sampling_runs_and_respects_budgets(target):
  cfg, params = target
  rows = _rows(cfg, 4, seed=9, temperature=1.0)
  spec = SpeculativeGenerator(cfg, params, P.NGram(num_draft_tokens=3), page_size=8)
  out = spec.generate(rows)
  for r, o in zip(rows, out):
    assert 1 <= len(o.tokens) <= r.max_new_tokens
    assert all(0 <= t < cfg.vocab_size for t in o.tokens)
    assert o.finished_by_eos or len(o.tokens) == r.max_new_tokens
  again = SpeculativeGenerator(cfg, params, P.NGram(num_draft_tokens=3), page_size=8)
  assert [o.tokens for o in again.generate(rows)] == [o.tokens for o in out]  # deterministic
