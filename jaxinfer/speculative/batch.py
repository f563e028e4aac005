"""One static batch of rows through a speculative generator, on the host.

Every row is admitted at once (its whole prompt prefilled into pages of its own: the static
scheduler's whole-prompt prefill), then every live row verifies `steps_per_sync` draft trees per
host round trip until all are done; a row's result is delivered at the round trip that finds it
done. Continuous batching (slots refilled, prefixes shared, prompts prefilled in lanes beside
verification) is the paged engine's (`jaxinfer.engine`).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from jaxinfer.generation import RowResult, next_pow2
from jaxinfer.sampling import SamplingParams, all_greedy
from jaxinfer.speculative.steps import _admit, _chunk

_FIELDS = ("temperature", "top_k", "top_p", "min_p")


class Batch:
  """The rows of one `SpeculativeGenerator.generate` call speculating with the generator's
  ladder level `level` (its proposer); `run` returns every row's result."""

  def __init__(self, gen, rows, should_stop, on_result, level: int):
    self.gen, self.rows, self.level = gen, rows, level
    self.should_stop, self.on_result = should_stop, on_result
    proposer = self.proposer = gen.ladder[level]
    cfg, ps = gen.cfg, gen.page_size
    b = self.b = len(rows)
    o, max_len = gen._geometry(max(len(r.prompt_ids) for r in rows),
                               max(r.max_new_tokens for r in rows), proposer.tree_size)
    m = max_len // ps
    self.page_table = np.arange(b * m, dtype=np.int32).reshape(b, m)
    # rows all greedy: steps compiled without the vocabulary sort (`sampling.jit_variants`)
    self.greedy = all_greedy(rows)
    kw = dict(cfg=cfg, proposer=proposer, runtime=gen.runtime, greedy_only=self.greedy)
    self.eos = np.asarray(cfg.eos_token_ids or (-1,), np.int32)
    self.eos_set = set(int(e) for e in cfg.eos_token_ids)
    self.admit = partial(_admit, max_len=max_len, page_size=ps, **kw)
    self.chunk = partial(_chunk, rule=gen.rule, **kw)
    # host arrays go to the device with the call: no operation of their own
    self.sampling = SamplingParams(**{f: np.array([getattr(r, f) for r in rows],
                                                  np.int32 if f == "top_k" else np.float32)
                                      for f in _FIELDS})
    self.state = gen._new_state(b, max_len, o, rows[0].key, proposer, level)
    self.results: list[RowResult | None] = [None] * b
    self.host_done = np.zeros(b, bool)
    self.prefill_s = self.decode_s = 0.0
    self.new_tokens = self.syncs = self.steps = 0
    self.hist = None  # verifications by drafts accepted (once run)

  def run(self) -> list[RowResult]:
    self._admit()
    while True:
      self._deliver()
      live = [i for i in range(self.b) if not self.host_done[i]]
      if not live:
        break
      self._decode(live)
    self._record()
    return self.results

  def _deliver(self) -> None:
    """The results of rows done since the last round trip."""
    finished = [i for i in range(self.b) if self.host_done[i] and self.results[i] is None]
    if not finished:
      return
    toks, counts = np.asarray(self.state.out), np.asarray(self.state.num_generated)
    for i in finished:
      ids = [int(x) for x in toks[i, :counts[i]]]
      self.results[i] = RowResult(ids, bool(ids) and ids[-1] in self.eos_set)
      self.new_tokens += max(0, len(ids) - 1)
      if self.on_result is not None:
        self.on_result(i, self.results[i])

  def _admit(self) -> None:
    """Every row's whole prompt prefilled, its first token sampled."""
    gen, rows, st = self.gen, self.rows, self.gen.stats
    t0, c1 = time.perf_counter(), st.compile_s
    hist = np.zeros((self.b, next_pow2(max(len(r.prompt_ids) for r in rows), 16)), np.int32)
    for j, r in enumerate(rows):
      hist[j, :len(r.prompt_ids)] = r.prompt_ids
    i32 = lambda xs: np.asarray(xs, np.int32)
    self.state = gen._run(("admit", self.level, self.greedy), self.admit, gen.params, gen.draft_params,
                          self.state, hist, i32([len(r.prompt_ids) for r in rows]),
                          i32([r.max_new_tokens for r in rows]), self.sampling,
                          tuple(r.key for r in rows), self.eos)
    self.host_done = np.asarray(self.state.done)
    st.prefill_tokens += sum(len(r.prompt_ids) for r in rows)
    self.prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)

  def _decode(self, live: list[int]) -> None:
    """Up to `steps_per_sync` verification steps, then the host's stop check."""
    gen, st = self.gen, self.gen.stats
    t0, c1 = time.perf_counter(), st.compile_s
    self.state = gen._run(("decode", self.level, self.greedy), self.chunk, gen.params, gen.draft_params,
                          self.state, self.sampling, self.page_table, self.eos,
                          np.int32(gen.steps_per_sync))
    self.host_done = np.asarray(self.state.done)
    self.decode_s += time.perf_counter() - t0 - (st.compile_s - c1)
    self.syncs += 1
    if self.should_stop is not None:
      toks, counts = np.asarray(self.state.out), np.asarray(self.state.num_generated)
      newly = [i for i in live if not self.host_done[i]
               and self.should_stop(i, [int(x) for x in toks[i, :counts[i]]])]
      if newly:
        self.host_done = self.host_done.copy()
        self.host_done[newly] = True
        self.state = gen._place(self.state.replace(done=self.host_done))

  def _record(self) -> None:
    """The batch's counts and times into the generator's stats (its speed: the generator's
    `_generate`); a shared proposer state carries over to the next batch."""
    gen, st, state = self.gen, self.gen.stats, self.state
    if self.proposer.shared_state:
      gen._shared = state.proposer  # what it learned carries over to the next batch
    steps = int(state.step)
    hist = np.asarray(state.accepted_hist)  # (a smaller tree: fewer depths)
    st.accepted_hist[:len(hist)] += hist
    st.verify_steps = int(st.accepted_hist.sum())
    st.emitted += int(state.emitted)
    st.steps += steps
    st.row_slots += steps * self.b
    st.decode_tokens += self.new_tokens
    st.decode_s += self.decode_s
    st.prefill_s += self.prefill_s
    st.host_syncs += self.syncs
    self.steps, self.hist = steps, hist
