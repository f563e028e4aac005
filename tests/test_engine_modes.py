"""The engine's two modes beside chunked continuous batching: prompts prefilled whole, each in a
lane of its own, under a dynamic sparsity pattern (MInference's patterns need a prompt's queries
and keys at once), and static batching (requests admitted in waves)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_runs import plain_greedy, requests, run_engine
from jaxinfer import checkpoint
from jaxinfer import model as M
from jaxinfer.engine.scheduler import lane_length
from jaxinfer.kv_cache import KVCache
from jaxinfer.runtime import Runtime
from jaxinfer.sparsity import parse
from jaxinfer.speculative import proposers as P


@pytest.fixture(scope="module")
def target(tiny_model_dir):
  cfg, params, _ = checkpoint.load_model(str(tiny_model_dir))
  return cfg, params


def whole_prompt_greedy(target, req, runtime: Runtime, max_len: int) -> list[int]:
  """Greedy decoding written out: the prompt but its last token in one chunk forward (the
  pattern applied to it), padded as the engine's lane is, into a contiguous cache; then one
  token at a time over the cache."""
  cfg, params = target
  t = len(req.prompt_ids) - 1
  width = lane_length(t, None)
  tokens = np.zeros(width, np.int32)
  positions = np.full(width, max_len, np.int32)  # padding: past the cache (written nowhere)
  tokens[:t], positions[:t] = req.prompt_ids[:-1], np.arange(t)
  cache = KVCache.init(cfg, 1, max_len)
  _, cache = M.forward(params, jnp.asarray(tokens)[None], jnp.asarray(positions)[None], cfg,
                       cache, kv_source="chunk", runtime=runtime)
  out, last = [], req.prompt_ids[-1]
  for i in range(req.max_new_tokens):
    hidden, cache = M.forward(params, jnp.asarray([[last]]), jnp.asarray([[t + i]]), cfg, cache,
                              kv_source="cache", runtime=runtime)
    last = int(jnp.argmax(M.logits(params, hidden[0, 0])))
    out.append(last)
    if last in cfg.eos_token_ids:
      break
  return out


@pytest.mark.parametrize("pattern", ["block_topk:1,16", "vertical_slash:1,1,16"])
def test_dynamic_sparsity_prefills_each_prompt_whole(target, pattern):
  """Under a dynamic pattern each prompt is prefilled in one lane of its own, sharing no pages
  (a shared header is computed again), with more requests than slots: every output equals
  decoding written out with the pattern over the whole prompt, and the pattern matters (dense
  decoding differs)."""
  rng = np.random.RandomState(0)
  header = [int(x) for x in rng.randint(3, 60, 12)]
  # prompts but their last token 32, 128, 16 (dense: under two blocks), 64, 32 long: no padding
  reqs = requests([(header + [int(x) for x in rng.randint(3, 60, n)], 6)
                   for n in (21, 117, 5, 53, 21)])
  runtime = Runtime(sparsity=parse(pattern))
  out, st, eng = run_engine(target, reqs, runtime=runtime, max_len=160)
  max_len = eng.max_pages * eng.cfg.page_size
  got = {u: r.tokens for u, r in out.items()}
  assert got == {r.uid: whole_prompt_greedy(target, r, runtime, max_len) for r in reqs}
  assert got != plain_greedy(target, reqs)
  assert st.prefill_tokens_saved == 0
  assert st.lane_tokens == sum(len(r.prompt_ids) - 1 for r in reqs)
  assert st.compilations <= eng.max_shapes


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_the_same_prompt_prefilled_whole_is_computed_once(target, kv_cache_dtype):
  """Under a dynamic pattern a prompt's pages depend on all of it, so only the same prompt
  shares them (N samples of a prompt, a repeated one): its full pages by reference, its partial
  last page copied to a page of the sharer's own before its first step (it writes its own
  tokens after the prompt's there; int8 pages with their scales). Each prompt is computed once;
  a prompt that differs from another in a single token (but its last) shares nothing; every
  output equals decoding written out with the pattern (with int8 pages: the prompt's first
  copy's, which computed it)."""
  rng = np.random.RandomState(3)
  same = [int(x) for x in rng.randint(3, 60, 45)]  # 44 tokens prefilled: 5 pages of 8, the last
  other = same[:20] + [same[20] + 1] + same[21:]  # partial
  reqs = requests([(same, 6), (other, 6), (same, 6), (same, 4), (same[:40], 6)])
  runtime = Runtime(sparsity=parse("vertical_slash:1,1,16"))
  out, st, eng = run_engine(target, reqs, runtime=runtime, max_len=64,
                            kv_cache_dtype=kv_cache_dtype)
  got = {u: r.tokens for u, r in out.items()}
  assert got[2] == got[0] and got[3] == got[0][:4]
  if kv_cache_dtype is None:
    max_len = eng.max_pages * eng.cfg.page_size
    assert got == {r.uid: whole_prompt_greedy(target, r, runtime, max_len) for r in reqs}
  assert st.prefill_tokens_saved == 2 * 44
  assert st.lane_tokens == 44 + 44 + 39
  assert "copy" in eng._compiled and st.compilations <= eng.max_shapes
  if kv_cache_dtype is None:  # a pool of just the pages one request needs: the page a sharer
    # would copy is one more, so the second sample computes the prompt again once the first ends
    out, st, _ = run_engine(target, requests([(same, 6)] * 2), runtime=runtime, max_len=56,
                            kv_pages=7)
    assert [r.tokens for r in out.values()] == [got[0]] * 2 and st.prefill_tokens_saved == 0


def test_static_batching_admits_requests_in_waves(target):
  """waves (`--scheduler=static`): S requests at a time, the next S once all have ended, so every
  request of a wave finishes before any of the next (continuous batching refills a slot at
  once: a short request admitted later finishes first); the outputs are the same."""
  rng = np.random.RandomState(1)
  reqs = requests([([int(x) for x in rng.randint(3, 60, n)], budget)
                   for n, budget in ((20, 24), (5, 3), (40, 4), (9, 2), (17, 3), (3, 5), (30, 2))])
  waves, st_waves, _ = run_engine(target, reqs, waves=True)
  cont, st_cont, _ = run_engine(target, reqs)
  spec, _, _ = run_engine(target, reqs, P.NGram(num_draft_tokens=3), waves=True,
                          speculation="always")
  for out in (waves, spec):
    assert [sorted(list(out)[i:i + 3]) for i in (0, 3, 6)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert {u: r.tokens for u, r in out.items()} == {u: r.tokens for u, r in cont.items()}
  assert list(cont).index(3) < list(cont).index(0)
  assert st_waves.mean_occupancy < st_cont.mean_occupancy


def test_the_api_serves_a_dynamic_pattern(tiny_model_dir, target):
  """`LLM(sparsity=...)` with a dynamic pattern serves through the engine (whole prompts), as
  decoding written out does; chunk options it would not read are refused."""
  import jaxinfer
  llm = jaxinfer.LLM(str(tiny_model_dir), sparsity="vertical_slash:1,1,16", progress=False)
  prompt = [int(x) for x in np.random.RandomState(2).randint(3, 60, 65)]
  out = llm.generate([prompt], jaxinfer.SamplingParams(max_new_tokens=5))[0]
  want = whole_prompt_greedy(target, requests([(prompt, 5)])[0], Runtime(sparsity=llm.sparsity),
                             llm._backend.engines[0].max_pages * 16)
  assert out.completion_ids == want
  with pytest.raises(jaxinfer.UserError, match="^chunk_size: under sparsity="):
    jaxinfer.LLM(str(tiny_model_dir), sparsity="block_topk:2", chunk_size=64)


def test_a_wave_holds_at_most_s_requests_until_all_have_ended():
  """A wave is the next S requests, however they are admitted: one whose shared prefix pages
  are not written yet counts against its wave, and a wave whose first request ends before the
  rest are admitted still takes S requests."""
  from jaxinfer.engine.pages import PagePool
  from jaxinfer.engine.scheduler import Scheduler
  header = list(range(3, 19))  # four whole pages: the last written by its own decode row

  def waves(prompts_and_budgets, lanes):
    sched = Scheduler(num_slots=2, lanes=lanes, chunk=16, page_size=4, max_pages=20,
                      pool=PagePool(200, 4), eos_ids=(), waves=True)
    for req in requests(prompts_and_budgets):
      sched.add(req)
    seen, ended = [], []
    while not sched.idle():
      plan = sched.plan()
      live = {seq.req.uid for seq in sched.order}
      seen.append(live)
      if plan is not None:
        ended += [r.uid for r in sched.commit(plan, np.full((plan.num_steps, 2), 7, np.int32))]
    return seen, ended

  seen, ended = waves([(header, 2), (header + [52, 53], 6), ([60] * 10, 3), ([61] * 10, 3)], 2)
  assert all(live <= {0, 1} or live <= {2, 3} for live in seen), seen
  assert sorted(ended[:2]) == [0, 1] and sorted(ended[2:]) == [2, 3]
  seen, ended = waves([([40] * 9, 1), ([41] * 30, 4), ([42] * 9, 2)], 1)  # one lane a step
  assert all(live <= {0, 1} or live <= {2} for live in seen), seen


def test_a_pattern_over_a_models_own_sliding_window_is_refused(tmp_path):
  """A model with a sliding window keeps it: a --sparsity pattern, which would replace its mask,
  is refused in one line."""
  import jaxinfer
  from conftest import make_tiny_model_dir
  model = make_tiny_model_dir(tmp_path, sliding_window=12, family="mistral")
  from jaxinfer import aot
  for pattern in ("block_topk:2,16", "sinks_window:2,8"):
    with pytest.raises(jaxinfer.UserError, match="already uses a sliding window"):
      jaxinfer.LLM(str(model), sparsity=pattern, progress=False)
    # compile refuses it too (it was a traceback, or a step compiled without the model's window)
    with pytest.raises(aot.CompileError, match="^--sparsity: .* already uses a sliding window"):
      aot.run(aot.CompileJob("cuda", model=str(model), sparsity=pattern))
  # a draft model with a window of its own, under a target's pattern (it crashed mid-run)
  target = make_tiny_model_dir(tmp_path / "target")
  with pytest.raises(jaxinfer.UserError, match="^sparsity: the draft model already uses a slid"):
    jaxinfer.LLM(str(target), sparsity="sinks_window:2,8", speculative="draft",
                 draft_model=str(model), progress=False)


def test_a_dynamic_pattern_takes_blocks_a_lane_can_hold():
  """A BLOCK that is not a power of two never fitted a prompt's lane (one): accepted, it ran
  every prompt dense. Refused, as chunk options compile would have ignored."""
  from jaxinfer import aot
  from jaxinfer.sparsity import parse
  for spec in ("block_topk:1,48", "vertical_slash:1,1,100"):
    with pytest.raises(ValueError, match="BLOCK must be a power of two"):
      parse(spec)
  assert parse("block_topk:1,64").block == 64
  with pytest.raises(aot.CompileError, match="^--chunk_size: under --sparsity=block_topk"):
    aot.run(aot.CompileJob("cuda", model="preset:tiny", sparsity="block_topk:1,16",
                           chunk_size=64))
