"""Continuous batching on the host: slots, chunked prefill lanes and page tables.

Steps come in a few fixed shapes (compiled once each): S decode rows, one per slot, and G lanes
of Q prompt tokens, Q a power of two up to the chunk size (no lanes for a decode-only step), or
one lane of G times the chunk size when a single prompt fills every lane.
Requests are admitted in the order given (the runner sorts them so that prompts sharing a prefix
are adjacent), each reserving every page it can need, so a running sequence is never preempted.

A prompt is prefilled in lanes *before* its sequence takes a slot, all but its last token; a
slot's decode row then feeds that token and samples output token 0. So the decode rows stay busy
while prompts are prefilled beside them (SARATHI), and a step's lanes are filled from as many
prompts as they hold (several lanes may carry one prompt; a lane carries one): when no prefilled
sequence is waiting for the next free slot, the step prefills, admitting requests until its lanes
are full. A sequence whose lanes are in a step may take a slot in that same step (each layer
writes the step's K/V before it attends).

The scheduler runs one step ahead of the results: a decode row's input token is the one the
device sampled for that slot at the previous step (kept on the device), so step t+1 is planned
and launched before step t's tokens reach the host. A sequence that stops at EOS is therefore
decoded once more (that token is discarded); one that reaches its length frees its slot at once.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np

from jaxinfer.engine.pages import PagePool, page_keys


@dataclasses.dataclass
class EngineRequest:
  uid: int
  prompt_ids: list[int]
  max_new_tokens: int
  key_data: np.ndarray  # (2,) uint32: the request's sampling key
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0


@dataclasses.dataclass
class EngineResult:
  uid: int
  tokens: list[int]
  finished_by_eos: bool
  stopped: bool  # ended by the host (stop string)


@dataclasses.dataclass(eq=False)
class _Seq:
  req: EngineRequest
  pages: list[int]
  computed: int  # prompt tokens whose K/V are written (or scheduled to be)
  shared: int  # leading prompt tokens taken from the prefix cache
  to_mark: list[tuple[int, int]]  # (tokens, page) we register, ready once that many computed
  # (a cached page, its own) a prompt prefilled whole shares by copying, before its first step:
  # the partial last page of the same prompt, which it then writes its own tokens into
  copy: tuple[int, int] | None = None
  slot: int | None = None  # None until its prompt (but the last token) is prefilled
  scheduled: int = 0  # output tokens whose sampling has been launched (plain steps)
  tree: bool | None = None  # speculating: its last step verified a tree (None: none yet)
  generated: list[int] = dataclasses.field(default_factory=list)
  released: bool = False  # slot and pages given back
  done: bool = False  # result delivered

  @property
  def prompt_len(self) -> int:
    return len(self.req.prompt_ids)

  @property
  def in_prefill(self) -> bool:
    """Prompt tokens remain for the lanes (the last one is its decode row's first input)."""
    return self.computed < self.prompt_len - 1


@dataclasses.dataclass
class StepPlan:
  """Host arrays for one device step."""

  tokens: np.ndarray  # (S + G*Q,) prompt tokens (decode rows take the device's last token)
  next_tokens: np.ndarray  # (S + G*Q,) the prompt token after each lane token
  from_device: np.ndarray  # (S + G*Q,) bool: decode rows fed the slot's last sampled token
  positions: np.ndarray  # (S + G*Q,); out-of-range positions are padding (writes dropped)
  decode_table: np.ndarray  # (S, M)
  chunk_table: np.ndarray  # (G, M); G = 0 for a decode-only step
  sample_index: np.ndarray  # (S,): index of that token in the request's output
  sampled: np.ndarray  # (S,) bool: slots that sample this step
  sampling: dict[str, np.ndarray]  # per slot temperature, top_k, top_p, min_p
  key_data: np.ndarray  # (S, 2) uint32
  samples: list[tuple[int, "_Seq", int, int]]  # (slot, sequence, output index, step)
  num_decode: int  # tokens decoded (over all the plan's steps)
  num_prefill: int  # prompt tokens in lanes
  num_steps: int = 1  # decode-only plans: steps run in one dispatch (speculating: at most)
  active: int = 0  # slots holding a sequence during the plan's steps
  admits: list["_Seq"] = dataclasses.field(default_factory=list)  # speculating: slots' firsts
  level: int = 0  # speculating: the ladder level (tree) its steps verify
  waiting: bool = False  # requests wait for a slot (a slot freed now would be refilled)
  tree: bool = False  # decode rows are draft trees (the device tracks their progress)
  copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (from, to) pages
  # copied before the step (`_Seq.copy`)


def lane_length(take: int, chunk: int | None) -> int:
  """The width of a lane for `take` tokens: a power of two >= 16, at most `chunk` (if any)."""
  width = max(16, 1 << (take - 1).bit_length())
  return width if chunk is None else min(chunk, width)


class Scheduler:

  def __init__(self, num_slots: int, lanes: int, chunk: int, page_size: int, max_pages: int,
               pool: PagePool, eos_ids: tuple[int, ...], decode_steps: int = 1,
               tree_size: int | None = None, lookahead: int = 0, whole_prompts: bool = False,
               waves: bool = False):
    """tree_size: decode rows may be draft trees of this many tokens (`engine.speculate`),
    each plan's rows either trees or plain decoding (`layout`). A tree row's progress is known
    on the host only once its step's results are read, so a sequence keeps its slot until then,
    and reserves pages for one tree beyond its longest output. A row changes between trees and
    plain decoding only when every launched plan has been committed (its progress is known).
    lookahead: prompt pages are shared only between prompts that agree on that many tokens after
    them (`Proposer.feature_lookahead`).
    whole_prompts: each prompt (but its last token) is prefilled in a step's one lane, however
    long (a power of two >= 16 wide: its own width, whatever else runs), its pages shared only
    with the same prompt (a dynamic sparsity pattern sees the whole prompt at once), whose
    partial last page is copied (`_Seq.copy`). waves: static batching: requests
    are admitted S at a time, the next S once every one of them has ended."""
    self.s, self.g, self.q = num_slots, 1 if whole_prompts else lanes, chunk
    self.whole_prompts, self.waves = whole_prompts, waves
    self._wave_left = 0  # (waves) requests the current wave may still admit
    self.tree_size, self.lookahead = tree_size, lookahead
    self.decode_steps = decode_steps
    self.page_size, self.max_pages = page_size, max_pages
    self.pool = pool
    self.eos = set(eos_ids)
    self.pending: collections.deque[EngineRequest] = collections.deque()
    self.slots: list[_Seq | None] = [None] * num_slots
    self.order: list[_Seq] = []  # admitted sequences not yet released, in admission order
    self.out_of_range = max_pages * page_size
    self.prefill_tokens_saved = 0
    self.prefill_tokens_computed = 0  # in lanes, and each prompt's last token in its decode row
    self.lane_tokens = 0  # prompt tokens computed in lanes
    self.tokens_discarded = 0  # decoded after their sequence ended (EOS / stop string)
    self.tokens_taken = 0  # appended to their sequences' outputs
    self._head_keys: tuple[EngineRequest | None, list[bytes]] = (None, [])
    self.unread = 0  # plans laid out and not yet committed
    self._marked: set[int] = set()  # pages the step being scheduled writes (marked ready)

  def pages_needed(self, req: EngineRequest) -> int:
    return -(-(len(req.prompt_ids) + req.max_new_tokens + (self.tree_size or 0))
             // self.page_size)

  def add(self, req: EngineRequest) -> None:
    need = self.pages_needed(req)
    if need > self.max_pages or need > self.pool.num_pages:
      raise ValueError(f"request {req.uid} needs {need} KV pages; the engine allows "
                       f"{min(self.max_pages, self.pool.num_pages)}")
    if not req.prompt_ids or req.max_new_tokens < 1:
      raise ValueError(f"request {req.uid}: needs a prompt and max_new_tokens >= 1")
    self.pending.append(req)

  def idle(self) -> bool:
    return not self.pending and not self.order

  def _admit(self) -> _Seq | None:
    """Admits the first pending request (reserving its pages; no slot yet), or None when its
    pages do not fit."""
    req, ps = self.pending[0], self.page_size
    prompt_len = len(req.prompt_ids)
    full = (prompt_len - 1) // ps  # the last prompt token is always computed
    if self._head_keys[0] is not req:  # hashed once, however often a full pool defers it
      if self.whole_prompts:  # every page the prompt but its last token fills, by all of it
        keys = page_keys(req.prompt_ids[:-1], ps, -(-(prompt_len - 1) // ps), whole=True)
      else:
        keys = page_keys(req.prompt_ids, ps, (prompt_len - self.lookahead) // ps,
                         self.lookahead)
      self._head_keys = (req, keys)
    keys = self._head_keys[1]
    found = []
    for key in keys[:len(keys) if self.whole_prompts else full]:
      page = self.pool.lookup(key)
      if page is None:
        break
      found.append(page)
    if self.whole_prompts and len(found) < len(keys):  # none of it can be computed alone
      self.pool.release(found)
      found = []
    shared = found[:full]  # (whole: the partial last page beyond, to copy)
    fresh = self.pool.alloc(self.pages_needed(req) - len(shared))
    if fresh is None and len(found) > len(shared) and not self.order:
      # the page to copy is one more than the request needs, and no sequence holds pages that
      # it could wait for: computed alone, it fits
      self.pool.release(found)
      found = shared = []
      fresh = self.pool.alloc(self.pages_needed(req))
    if fresh is None:
      self.pool.release(found)
      return None
    self.pending.popleft()
    pages = shared + fresh
    to_mark = []
    end = prompt_len - 1 if self.whole_prompts else prompt_len  # (whole: a partial page's)
    for j in range(len(found), len(keys)):
      self.pool.register(keys[j], pages[j])
      to_mark.append((min((j + 1) * ps, end), pages[j]))
    taken = prompt_len - 1 if self.whole_prompts and found else len(shared) * ps
    seq = _Seq(req, pages, computed=taken, shared=taken, to_mark=to_mark,
               copy=(found[-1], fresh[0]) if len(found) > len(shared) else None)
    self.prefill_tokens_saved += seq.shared
    self.order.append(seq)
    return seq

  def _advance(self, seq: _Seq, computed: int) -> None:
    """Counts a prompt's tokens up to `computed` as written; the pages they complete are ready
    for sharers (any later step, or a later lane or row of this one, reads them after)."""
    self.prefill_tokens_computed += computed - seq.computed
    seq.computed = computed
    for end, page in seq.to_mark:
      if end <= computed:
        self.pool.ready[page] = True
        self._marked.add(page)
    seq.to_mark = [(end, p) for end, p in seq.to_mark if end > computed]

  def _release(self, seq: _Seq) -> None:
    if not seq.released:
      seq.released = True
      self.pool.release(seq.pages + ([seq.copy[0]] if seq.copy else []))
      if seq.slot is not None:
        self.slots[seq.slot] = None
      self.order.remove(seq)

  def _shared_pages_ready(self, seq: _Seq) -> bool:
    """A sequence may only read its shared pages (or copy one) once every one of them has been
    written."""
    return (all(self.pool.ready[p] for p in seq.pages[:seq.shared // self.page_size])
            and (seq.copy is None or self.pool.ready[seq.copy[0]]))

  def _can_decode(self, seq: _Seq) -> bool:
    """Prefilled, its shared pages ready; a page it copies written by an earlier step (the copy
    runs before the step)."""
    return (seq.slot is None and not seq.in_prefill and self._shared_pages_ready(seq)
            and (seq.copy is None or seq.copy[0] not in self._marked))

  def _lanes(self) -> list[tuple[_Seq, int, int]]:
    """This step's lanes (sequence, first token, tokens): unfinished prompts first, in admission
    order, then newly admitted ones until every lane is full (at most S sequences beyond the
    free slots go without one; admission pauses at a prompt waiting for shared pages)."""
    lanes: list[tuple[_Seq, int, int]] = []

    def fill(seq):
      while len(lanes) < self.g and seq.in_prefill:
        take = seq.prompt_len - 1 - seq.computed
        take = take if self.whole_prompts else min(self.q, take)
        lanes.append((seq, seq.computed, take))
        self._advance(seq, seq.computed + take)

    for seq in self.order:
      if len(lanes) == self.g:
        break
      if seq.in_prefill and self._shared_pages_ready(seq):
        fill(seq)
    room = self.s + self.slots.count(None) - sum(seq.slot is None for seq in self.order)
    if self.waves:  # a wave is the next S requests; the one after waits until all have ended
      if not self.order and not self._wave_left:
        self._wave_left = self.s
      room = min(room, self._wave_left)
    while len(lanes) < self.g and self.pending and room > 0:
      seq = self._admit()
      if seq is None:
        break
      room -= 1
      self._wave_left -= 1
      if not self._shared_pages_ready(seq):
        break
      fill(seq)
    return lanes

  @property
  def running(self) -> int:
    """Sequences holding a slot."""
    return self.s - self.slots.count(None)

  def schedule(self) -> tuple[list[tuple[_Seq, int, int]], int, int]:
    """Prefills and admits what is due, gives free slots to prefilled sequences; returns the
    step's lanes (sequence, first token, tokens), their number G and length Q (0: none)."""
    g = self.g
    self._marked = set()  # pages this step's lanes write
    free = self.slots.count(None)
    waiting = sum(self._can_decode(seq) for seq in self.order)
    # Prefill when no prefilled sequence would be left for the slot that frees next.
    lanes = self._lanes() if waiting <= free else []
    for seq in self.order:
      if free == 0:
        break
      if self._can_decode(seq):
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        free -= 1
    if g > 1 and len(lanes) == g and all(lane[0] is lanes[0][0] and lane[2] == self.q
                                         for lane in lanes):
      # One prompt fills every lane: one lane of G*Q tokens (its pages gathered once, not G times)
      g, q = 1, g * self.q
      lanes = [(lanes[0][0], lanes[0][1], q)]
    else:
      longest = max([t for _, _, t in lanes], default=0)
      q = lane_length(longest, None if self.whole_prompts else self.q) if lanes else 0
    return lanes, g, q

  def plan(self) -> StepPlan | None:
    """Schedules the next step and lays it out (trees if the scheduler has a tree size); None
    when nothing can run now."""
    return self.layout(*self.schedule(), tree=bool(self.tree_size))

  def layout(self, lanes, g: int, q: int, tree: bool = False) -> StepPlan | None:
    """The host arrays of a scheduled step (`schedule`), its decode rows draft trees or plain
    decoding; None when nothing can run now."""
    s, m = self.s, self.max_pages
    n = s + (g * q if q else 0)
    tokens = np.zeros(n, np.int32)
    next_tokens = np.zeros(n, np.int32)
    from_device = np.zeros(n, bool)
    positions = np.full(n, self.out_of_range, np.int32)
    decode_table = np.zeros((s, m), np.int32)
    chunk_table = np.zeros((g if q else 0, m), np.int32)
    sample_index = np.zeros(s, np.int32)
    sampled = np.zeros(s, bool)
    key_data = np.zeros((s, 2), np.uint32)
    sampling = {"temperature": np.zeros(s, np.float32), "top_k": np.zeros(s, np.int32),
                "top_p": np.ones(s, np.float32), "min_p": np.zeros(s, np.float32)}
    samples = []
    num_decode = num_prefill = 0
    running = [seq for seq in self.order if seq.slot is not None]
    for seq in running:
      if seq.tree is not None and seq.tree != tree:  # its progress must be known: all read
        assert not self.unread, "a row changes between trees and plain decoding unread"
        seq.scheduled = len(seq.generated)

    # Without lanes, nothing changes before the first running sequence reaches its length: decode
    # runs until then (at most `decode_steps` steps) in one dispatch.
    steps = 1
    if not lanes and tree:
      steps = self.decode_steps  # (the device ends the dispatch early when a row ends)
    elif not lanes:
      steps = max(1, min([self.decode_steps] + [seq.req.max_new_tokens - seq.scheduled
                                                for seq in running]))
    admits, copies = [], self._copies(running)
    for seq in running:
      slot = seq.slot
      decode_table[slot, :len(seq.pages)] = seq.pages
      key_data[slot] = seq.req.key_data
      for f in sampling:
        sampling[f][slot] = getattr(seq.req, f)
      sampled[slot] = True
      was_tree, seq.tree = seq.tree, tree
      if tree:  # the device knows the row's progress; its first tree roots at the last token
        if seq.computed < seq.prompt_len or was_tree is False:  # (so far) onto the device
          admits.append(seq)
          self._advance(seq, seq.prompt_len)
        samples.extend((slot, seq, -1, i) for i in range(steps))
        continue
      if seq.computed < seq.prompt_len:  # first step: the prompt's last token
        tokens[slot] = seq.req.prompt_ids[-1]
        self._advance(seq, seq.prompt_len)
      elif was_tree:  # the last token its trees emitted (none: its admitting dispatch ended
        tokens[slot] = (seq.generated or seq.req.prompt_ids)[-1]  # before its first step)
      else:  # the token sampled for this slot at the previous step
        from_device[slot] = True
      positions[slot] = seq.prompt_len + seq.scheduled - 1
      sample_index[slot] = seq.scheduled
      samples.extend((slot, seq, seq.scheduled + i, i) for i in range(steps))
      seq.scheduled += steps
      num_decode += steps
    for lane, (seq, start, take) in enumerate(lanes):
      base = s + lane * q
      tokens[base:base + take] = seq.req.prompt_ids[start:start + take]
      next_tokens[base:base + take] = seq.req.prompt_ids[start + 1:start + take + 1]
      positions[base:base + take] = np.arange(start, start + take)
      chunk_table[lane, :len(seq.pages)] = seq.pages
      num_prefill += take
    self.lane_tokens += num_prefill
    for seq in running:  # reached its length: nothing more will be written for it
      if not tree and seq.scheduled >= seq.req.max_new_tokens:
        self._release(seq)
    if not samples and not num_prefill:
      return None
    self.unread += 1
    waiting = (bool(self.pending) and (not self.waves or self._wave_left > 0)
               or any(seq.slot is None for seq in self.order))
    return StepPlan(tokens, next_tokens, from_device, positions, decode_table, chunk_table,
                    sample_index, sampled, sampling, key_data, samples, num_decode, num_prefill,
                    steps, len(running), admits, waiting=waiting, tree=tree, copies=copies)

  def _copies(self, running: list[_Seq]) -> list[tuple[int, int]]:
    """The page copies (`_Seq.copy`) of the sequences taking their first step, to run before
    it; the cached pages they copy are released."""
    copies = []
    for seq in running:
      if seq.copy is not None:
        copies.append(seq.copy)
        self.pool.release(seq.copy[:1])
        seq.copy = None
    return copies

  def commit(self, plan: StepPlan, tokens: np.ndarray,
             should_stop: Callable[[int, list[int]], bool] | None = None) -> list[EngineResult]:
    """Takes a plan's sampled tokens ((steps, S), or (S,) for one step); returns the sequences
    that finished."""
    self.unread -= 1
    if plan.tree:
      return self._commit_trees(plan, *tokens, should_stop)
    results = []
    tokens = tokens.reshape(-1, self.s)
    for slot, seq, index, step in plan.samples:
      if seq.done:  # decoded past its EOS / stop string: discard
        self.tokens_discarded += 1
        continue
      assert index == len(seq.generated), (index, len(seq.generated))
      results += self._take(seq, [int(tokens[step, slot])], should_stop)
    return results

  def _commit_trees(self, plan: StepPlan, emitted: np.ndarray, counts: np.ndarray,
                    should_stop) -> list[EngineResult]:
    """Speculating: takes what each step emitted per slot (emitted (steps, S, T), the first
    counts (steps, S) of each real); returns the sequences that finished."""
    results = []
    for slot, seq, _, step in plan.samples:
      new = emitted[step, slot, :counts[step, slot]].tolist()
      if seq.done:  # past its end (a stop string the device could not know of)
        self.tokens_discarded += len(new)
        continue
      results += self._take(seq, new, should_stop)
    return results

  def _take(self, seq: _Seq, new: list[int], should_stop) -> list[EngineResult]:
    """Appends a sequence's new tokens up to its end (EOS, a stop string, its budget), counting
    any after it as discarded; returns its result if it ended."""
    for j, tok in enumerate(new):
      seq.generated.append(tok)
      self.tokens_taken += 1
      eos = tok in self.eos
      stopped = (not eos and should_stop is not None
                 and should_stop(seq.req.uid, seq.generated))
      if eos or stopped or len(seq.generated) >= seq.req.max_new_tokens:
        seq.done = True
        self.tokens_discarded += len(new) - j - 1
        self._release(seq)
        return [EngineResult(seq.req.uid, seq.generated, eos, stopped)]
    return []
