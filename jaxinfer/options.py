"""How a model is served: the options of `jaxinfer.LLM` and `jaxinfer generate`, with the same
names as the CLI flags (`--batch_size` is `batch_size=`), checked before anything loads."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxinfer import checkpoint
from jaxinfer.config import DTYPES
from jaxinfer.errors import UserError
from jaxinfer.sharding import parse_mesh
from jaxinfer.sparsity import parse as parse_sparsity
from jaxinfer.speculative import registry


# what prefilling a prompt whole in one lane (a dynamic sparsity pattern) leaves unread
CHUNK_OPTIONS = ("chunk_size", "chunk_lanes")


def ignored_chunk_option(sparsity, job) -> str | None:
  """The refusal of a chunk option `job` (serving or compile options) sets that a dynamic
  `sparsity` would ignore, each prompt being prefilled whole; None where there is none."""
  if sparsity.dynamic:
    for f in dataclasses.fields(job):
      if f.name in CHUNK_OPTIONS and getattr(job, f.name) != f.default:
        return (f"--{f.name}: under --sparsity={sparsity} each prompt is prefilled whole, in "
                f"one lane of its own")
  return None


def plain(value):
  """An option's value as the options hold it: a path object (a directory option) as its string,
  a NumPy scalar as the Python number it holds; anything else as is."""
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  return value.item() if isinstance(value, np.generic) else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeOptions:
  model: str = checkpoint.EMBEDDED
  dtype: str = "auto"
  # data:R,fsdp:F,model:M over every process's devices: R replicas of F x M devices each, dealt
  # to the processes (a replica may span several: each of them drives it in step)
  mesh: str = ""
  batch_size: int = 8  # slots per replica (static: requests admitted at a time)
  implementation: str = "xla"
  sparsity: str = "dense"
  max_seq_len: int | None = None  # overrides the model's context (e.g. long prompts + sinks)
  # continuous: a slot refilled as soon as its request ends; static: batch_size requests at a
  # time, the next once all have ended (both the paged engine)
  scheduler: str = "continuous"
  # continuous: prefix (the whole input sorted by prompt, so sharers of a prefix run together:
  # global prefix sharing) or arrival (input order, prefixes shared through the pool's LRU cache)
  order: str = "prefix"
  chunk_size: int = 32
  chunk_lanes: int = 4
  decode_steps: int = 8
  page_size: int = 16
  kv_pages: int | None = None
  kv_cache_dtype: str | None = None  # int8: the engine's KV pages in int8, scales beside them
  cache_dir: str | None = None
  progress: bool = True
  # none | ngram | lookahead | recycling | draft | layerskip | medusa | hydra | eagle
  speculative: str = "none"
  draft_model: str | None = None
  draft_heads: str | None = None  # medusa, hydra, eagle: a directory written by train-draft
  num_draft_tokens: int = registry.DEFAULT_DRAFT_TOKENS
  tree: str = registry.DEFAULT_TREE
  draft_layers: str | None = None  # layerskip: layers the draft keeps
  draft_fallback: float = 0.0  # draft, layerskip: Big-Little fallback confidence (0: off)
  acceptance: str = "exact"  # exact | typical
  # auto: per dispatch the proposer's tree, a smaller one or plain decoding, by measured speed;
  # always: the proposer's tree every dispatch (sampled outputs then never depend on timing)
  speculation: str = "auto"

  @classmethod
  def of(cls, options) -> "ServeOptions":
    """The serving options of any object with these attributes (a GenerateJob)."""
    return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})

  @classmethod
  def from_keywords(cls, model: str, keywords: dict) -> "ServeOptions":
    """ServeOptions(model=model, **keywords), naming an unknown keyword and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keywords) - known)
    if unknown:
      raise UserError(f"unknown option(s) {unknown}; options are {sorted(known - {'model'})}")
    return cls(model=plain(model), **{k: plain(v) for k, v in keywords.items()})

  def check_types(self) -> None:
    """Each option of its declared type (an int where an int is, ...), named if not (those of
    a subclass too, such as the job's; options of other types are checked where they are made)."""
    basic = {"str", "bool", "int", "float", "None"}
    for f in dataclasses.fields(self):
      value, kinds = getattr(self, f.name), f.type.replace(" ", "").split("|")
      if not basic.issuperset(kinds):
        continue
      if value is None and "None" in kinds:
        continue
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not any({"str": isinstance(value, str), "bool": isinstance(value, bool),
                  "int": number and isinstance(value, int), "float": number}.get(k, False)
                 for k in kinds):
        raise UserError(f"--{f.name}: expected {' or '.join(kinds)}, got {value!r}")

  def _given(self, names: tuple[str, ...]) -> list[str]:
    """Of `names`, the options set to other than their defaults."""
    return [f.name for f in dataclasses.fields(ServeOptions)
            if f.name in names and getattr(self, f.name) != f.default]

  def validate(self) -> None:
    """Everything checkable before loading a model, with the flag named in the message."""
    self.check_types()
    if self.dtype != "auto" and self.dtype not in DTYPES:
      raise UserError(f"--dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
    for flag in ("batch_size", "chunk_size", "chunk_lanes", "decode_steps", "page_size"):
      if getattr(self, flag) < 1:
        raise UserError(f"--{flag}: must be >= 1, got {getattr(self, flag)}")
    if self.kv_pages is not None and self.kv_pages < 1:
      raise UserError(f"--kv_pages: must be >= 1, got {self.kv_pages}")
    if self.kv_cache_dtype is not None:
      from jaxinfer.kv_quant import check_kv_cache_dtype
      try:
        check_kv_cache_dtype(self.kv_cache_dtype, self.page_size)
      except ValueError as e:
        raise UserError(f"--{e}") from None
    if self.max_seq_len is not None and self.max_seq_len < 2:
      raise UserError(f"--max_seq_len: must be >= 2, got {self.max_seq_len}")
    if self.scheduler not in ("continuous", "static"):
      raise UserError(f"--scheduler: expected continuous or static, got {self.scheduler!r}")
    if self.order not in ("prefix", "arrival"):
      raise UserError(f"--order: expected prefix or arrival, got {self.order!r}")
    try:
      parse_mesh(self.mesh)
      sparsity = parse_sparsity(self.sparsity)
    except ValueError as e:
      raise UserError(f"--{e}") from None
    if why := ignored_chunk_option(sparsity, self):
      raise UserError(why)
    registry.check(self)
    if not self.speculating:  # (they would be ignored)
      for name in self._given(registry.SPECULATIVE_OPTIONS):
        raise UserError(f"--{name}: applies to speculative decoding; pass --speculative too")
    if self.speculative != "none":
      if sparsity.dynamic:
        raise UserError(f"--sparsity: {sparsity} is not combinable with --speculative (its "
                        f"pattern needs whole-prompt prefill); sinks_window is")
      if self.acceptance not in ("exact", "typical"):
        raise UserError(f"--acceptance: expected exact or typical, got {self.acceptance!r}")
      if self.speculation not in ("auto", "always"):
        raise UserError(f"--speculation: expected auto or always, got {self.speculation!r}")
    from jaxinfer import attention
    if self.implementation not in attention.IMPLEMENTATIONS:
      raise UserError(f"--implementation: expected one of {sorted(attention.IMPLEMENTATIONS)}, "
                      f"got {self.implementation!r}")

  @property
  def speculating(self) -> bool:
    return self.speculative != "none"
