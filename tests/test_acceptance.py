"""Acceptance rules: greedy walks, and the lossless rules' emitted tokens follow the target
distribution (chi-square over many rows, fixed seeds), which a broken rule fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.speculative import acceptance as A

V = 6
N = 40000  # rows, each an independent trial
# Critical chi-square values at p = 1e-4 (df = V - 1 = 5 and df = 4): a correct rule fails with
# probability 1e-4 per check; the seeds are fixed, so the test is deterministic.
CRIT = {5: 25.7, 4: 23.5}


def _chi2(samples: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
  counts = np.bincount(samples, minlength=len(probs)).astype(float)
  keep = probs > 0
  expected = probs[keep] * len(samples)
  assert counts[~keep].sum() == 0, "drew a token of probability 0"
  return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum() - 1)


def _dist(rng, sharp=1.0):
  x = rng.gamma(sharp, size=V)
  return x / x.sum()


# A tree: root 0 with children 1, 2, 3; node 1 has children 4, 5; node 2 has child 6.
PARENTS = np.array([-1, 0, 0, 0, 1, 1, 2])


def _sample_without_replacement(rng, q, k, n):
  """n rows of k distinct tokens drawn sequentially from q (renormalising after each)."""
  out = np.zeros((n, k), np.int64)
  for i in range(n):
    w = q.copy()
    for j in range(k):
      w_n = w / w.sum()
      out[i, j] = rng.choice(V, p=w_n)
      w[out[i, j]] = 0
  return out


def _tree_trial(rng, sampled_drafts: bool, n: int = N):
  """Per-node target p and draft q (the same for every row); drafts per row."""
  t = len(PARENTS)
  p = np.stack([_dist(rng) for _ in range(t)])
  q = np.stack([_dist(rng, 0.5) for _ in range(t)])
  tokens = np.zeros((n, t), np.int64)
  children = {c: [j for j in range(t) if PARENTS[j] == c] for c in range(t)}
  for node, kids in children.items():
    if not kids:
      continue
    if sampled_drafts:
      tokens[:, kids] = _sample_without_replacement(rng, q[node], len(kids), n)
    else:  # deterministic distinct drafts: q's top-k at that node
      tokens[:, kids] = np.argsort(-q[node])[:len(kids)]
  return p, q, tokens


def _emitted(verdict, tokens):
  """First and second emitted tokens per row (second: -1 when only one was emitted)."""
  path, acc, nxt = (np.asarray(x) for x in (verdict.path, verdict.num_accepted,
                                            verdict.next_token))
  rows = np.arange(len(acc))
  first = np.where(acc >= 1, tokens[rows, path[:, 1]], nxt)
  second = np.where(acc >= 2, tokens[rows, path[:, 2]], np.where(acc == 1, nxt, -1))
  return first, second, path


def _check_lossless(p, q, tokens, use_q, seed=0):
  n, t = tokens.shape
  keys = jax.random.split(jax.random.key(seed), n)
  verdict = A.verify(keys, jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, t, V)),
                     jnp.asarray(tokens, jnp.int32), jnp.asarray(PARENTS),
                     jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, t, V)) if use_q else None)
  first, second, path = _emitted(verdict, tokens)
  stats = [_chi2(first, p[0])]
  # Given the first emitted token is the draft at child c, the next follows p[c].
  for c in (1, 2):
    at_c = (np.asarray(verdict.num_accepted) >= 1) & (path[:, 1] == c)
    if at_c.sum() > 500:
      stats.append(_chi2(second[at_c], p[c]))
  return stats


@pytest.mark.parametrize("sampled", [True, False], ids=["drafts_from_q", "distinct_topk"])
def test_exact_rules_emit_the_target_distribution(sampled):
  rng = np.random.RandomState(1)
  p, q, tokens = _tree_trial(rng, sampled)
  stats = _check_lossless(p, q, tokens, use_q=sampled)
  assert len(stats) >= 2
  for chi2, df in stats:
    assert chi2 < CRIT[df], stats


def test_chain_rejection_sampling_is_lossless():
  rng = np.random.RandomState(2)
  p, q = _dist(rng), _dist(rng, 0.5)
  tokens = rng.choice(V, size=(N, 2), p=q)
  keys = jax.random.split(jax.random.key(3), N)
  verdict = A.verify(keys, jnp.broadcast_to(jnp.asarray(p, jnp.float32), (N, 2, V)),
                     jnp.asarray(tokens, jnp.int32), jnp.asarray([-1, 0]),
                     jnp.broadcast_to(jnp.asarray(q, jnp.float32), (N, 2, V)))
  acc = np.asarray(verdict.num_accepted)
  first = np.where(acc == 1, tokens[:, 1], np.asarray(verdict.next_token))
  chi2, df = _chi2(first, p)
  assert chi2 < CRIT[df]
  alpha = np.minimum(p, q).sum()  # acceptance rate of one draft
  assert abs(acc.mean() - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / N)


def test_a_broken_rule_is_caught(monkeypatch):
  """Sampling from p instead of the residual after a rejection (a classic bug) must fail."""
  rng = np.random.RandomState(1)
  p, q, tokens = _tree_trial(rng, True)
  monkeypatch.setattr(A, "_residual", lambda r, qj: r)
  stats = _check_lossless(p, q, tokens, use_q=True)
  assert any(chi2 > CRIT[df] for chi2, df in stats), stats


def test_greedy_follows_the_argmax_path():
  t = len(PARENTS)
  rng = np.random.RandomState(0)
  logits = rng.randn(3, t, V).astype(np.float32)
  p = jax.nn.softmax(jnp.asarray(logits))
  best = logits.argmax(-1)
  tokens = np.zeros((3, t), np.int64)
  tokens[0, 1:4] = [(best[0, 0] + 1) % V, best[0, 0], (best[0, 0] + 2) % V]  # child 2 matches
  tokens[0, 6] = best[0, 2]  # and so does its child
  tokens[1, 1:4] = [(best[1, 0] + k) % V for k in (1, 2, 3)]  # no child matches
  tokens[2, 1] = best[2, 0]
  tokens[2, 4:6] = [(best[2, 1] + 1) % V, best[2, 1]]  # 0 -> 1 -> 5
  v = A.verify(jax.random.split(jax.random.key(0), 3), p, jnp.asarray(tokens, jnp.int32),
               jnp.asarray(PARENTS), greedy=jnp.ones(3, bool))
  assert np.asarray(v.num_accepted).tolist() == [2, 0, 2]
  assert np.asarray(v.path)[0, :3].tolist() == [0, 2, 6]
  assert np.asarray(v.path)[2, :3].tolist() == [0, 1, 5]
  assert np.asarray(v.next_token).tolist() == [best[0, 6], best[1, 0], best[2, 5]]


def test_typical_acceptance_thresholds():
  p = np.full((1, 2, V), 1e-3, np.float32)
  p[0, 0, :2] = [0.5, 0.495]  # low entropy: threshold = min(eps, delta * exp(-H))
  p /= p.sum(-1, keepdims=True)
  h = -(p[0, 0] * np.log(p[0, 0])).sum()
  thr = min(0.09, 0.3 * np.exp(-h))
  for tok, expect in ((1, p[0, 0, 1] > thr), (4, p[0, 0, 4] > thr)):
    v = A.verify(jax.random.split(jax.random.key(0), 1), jnp.asarray(p),
                 jnp.asarray([[0, tok]], jnp.int32), jnp.asarray([-1, 0]), rule=A.TYPICAL)
    assert int(v.num_accepted[0]) == int(expect)
  with pytest.raises(ValueError, match="rule must be"):
    A.verify(jax.random.split(jax.random.key(0), 1), jnp.asarray(p),
             jnp.asarray([[0, 1]], jnp.int32), jnp.asarray([-1, 0]), rule="lossless-ish")


def test_greedy_fast_path_equals_the_general_rule():
  rng = np.random.RandomState(4)
  b, t = 64, len(PARENTS)
  logits = rng.randn(b, t, V).astype(np.float32)
  best = logits.argmax(-1)
  # Drafts that often match the argmax, so paths of every depth occur.
  tokens = np.where(rng.rand(b, t) < 0.6, best[np.arange(b)[:, None], np.maximum(PARENTS, 0)],
                    rng.randint(0, V, (b, t)))
  keys = jax.random.split(jax.random.key(0), b)
  full = A.verify(keys, jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(tokens, jnp.int32),
                  jnp.asarray(PARENTS), greedy=jnp.ones(b, bool))
  fast = A.verify_greedy(jnp.asarray(tokens, jnp.int32), jnp.asarray(PARENTS), jnp.asarray(best))
  for a, c in ((full.path, fast.path), (full.num_accepted, fast.num_accepted),
               (full.next_token, fast.next_token)):
    np.testing.assert_array_equal(a, c)
  assert len(set(np.asarray(fast.num_accepted).tolist())) >= 3


def test_rows_that_draft_less_stay_lossless():
  """A draft's `limit` (how deep each row tries; 0: the row decodes plainly) cuts deeper nodes
  off: the walk never passes it, and every emitted token still follows the target (the rows'
  first tokens by chi-square, per limit); greedy, the walk stops at the limit with the argmax."""
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.speculative.protocol import Draft
  from jaxinfer.speculative.verdict import judge
  rng = np.random.RandomState(4)
  chain = np.array([-1, 0, 1])
  p = np.stack([_dist(rng) for _ in range(3)])
  tokens = np.tile(np.argsort(-p[[0, 1]], axis=1)[:, 0], (N, 1))  # the likeliest, so accepted
  tokens = np.concatenate([np.zeros((N, 1), np.int64), tokens], 1)
  limit = np.arange(N) % 3
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (N, 3, V))
  parents = jnp.broadcast_to(jnp.asarray(chain), (N, 3))
  draft = Draft(jnp.asarray(tokens, jnp.int32), parents, None, jnp.asarray(limit))
  keys = jax.random.split(jax.random.key(5), N)
  verdict = jax.jit(judge, static_argnums=5)(logits, draft, parents, SamplingParams.make(N, 1.0),
                                             keys, A.EXACT)
  acc, nxt = np.asarray(verdict.num_accepted), np.asarray(verdict.next_token)
  assert (acc <= limit).all() and (acc[limit == 2] == 2).any()
  first = np.where(acc >= 1, tokens[:, 1], nxt)
  for depth in range(3):
    chi2, df = _chi2(first[limit == depth], p[0])
    assert chi2 < CRIT[df], (depth, chi2)
  greedy = judge(logits[:3], draft.replace(tokens=draft.tokens[:3], limit=jnp.asarray([0, 1, 2])),
                 parents[:3], SamplingParams.make(3), keys[:3], A.EXACT)
  assert np.asarray(greedy.num_accepted).tolist() == [0, 1, 2]
  assert np.asarray(greedy.next_token).tolist() == [tokens[0, 1], tokens[0, 2],
                                                    int(np.argmax(p[2]))]


def test_a_draft_q_could_not_have_drawn_is_rejected():
  """A child whose token q gives probability 0 is rejected (it was not drawn from q: the rule's
  ratio would divide by nothing), and the walk goes on to its siblings."""
  n = 200
  p = np.full((n, 3, V), 1 / V, np.float32)
  q = np.zeros((n, 3, V), np.float32)
  q[:, 0, :2] = 0.5
  tokens = np.tile([0, 3, 1], (n, 1))  # the root, a token q never draws, then one it does
  verdict = A.verify(jax.random.split(jax.random.key(0), n), jnp.asarray(p),
                     jnp.asarray(tokens, jnp.int32), jnp.asarray([-1, 0, 0]), jnp.asarray(q))
  accepted = np.asarray(verdict.num_accepted) >= 1
  assert accepted.any()  # node 2, with probability r / q = 1/3
  assert (np.asarray(verdict.path)[accepted, 1] == 2).all()
