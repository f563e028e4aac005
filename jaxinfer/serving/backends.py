"""Requests run on this process's replicas: one paged engine per replica (continuous batching or
static waves, chunked prefill or whole prompts under a dynamic sparsity pattern, shared prefixes,
speculative decoding).

`prepare(requests)` builds the replicas (or keeps those of an earlier call when they are large
enough, so repeated calls reuse their compiled steps) and checks memory before anything runs;
`run(requests, deliver, should_stop)` generates every sample of every request, calling
`deliver(request, sample_index, tokens, finished_by_eos)` as each finishes, and returns what
the call measured (a stats dict, see `jaxinfer.serving.metrics`).

In a run of several processes every process is given all requests: they are split among all
replicas of the run alike everywhere, each process runs its replicas' shares, and the results of
a replica are delivered by the one process that leads it.
"""

from __future__ import annotations

import threading
from typing import Callable

import jax
import numpy as np

from jaxinfer.engine import Engine, EngineConfig, EngineRequest
from jaxinfer.engine.engine import EngineStats
from jaxinfer.engine.policy import policy_metrics
from jaxinfer.errors import Cancelled, UserError
from jaxinfer.kv_cache import PagedKVCache
from jaxinfer.options import ServeOptions
from jaxinfer.requests import Request
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import sample_key
from jaxinfer.serving import placement
from jaxinfer.sharding import device_bytes

Deliver = Callable[[Request, int, list, bool], None]
StopCheck = Callable[[Request, list], bool]


def _rows(requests: list[Request]) -> list[tuple[Request, int]]:
  return [(req, k) for req in requests for k in range(req.n)]


def _runtime(opts: ServeOptions, mesh, sparsity) -> Runtime:
  """One replica's runtime: its mesh (None: the default device), the default rules, the
  attention implementation and the parsed sparsity."""
  return Runtime(mesh, implementation=opts.implementation, sparsity=sparsity)


def _engine_config(opts: ServeOptions) -> EngineConfig:
  return EngineConfig(num_slots=opts.batch_size, chunk_size=opts.chunk_size,
                      chunk_lanes=opts.chunk_lanes, page_size=opts.page_size,
                      kv_pages=opts.kv_pages, decode_steps=opts.decode_steps,
                      kv_cache_dtype=opts.kv_cache_dtype, waves=opts.scheduler == "static")


class EngineBackend:
  """One paged engine per replica (`--scheduler`: continuous, or static waves); requests split
  among them by tokens, sorted by prompt (`order` "prefix") so that sharers of a prefix meet on
  one replica. With a proposer the engines speculate, its weights whole on each of a replica's
  devices."""

  def __init__(self, opts: ServeOptions, cfg, params, replicas: list[placement.Replica],
               total: int, sparsity, proposer=None, draft_params=None):
    if proposer is not None and opts.speculation == "auto" and any(
        r.spans_processes for r in replicas):
      raise UserError(f"--mesh: {opts.mesh} has replicas spanning processes, whose "
                      f"--speculation=auto would pick trees by each process's own measured "
                      f"time; use --speculation=always")
    self.opts, self.cfg, self.params, self.proposer = opts, cfg, params, proposer
    self.draft_params = draft_params
    self.replicas, self.total = replicas, total
    self.runtimes = [_runtime(opts, r.mesh, sparsity) for r in replicas]
    self.engines: list[Engine] = []
    self.max_len = 0

  def prepare(self, requests: list[Request]) -> None:
    """Engines whose pools hold the longest request (kept from an earlier call when they do).
    They are built for whole pages, so that a later call a few tokens longer keeps them (and the
    prompt pages their pools cache); a longer one rebuilds them (attention reads every page of
    a row's table: engines built larger would cost every later step)."""
    need = max([len(r.prompt_ids) + r.max_new_tokens for r in requests] + [2])
    ps = self.opts.page_size
    if need > self.max_len:
      self._build(max(need, min(-(-need // ps) * ps, self.cfg.max_seq_len)))
    pages_needed = -(-(need + (self.engines[0].tree_size or 0)) // ps)
    if pages_needed > self.engines[0].num_pool_pages:
      size = PagedKVCache.pool_bytes(self.cfg, pages_needed, ps, self.opts.kv_cache_dtype)
      raise UserError(f"--kv_pages: the longest request needs {pages_needed} KV pages "
                      f"({size / 2**20:.1f} MiB) but the pool holds "
                      f"{self.engines[0].num_pool_pages}; raise --kv_pages to at least "
                      f"{pages_needed} or lower --max_new_tokens")

  def _build(self, need: int) -> None:
    """One engine per replica for requests of up to `need` tokens, its memory checked."""
    ecfg, ps = _engine_config(self.opts), self.opts.page_size
    meshes = [r.mesh for r in self.replicas]
    try:
      engines = []
      for rt in self.runtimes:
        params = placement.on_replica(self.params, rt.mesh, meshes)
        draft = None if self.proposer is None else self.proposer.draft_from_target(params)
        if draft is None:
          draft = placement.replicated(self.draft_params, rt.mesh)
        engines.append(Engine(self.cfg, params, ecfg, need, rt, self.proposer,
                              self.opts.acceptance, self.opts.speculation, draft))
    except ValueError as e:  # e.g. a tree larger than the model's sliding window
      raise UserError(f"--speculative={self.opts.speculative} (--tree / "
                      f"--num_draft_tokens): {e}") from None
    for eng in engines:  # the pool, and the proposer's state (a draft model's pages)
      drafting = () if self.proposer is None else eng.drafting
      placement.check_memory(
          f"--kv_pages: the KV pool ({eng.num_pool_pages} pages of {ps} tokens"
          + ("" if self.proposer is None else ", with the proposer's state"),
          eng.pool_bytes() + device_bytes(drafting), device_bytes((eng.k, eng.v, drafting)),
          (eng.params, eng.draft_params), eng.runtime.mesh,
          "lower --kv_pages or --batch_size")
    self.engines, self.max_len = engines, need

  @property
  def expected_compilations(self) -> int:
    return sum(e.max_shapes for e in self.engines)

  def reset_prefix_cache(self) -> None:
    for eng in self.engines:
      eng.reset_prefix_cache()

  def run(self, requests: list[Request], deliver: Deliver, should_stop: StopCheck,
          cancel: threading.Event | None = None) -> dict:
    """cancel: once set, every replica stops after its dispatch in flight is read (raising
    `Cancelled`)."""
    rows = _rows(requests)
    cancel = threading.Event() if cancel is None else cancel
    ereqs = [EngineRequest(uid, req.prompt_ids, req.max_new_tokens,
                           np.asarray(jax.random.key_data(sample_key(req.seed, req.id, k))),
                           req.temperature, req.top_k, req.top_p, req.min_p)
             for uid, (req, k) in enumerate(rows)]
    if self.opts.order == "prefix":
      ereqs.sort(key=lambda e: (e.prompt_ids, e.uid))
    for eng in self.engines:  # this call's numbers (compiled steps are kept)
      eng.stats = EngineStats(pool_pages=eng.num_pool_pages)
      if self.proposer is not None:
        eng.policy.start_call()
    on_result = lambda res: deliver(*rows[res.uid], res.tokens, res.finished_by_eos)
    stop = lambda uid, tokens: should_stop(rows[uid][0], tokens)

    def cancelled(stats):
      if cancel.is_set():
        raise Cancelled()

    shares = placement.split_by_tokens(ereqs, self.total)
    try:
      placement.in_threads(
          lambda eng, share, leads: eng.run(share, on_result if leads else lambda res: None,
                                            stop, on_step=cancelled),
          [(e, shares[r.index], r.leads) for e, r in zip(self.engines, self.replicas)], cancel)
    except BaseException:  # stopped mid-step: the next call builds its engines afresh
      self.engines, self.max_len = [], 0
      raise
    st = [e.stats for e in self.engines]
    mixed = max(s.mixed_busy_s for s in st)
    pure = max(s.decode_busy_s for s in st)
    return {
        "busy_s": max(s.busy_s for s in st),
        "prefill_tokens": sum(s.prefill_tokens for s in st),
        "prefill_saved": sum(s.prefill_tokens_saved for s in st),
        "prefill_tps": round(sum(s.lane_tokens for s in st) / mixed, 2) if mixed else 0.0,
        "decode_tps": round(sum(s.pure_decode_tokens for s in st) / pure, 2) if pure else 0.0,
        "occupancy": round(float(np.mean([s.mean_occupancy for s in st])), 4),
        "peak_pages": max(s.peak_pages for s in st), "pool_pages": st[0].pool_pages,
        "steps": sum(s.steps for s in st), "dispatches": sum(s.dispatches for s in st),
        "decode_tokens_discarded": sum(s.decode_tokens_discarded for s in st),
        "compile_s": max(s.compile_s for s in st),  # (replicas compile at once)
        "compilations": sum(s.compilations for s in st), "replicas": len(self.engines),
        "expected_compilations": self.expected_compilations,
    } | ({} if self.proposer is None else self._speculation(st))

  def _speculation(self, st: list[EngineStats]) -> dict:
    """The speculative metrics (`metrics.SPECULATIVE_KEYS`) of this call; "batches" are the
    engine's dispatches."""
    depth = self.proposer.max_depth + 1
    hist = sum(np.pad(s.accepted_hist, (0, depth - len(s.accepted_hist))) for s in st)
    verifications = sum(s.row_steps for s in st)
    per = lambda total: round(total / verifications, 4) if verifications else 0.0
    reached = hist[::-1].cumsum()[::-1]  # verifications accepting d drafts or more
    return {
        "mean_accepted_tokens": per(sum(s.decode_tokens for s in st)),
        "accepted_length_histogram": [int(x) for x in hist],
        # P(the draft at depth d accepted | the one at depth d - 1 was), d = 1..
        "per_depth_acceptance": [round(float(reached[d] / reached[d - 1]), 4)
                                 if reached[d - 1] else 0.0 for d in range(1, depth)],
        "verify_steps": verifications, "host_syncs": sum(s.dispatches for s in st),
        "nodes_per_verification": round(per(sum(s.verified_nodes for s in st)), 3),
    } | policy_metrics([e.policy for e in self.engines], self.engines[0].cfg.num_slots)
