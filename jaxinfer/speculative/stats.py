"""What speculative generation measured: per-batch counts and times, the accepted-length
histogram, the speeds of each tree size and of plain decoding, and the draft / verify split."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


# the counters and times that add up over batches and replicas
_COUNTS = ("verify_steps", "emitted", "prefill_s", "decode_s", "wall_s", "plain_measured_tokens",
           "plain_measured_s", "compile_s", "compilations", "decode_tokens", "prefill_tokens",
           "steps", "host_syncs", "row_slots", "spec_batches", "plain_batches")


@dataclasses.dataclass
class SpecStats:
  verify_steps: int = 0  # row-verifications (one per live row per step)
  emitted: int = 0
  accepted_hist: np.ndarray | None = None
  prefill_s: float = 0.0
  decode_s: float = 0.0
  wall_s: float = 0.0  # batches' wall time, host work included, compilation not
  plain_measured_tokens: int = 0  # ... of the plain batches measured (not compiling)
  plain_measured_s: float = 0.0
  compile_s: float = 0.0
  compilations: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0  # computed
  steps: int = 0  # batched verification steps
  host_syncs: int = 0  # host round trips while decoding
  row_slots: int = 0  # steps x rows
  spec_batches: int = 0  # batches that speculated
  plain_batches: int = 0  # ... that decoded plainly (policy "auto")
  # measured generation speeds (moving averages): output tokens after each row's first per
  # second of a batch's wall time (host work included, compilation not)
  plain_tps: float | None = None
  full_tree: int = 0  # the proposer's tree size (tokens verified per row and step)
  tree_tps: dict = dataclasses.field(default_factory=dict)  # tree size -> measured tokens/s
  tree_batches: dict = dataclasses.field(default_factory=dict)  # tree size -> batches
  draft_ms_per_step: float | None = None  # drafting alone, timed once (after compilation)
  step_ms: float | None = None  # a whole step (draft + verify + accept + commit), same batch
  draft_share: float | None = None
  split_tree: int | None = None  # the tree size the split was measured with

  @classmethod
  def merge(cls, stats: Sequence["SpecStats"]) -> "SpecStats":
    """Replicas' stats as one: counts and times summed, measured speeds averaged."""
    if len(stats) == 1:
      return stats[0]
    total = lambda f: sum(getattr(s, f) for s in stats)
    mean = lambda xs: float(np.mean(xs)) if xs else None
    sizes = {n for s in stats for n in s.tree_batches}
    split = next((s for s in stats if s.draft_share is not None), stats[0])
    return cls(
        **{f: total(f) for f in _COUNTS},
        accepted_hist=sum(s.accepted_hist for s in stats),
        plain_tps=mean([s.plain_tps for s in stats if s.plain_tps is not None]),
        full_tree=stats[0].full_tree,
        tree_tps={n: mean([s.tree_tps[n] for s in stats if n in s.tree_tps])
                  for n in sizes if any(n in s.tree_tps for s in stats)},
        tree_batches={n: sum(s.tree_batches.get(n, 0) for s in stats) for n in sizes},
        draft_ms_per_step=split.draft_ms_per_step, step_ms=split.step_ms,
        draft_share=split.draft_share, split_tree=split.split_tree)

  def since(self, before: "SpecStats") -> "SpecStats":
    """What happened after `before` (a copy of these stats taken earlier): counts and times as
    differences, measured speeds and the draft / verify split as they stand now."""
    return dataclasses.replace(
        self, **{f: getattr(self, f) - getattr(before, f) for f in _COUNTS},
        accepted_hist=self.accepted_hist - before.accepted_hist,
        tree_batches={n: b - before.tree_batches.get(n, 0) for n, b in self.tree_batches.items()
                      if b > before.tree_batches.get(n, 0)})

  @property
  def spec_tps(self) -> float | None:
    """Measured decode tokens/s of the best tree size."""
    return max(self.tree_tps.values()) if self.tree_tps else None

  @property
  def best_tree(self) -> int | None:
    return max(self.tree_tps, key=self.tree_tps.get) if self.tree_tps else None

  def job_speedup(self) -> float | None:
    """The job's generation speed (every batch it ran, exploring included, in wall time less
    compilation) over plain decoding's, measured the same way in the same job (stats `since` a
    call: that call); None when the job measured no plain batch."""
    if not self.plain_measured_s or not self.wall_s:
      return None
    plain = self.plain_measured_tokens / self.plain_measured_s
    return self.decode_tokens / self.wall_s / plain

  def decision(self) -> str:
    job = self.job_speedup()
    ratio = ("; too few batches to compare with plain decoding" if job is None else
             f"; {job:.2f}x plain decoding over the job")
    sizes = sorted(self.tree_batches, reverse=True)
    tried = f"; trees of {', '.join(map(str, sizes))} tokens tried" if len(sizes) > 1 else ""
    best = self.best_tree
    trees = (f" with {best}-token trees (shrunk from {self.full_tree})"
             if best is not None and best != self.full_tree else "")
    if not self.plain_batches:
      return "speculating throughout" + trees + tried
    slower = bool(self.spec_tps and self.plain_tps and self.spec_tps < self.plain_tps)
    if not self.spec_batches:
      return "decoded plainly throughout" + (" (speculation measured slower)" if slower else "")
    share = self.spec_batches / (self.spec_batches + self.plain_batches)
    if slower:
      return (f"speculation turned itself off ({share:.0%} of batches speculated{tried}"
              f"{ratio})")
    return f"speculating{trees} ({share:.0%} of batches{tried}{ratio})"

  @property
  def mean_accepted_tokens(self) -> float:
    """tau: tokens per target forward per row, counting the bonus token."""
    return self.emitted / self.verify_steps if self.verify_steps else 0.0

  def metrics(self) -> dict:
    return {"mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "accepted_length_histogram": [int(x) for x in self.accepted_hist],
            "per_depth_acceptance": [round(x, 4) for x in self.per_depth_acceptance()],
            "verify_steps": self.verify_steps, "host_syncs": self.host_syncs,
            "occupancy": round(self.verify_steps / self.row_slots, 4) if self.row_slots else 0.0,
            "speculation": self.decision(), "speculative_batches": self.spec_batches,
            "plain_batches": self.plain_batches,
            "tree_sizes": {str(n): {"batches": self.tree_batches[n],
                                    "tokens_per_second": (None if n not in self.tree_tps
                                                          else round(self.tree_tps[n], 1))}
                           for n in sorted(self.tree_batches, reverse=True)},
            "draft_verify_split": None if self.draft_share is None else {
                "draft_ms_per_step": round(self.draft_ms_per_step, 4),
                "verify_ms_per_step": round(self.step_ms - self.draft_ms_per_step, 4),
                "step_ms": round(self.step_ms, 4), "draft_share": round(self.draft_share, 4),
                "tree_size": self.split_tree}}

  def per_depth_acceptance(self) -> list[float]:
    """P(draft at depth d accepted | depth d - 1 accepted), d = 1..T-1."""
    h = self.accepted_hist
    reached = h[::-1].cumsum()[::-1]  # verifications with >= d accepted
    return [float(reached[d] / reached[d - 1]) if reached[d - 1] else 0.0
            for d in range(1, len(h))]


def average(old: float | None, new: float) -> float:
  """A moving average of measured speeds (the first measurement as it is)."""
  return new if old is None else 0.5 * (old + new)
