"""One batch of rows through a speculative generator's slots, on the host.

Rows are admitted into free slots (their prompts prefilled into the slots' pages, reusing full
prompt pages other rows hold), then every live row verifies `steps_per_sync` draft trees per
host round trip; a finished row's slot is refilled with the next waiting row at the next round
trip (continuous batching). A row with more than `prefill_chunk` prompt tokens to compute is
admitted in chunks, one verification step of the running rows between chunks.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Sequence

import numpy as np

from jaxinfer.engine.pages import page_keys
from jaxinfer.generation import RowResult, next_pow2
from jaxinfer.sampling import SamplingParams
from jaxinfer.speculative.steps import _admit, _chunk, _extend

_FIELDS = ("temperature", "top_k", "top_p", "min_p")


class SlotPrefixes:
  """Host index of the full prompt pages resident in the slots' pages: a page's chained key
  (`pages.page_keys`: its tokens and all before them) -> the pool pages holding its K/V. A
  prompt page is never written after its row's prefill (decoding writes past the prompt), so it
  stays valid, even once its row is done, until its slot is refilled."""

  def __init__(self, pages_per_slot: int):
    self.m = pages_per_slot
    self._where: dict[bytes, dict[int, None]] = {}
    self._slot_keys: dict[int, list[bytes]] = {}

  def find(self, keys: Sequence[bytes]) -> list[int]:
    """Pool pages holding the longest run of leading `keys`."""
    found = []
    for key in keys:
      pages = self._where.get(key)
      if not pages:
        break
      found.append(next(iter(pages)))
    return found

  def refill(self, slot: int, keys: Sequence[bytes]) -> None:
    """Slot `slot` now holds a prompt whose full pages have `keys` (its old entries dropped)."""
    for j, key in enumerate(self._slot_keys.pop(slot, ())):
      self._where[key].pop(slot * self.m + j, None)
      if not self._where[key]:
        del self._where[key]
    self._slot_keys[slot] = list(keys)
    for j, key in enumerate(keys):
      self._where.setdefault(key, {})[slot * self.m + j] = None


class SlotBatch:
  """The rows of one `SpeculativeGenerator.generate` call speculating with the generator's
  ladder level `level` (its proposer); `run` returns every row's result."""

  def __init__(self, gen, rows, should_stop, on_result, level: int):
    self.gen, self.rows, self.level = gen, rows, level
    self.should_stop, self.on_result = should_stop, on_result
    proposer = self.proposer = gen.ladder[level]
    cfg, ps = gen.cfg, gen.page_size
    n = len(rows)
    b = self.b = n if gen.num_slots is None else gen.num_slots
    o, max_len = gen._geometry(max(len(r.prompt_ids) for r in rows),
                               max(r.max_new_tokens for r in rows), proposer.tree_size)
    m = self.m = max_len // ps
    self.page_table = np.arange(b * m, dtype=np.int32).reshape(b, m)
    kw = dict(cfg=cfg, proposer=proposer, runtime=gen.runtime)
    self.eos = np.asarray(cfg.eos_token_ids or (-1,), np.int32)
    self.eos_set = set(int(e) for e in cfg.eos_token_ids)
    self.admit = partial(_admit, max_len=max_len, page_size=ps, **kw)
    self.chunk = partial(_chunk, rule=gen.rule, **kw)
    self.extend = partial(_extend, max_len=max_len, page_size=ps, **kw)
    self.sp = {"temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
               "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32)}

    self.state = gen._new_state(b, max_len, o, rows[0].key, proposer, level)
    # the prefix's last token computed again: its hidden state feeds the draft layer
    self.recompute = int(proposer.reads_prompt_features)
    self.prefixes = SlotPrefixes(m)
    self.sampling = self.host_sampling(self.sp)
    self.slot_row: list[int | None] = [None] * b
    self.pending = list(range(n))[::-1]  # popped from the end: in order
    self.results: list[RowResult | None] = [None] * n
    self.host_done = np.ones(b, bool)
    self.prefill_s = self.decode_s = 0.0
    self.new_tokens = self.syncs = self.steps = 0
    # A long admission (rows with more than `prefill_chunk` prompt tokens to compute) runs in
    # chunks of that many tokens per row, one verification step of the other rows between
    # chunks; its slots are held (not free, not live) until its last chunk admits the rows. One
    # at a time.
    self.group = None

  @staticmethod
  def host_sampling(d) -> SamplingParams:
    """Host sampling values, passed to the compiled steps as they are (host arrays go to the
    device with the call: no operation of their own)."""
    return SamplingParams(**{f: np.array(d[f]) for f in _FIELDS})

  def run(self) -> list[RowResult]:
    b = self.b
    while True:
      self._deliver()
      if self._admit_waiting():
        continue  # rows done at their first token are delivered before decoding
      if self.group is not None and self._advance_group():
        continue
      live = [s for s in range(b) if self.slot_row[s] is not None and not self.host_done[s]]
      if not live:
        if self.group is not None:
          continue
        break
      self._decode(live)
    self._record()
    return self.results

  def _deliver(self) -> None:
    """The results of rows done since the last round trip, their slots freed."""
    finished = [s for s in range(self.b) if self.slot_row[s] is not None and self.host_done[s]]
    if not finished:
      return
    toks, counts = np.asarray(self.state.out), np.asarray(self.state.num_generated)
    for s in finished:
      i, self.slot_row[s] = self.slot_row[s], None
      ids = [int(x) for x in toks[s, :counts[s]]]
      self.results[i] = RowResult(ids, bool(ids) and ids[-1] in self.eos_set)
      self.new_tokens += max(0, len(ids) - 1)
      if self.on_result is not None:
        self.on_result(i, self.results[i])

  def _admit_waiting(self) -> bool:
    """Waiting rows into free slots: short ones admitted now, long ones set up as the long
    admission. Whether rows were admitted."""
    held = set() if self.group is None else set(self.group["slots"])
    free = [s for s in range(self.b) if self.slot_row[s] is None and s not in held]
    if not (self.pending and free):
      return False
    take, starts, keys_of, first, long_rows = self._plan(len(free))
    slots = free[:len(take)]
    now = [j for j, long in enumerate(long_rows) if not long]
    later = [j for j, long in enumerate(long_rows) if long]
    st = self.gen.stats
    t0, c1 = time.perf_counter(), st.compile_s
    if now:
      pick = lambda xs: [xs[j] for j in now]
      self.state = self._admit_rows(pick(take), pick(slots), pick(starts), pick(first),
                                    pick(keys_of))
      self.sampling = self.host_sampling(self.sp)
      self.host_done = np.asarray(self.state.done)
    if later:
      pick = lambda xs: [xs[j] for j in later]
      for s in pick(slots):  # its chunks overwrite the slot's pages: nothing to reuse now
        self.prefixes.refill(s, [])
      self.group = {"take": pick(take), "slots": pick(slots), "found": pick(starts),
                    "first": pick(first), "keys": pick(keys_of), "frontier": pick(first)}
    self.prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
    return bool(now)

  def _plan(self, num_free: int):
    """The next waiting rows to admit (at most `num_free`): (rows, the pool pages of each one's
    reused prefix, its page keys, its first position computed, whether it is long)."""
    ps, c = self.gen.page_size, self.gen.prefill_chunk
    take, starts, keys_of, computing, first, long_rows = [], [], [], set(), [], []
    while self.pending and len(take) < num_free:
      r = self.rows[self.pending[-1]]
      plen = len(r.prompt_ids)
      pkeys = page_keys(r.prompt_ids, ps, plen // ps) if self.gen.prefix_reuse else []
      # the last prompt token is always computed (it samples the first output token)
      shareable = pkeys[:(plen - 1) // ps]
      found = self.prefixes.find(shareable)
      if take and len(found) < len(shareable) and shareable[len(found)] in computing:
        break  # an earlier row of this admission computes more of its prefix: next one
      begin = max(0, len(found) * ps - self.recompute)  # the first position computed
      long = plen - begin > c
      if long and self.group is not None:
        break  # one long admission at a time
      computing.update(pkeys)
      first.append(begin)
      long_rows.append(long)
      take.append(self.pending.pop())
      starts.append(found)
      keys_of.append(pkeys)
    return take, starts, keys_of, first, long_rows

  def _advance_group(self) -> bool:
    """The long admission's next chunk, or its admission once every row has at most a chunk
    left. Whether it was admitted."""
    st, c, g = self.gen.stats, self.gen.prefill_chunk, self.group
    t0, c1 = time.perf_counter(), st.compile_s
    if all(len(self.rows[i].prompt_ids) - f <= c for i, f in zip(g["take"], g["frontier"])):
      self.state = self._admit_rows(g["take"], g["slots"], g["found"], g["first"], g["keys"],
                                    g["frontier"])
      self.sampling = self.host_sampling(self.sp)
      self.host_done = np.asarray(self.state.done)
      self.group = None
      self.prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
      return True
    self.state = self._extend_rows(g)
    st.prefill_chunks += 1
    self.prefill_s += time.perf_counter() - t0 - (st.compile_s - c1)
    return False

  def _admit_rows(self, take, slots, found_of, first, keys_of, from_start=None):
    """Admits rows `take` into `slots`: computes each prompt from `from_start` (default: its
    first position not reused), copying reused pages unless a long admission's chunks have
    (they computed from `first` on); samples the first tokens; offers the prompts' pages
    (`keys_of`) for reuse and counts the prefill. Returns the new state."""
    gen, rows, b, m, sp = self.gen, self.rows, self.b, self.m, self.sp
    chunked = from_start is not None
    k = min(b, next_pow2(len(take)))  # a few admission sizes; padding rows write nothing
    begin = list(from_start) if chunked else first
    w = next_pow2(max(len(rows[i].prompt_ids) - f for i, f in zip(take, begin)), 16)
    hw = next_pow2(max(len(rows[i].prompt_ids) for i in take), 16)
    toks, hist = np.zeros((k, w), np.int32), np.zeros((k, hw), np.int32)
    start, plen, mnew = np.zeros(k, np.int32), np.ones(k, np.int32), np.ones(k, np.int32)
    copy_src = np.zeros((k, m), np.int32)
    copy_dst = np.full((k, m), b * m, np.int32)  # past the pool: no copy
    slot_ids = np.full(k, b, np.int32)
    msp = {f: np.zeros(k, sp[f].dtype) for f in _FIELDS}
    msp["top_p"][:] = 1.0
    for j, (i, s, found) in enumerate(zip(take, slots, found_of)):
      r = rows[i]
      hist[j, :len(r.prompt_ids)] = r.prompt_ids
      toks[j, :len(r.prompt_ids) - begin[j]] = r.prompt_ids[begin[j]:]
      start[j], plen[j], mnew[j], slot_ids[j] = begin[j], len(r.prompt_ids), \
          r.max_new_tokens, s
      if chunked:  # the draft layer's cache continues in the slot's own pages
        copy_src[j] = s * m + np.arange(m)
      else:
        copy_src[j, :len(found)] = found
        copy_dst[j, :len(found)] = s * m + np.arange(len(found))
      self.slot_row[s] = i
      for f in _FIELDS:
        msp[f][j] = sp[f][s] = getattr(r, f)
    keys = tuple(rows[i].key for i in take) + (rows[take[0]].key,) * (k - len(take))
    from_cache = bool(start.any())
    new = gen._run(("admit", self.level, from_cache), partial(self.admit, from_cache=from_cache),
                   gen.params, gen.draft_params, self.state, toks if from_cache else hist,
                   start, hist, plen, mnew, self.host_sampling(msp), keys, self.eos, slot_ids,
                   copy_src, copy_dst)
    for s, pkeys in zip(slots, keys_of):
      self.prefixes.refill(s, pkeys)
    st = gen.stats
    st.prefill_tokens += sum(len(rows[i].prompt_ids) for i in take) - sum(first)
    st.prefill_tokens_saved += sum(first)
    return new

  def _extend_rows(self, g):
    """The next chunk of long admission `g`: `prefill_chunk` more prompt tokens for each of its
    rows with more than that left (the rest wait for the admission itself)."""
    gen, b, m, c = self.gen, self.b, self.m, self.gen.prefill_chunk
    take, slots, found_of, frontier = g["take"], g["slots"], g["found"], g["frontier"]
    k = min(b, next_pow2(len(take)))
    hw = next_pow2(max(len(self.rows[i].prompt_ids) for i in take), 16)
    toks, hist = np.zeros((k, c), np.int32), np.zeros((k, hw), np.int32)
    start, end = np.zeros(k, np.int32), np.zeros(k, np.int32)
    copy_src = np.zeros((k, m), np.int32)
    copy_dst = np.full((k, m), b * m, np.int32)
    slot_ids = np.full(k, b, np.int32)
    copy = g["frontier"] == g["first"] and any(found_of)  # the first chunk (all advance)
    for j, (i, s, found) in enumerate(zip(take, slots, found_of)):
      ids = self.rows[i].prompt_ids
      hist[j, :len(ids)] = ids
      f = frontier[j]
      e = f + c if len(ids) - f > c else f  # short enough now: waits for the admission
      toks[j, :e - f] = ids[f:e]
      start[j], end[j], slot_ids[j] = f, e, s
      copy_src[j] = s * m + np.arange(m)
      if copy:
        copy_src[j, :len(found)] = found
        copy_dst[j, :len(found)] = s * m + np.arange(len(found))
      frontier[j] = e
    return gen._run(("extend", self.level, copy), partial(self.extend, copy=copy), gen.params,
                    gen.draft_params, self.state, toks, start, end, hist, slot_ids, copy_src,
                    copy_dst)

  def _decode(self, live: list[int]) -> None:
    """Verification steps of the live rows, up to `steps_per_sync` (one during a long
    admission: its next chunk follows), then the host's stop check."""
    gen, b, st = self.gen, self.b, self.gen.stats
    # With requests waiting, hand back as soon as one more row is done (its slot refilled);
    # during a long admission, after one step (its next chunk follows).
    min_done = b - len(live) + 1 if self.pending else b
    t0, c1 = time.perf_counter(), st.compile_s
    self.state = gen._run(("decode", self.level), self.chunk, gen.params, gen.draft_params,
                          self.state, self.sampling, self.page_table, self.eos,
                          np.int32(min_done),
                          np.int32(1 if self.group is not None else gen.steps_per_sync))
    self.host_done = np.asarray(self.state.done)
    self.decode_s += time.perf_counter() - t0 - (st.compile_s - c1)
    self.syncs += 1
    if self.should_stop is not None:
      toks, counts = np.asarray(self.state.out), np.asarray(self.state.num_generated)
      newly = [s for s in live if not self.host_done[s]
               and self.should_stop(self.slot_row[s], [int(x) for x in toks[s, :counts[s]]])]
      if newly:
        self.host_done = self.host_done.copy()
        self.host_done[newly] = True
        self.state = gen._place(self.state.replace(done=self.host_done))

  def _record(self) -> None:
    """The batch's counts and times into the generator's stats (its speed: the generator's
    `_generate`); a shared proposer state carries over to the next batch."""
    gen, st, state = self.gen, self.gen.stats, self.state
    t = self.proposer.tree_size
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
    st.spec_batches += 1
    st.tree_batches[t] = st.tree_batches.get(t, 0) + 1
    self.steps = steps
