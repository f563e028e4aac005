"""What speculative generation measured: per-batch counts and times, the accepted-length
histogram and the draft / verify split (each tree size's speed and plain decoding's are the
policy's: `engine.policy`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


# the counters and times that add up over batches and replicas
_COUNTS = ("verify_steps", "emitted", "prefill_s", "decode_s", "compile_s", "compilations",
           "decode_tokens", "prefill_tokens", "steps", "host_syncs", "row_slots")


@dataclasses.dataclass
class SpecStats:
  verify_steps: int = 0  # row-verifications (one per live row per step)
  emitted: int = 0
  accepted_hist: np.ndarray | None = None
  prefill_s: float = 0.0
  decode_s: float = 0.0
  compile_s: float = 0.0
  compilations: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0  # computed
  steps: int = 0  # batched verification steps
  host_syncs: int = 0  # host round trips while decoding
  row_slots: int = 0  # steps x rows
  draft_ms_per_step: float | None = None  # drafting alone, timed once (after compilation)
  step_ms: float | None = None  # a whole step (draft + verify + accept + commit), same batch
  draft_share: float | None = None
  split_tree: int | None = None  # the tree size the split was measured with

  @classmethod
  def merge(cls, stats: Sequence["SpecStats"]) -> "SpecStats":
    """Replicas' stats as one: counts and times summed."""
    if len(stats) == 1:
      return stats[0]
    split = next((s for s in stats if s.draft_share is not None), stats[0])
    return cls(
        **{f: sum(getattr(s, f) for s in stats) for f in _COUNTS},
        accepted_hist=sum(s.accepted_hist for s in stats),
        draft_ms_per_step=split.draft_ms_per_step, step_ms=split.step_ms,
        draft_share=split.draft_share, split_tree=split.split_tree)

  def since(self, before: "SpecStats") -> "SpecStats":
    """What happened after `before` (a copy of these stats taken earlier): counts and times as
    differences, the draft / verify split as it stands now."""
    return dataclasses.replace(
        self, **{f: getattr(self, f) - getattr(before, f) for f in _COUNTS},
        accepted_hist=self.accepted_hist - before.accepted_hist)

  @property
  def mean_accepted_tokens(self) -> float:
    """tau: tokens per target forward per row, counting the bonus token."""
    return self.emitted / self.verify_steps if self.verify_steps else 0.0

  def metrics(self) -> dict:
    """The acceptance and the split (the policy's part: `policy.policy_metrics`)."""
    return {"mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "accepted_length_histogram": [int(x) for x in self.accepted_hist],
            "per_depth_acceptance": [round(x, 4) for x in self.per_depth_acceptance()],
            "verify_steps": self.verify_steps, "host_syncs": self.host_syncs,
            "occupancy": round(self.verify_steps / self.row_slots, 4) if self.row_slots else 0.0,
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
