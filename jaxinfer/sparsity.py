"""Attention sparsity for long prompts, chosen at run time (`--sparsity`).

  dense                          causal attention (the model's own sliding window, if any)
  sinks_window:SINKS,WINDOW      StreamingLLM / LM-Infinite Λ-shape: the first SINKS keys plus a
                                 WINDOW of recent keys, in prefill and in decode
  block_topk:TOPK[,BLOCK]        MInference block-sparse: per q block, the TOPK kv blocks with the
                                 highest pooled q·k (plus the first and the diagonal block);
                                 prefill only, decode stays dense
  vertical_slash:V,S[,BLOCK]     MInference vertical-slash at block granularity: the V most
                                 attended key columns and S most attended diagonals, estimated from
                                 the last 64 queries; prefill only

BLOCK (default 128) is a power of two: each prompt runs in a lane a power of two wide.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["dense", "sinks_window", "block_topk", "vertical_slash"]


@dataclasses.dataclass(frozen=True)
class Sparsity:
  kind: Kind = "dense"
  num_sinks: int = 0
  window: int | None = None
  top_k: int = 8
  num_vertical: int = 64
  num_slash: int = 64
  block: int = 128
  last_q: int = 64

  @property
  def dynamic(self) -> bool:
    return self.kind in ("block_topk", "vertical_slash")

  def __str__(self) -> str:
    if self.kind == "sinks_window":
      return f"sinks_window:{self.num_sinks},{self.window}"
    if self.kind == "block_topk":
      return f"block_topk:{self.top_k},{self.block}"
    if self.kind == "vertical_slash":
      return f"vertical_slash:{self.num_vertical},{self.num_slash},{self.block}"
    return "dense"


DENSE = Sparsity()


def _whole_lanes(sparsity: Sparsity) -> Sparsity:
  """A dynamic pattern applies to a prompt prefilled whole, in a lane a power of two wide: it
  must be a whole number of blocks (BLOCK 48 never fitted one, and every prompt ran dense)."""
  if sparsity.block & (sparsity.block - 1):
    raise ValueError(f"sparsity: {sparsity}: BLOCK must be a power of two (a prompt's lane is "
                     f"one, and must hold whole blocks), got {sparsity.block}")
  return sparsity


def window_conflict(sparsity: Sparsity, cfg) -> str | None:
  """Why `sparsity` cannot apply to a model of config `cfg` (None: it can): a model with a
  sliding window already has its own pattern, which a sparsity would replace."""
  if sparsity.kind != "dense" and cfg.min_window() is not None:
    return f"already uses a sliding window ({cfg.sliding_window}); {sparsity} would replace it"
  return None


def parse(spec: str) -> Sparsity:
  """Parses the `--sparsity` syntax above; raises ValueError naming what is wrong."""
  name, _, args = (spec or "dense").strip().partition(":")
  try:
    values = [int(a) for a in args.split(",")] if args else []
  except ValueError:
    raise ValueError(f"sparsity: arguments must be integers, got {spec!r}") from None
  if any(v < 1 for v in values):
    raise ValueError(f"sparsity: arguments must be positive, got {spec!r}")
  if name == "dense" and not values:
    return DENSE
  if name == "sinks_window" and len(values) == 2:
    return Sparsity("sinks_window", num_sinks=values[0], window=values[1])
  if name == "block_topk" and len(values) in (1, 2):
    return _whole_lanes(Sparsity("block_topk", top_k=values[0],
                                 block=values[1] if len(values) > 1 else 128))
  if name == "vertical_slash" and len(values) in (2, 3):
    return _whole_lanes(Sparsity("vertical_slash", num_vertical=values[0], num_slash=values[1],
                                 block=values[2] if len(values) > 2 else 128))
  raise ValueError(f"sparsity: expected dense, sinks_window:SINKS,WINDOW, block_topk:TOPK[,BLOCK] "
                   f"or vertical_slash:V,S[,BLOCK]; got {spec!r}")
