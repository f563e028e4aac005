"""The one interface every draft proposer implements, and the data it exchanges with the paged
engine's speculative steps (`jaxinfer.engine.speculate`).

A proposer is a frozen dataclass: its fields are configuration, static under jit. Its methods
are pure functions of (weights, its state, the step's inputs), traced inside the engine's jitted
steps. Its state is a pytree with one row per slot (B rows), or, for a proposer with
`shared_state`, one value every row reads and refreshes; a replica holds it whole on each of its
devices, as it holds the draft weights. They call:

  init_state  the state of B free slots (`init_pages` instead, for `paged_layers`)
  admit       rows admitted into slots: their state after the prompt's prefill
  lanes       the tokens of the engine's prefill lanes and plain steps, and the target's
              hidden states over them
  draft       every step: a draft tree of `tree_size` nodes per row
  flush       before plain steps: what the state must still read, written
  observe     after each verification: what the target said about the tree

What differs between proposers is declared, not inferred from their type: the capabilities
below (class attributes or properties) are what callers read.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.kv_cache import KVCache, PagePools
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams
from jaxinfer.sparsity import Sparsity


class Weights(NamedTuple):
  """The parameters a proposer reads: its own (a draft model, heads or a draft layer; None for
  the lookups) and the target's (a draft layer shares its embedding and output projection)."""

  draft: Any
  target: Any


@struct.dataclass
class Context:
  """What a proposer sees of the decode state (device arrays)."""

  history: jax.Array  # (B, S) every committed token by position, the root at `length`
  length: jax.Array  # (B,) position of the root (the last committed, not yet cached, token)
  sampling: SamplingParams
  keys: jax.Array  # (B,) this step's draft keys
  # (B, M) each row's page table, for a proposer with `paged_layers` (-1 for a row not live:
  # nothing of it is written); None for the others
  pages: jax.Array | None = None
  # every row is known to be greedy: drafts drawn without the sampling machinery (static: the
  # step compiled for runs of greedy requests, `sampling.jit_variants`)
  greedy_only: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class Draft:
  tokens: jax.Array  # (B, T); tokens[:, 0] is the root
  parents: jax.Array  # (T,) or (B, T)
  # (B, T, V): the distribution node t's children were drawn from, without replacement (each
  # from q with the earlier siblings' tokens removed); None: deterministic drafts
  q: jax.Array | None
  # (B,) how deep each row's drafts are worth trying: nodes deeper are not tried, and a row at 0
  # decodes plainly (None: every node). It may depend on the rows' tokens, never on the draw of
  # the verification, so acceptance stays exact.
  limit: jax.Array | None = None


@struct.dataclass
class Prompt:
  """k rows being admitted into slots."""

  hidden: jax.Array | None  # (k, w, D) the target's hidden states over each prompt (None: the
  # engine's admission, whose lanes computed them)
  last: jax.Array  # (k, D) the target's hidden state at each prompt's last token
  history: jax.Array  # (k, W) each prompt's tokens by position
  prompt_len: jax.Array  # (k,)
  first: jax.Array  # (k,) each row's first generated token (the engine's admission: 0)
  slots: jax.Array  # (k,) the slots the rows go to; past the end: a padding row
  max_len: int = struct.field(pytree_node=False, default=0)  # positions per slot
  # (k, M) the page tables of rows whose tokens so far a `paged_layers` proposer that does not
  # `layers_read_hidden` writes through them (-1: a row not caught up); None: none is
  pages: jax.Array | None = None


@struct.dataclass
class Verified:
  """What one verification said about each row's draft tree."""

  tokens: jax.Array  # (B, T) the tree's tokens, the root first
  hidden: jax.Array  # (B, T, D) the target's hidden states at the tree's nodes
  logits: jax.Array  # (B, T, V) the target's logits there
  path: jax.Array  # (B, T) the accepted path's nodes, the root first
  num_accepted: jax.Array  # (B,) accepted drafts
  next_token: jax.Array  # (B,) the token after the accepted path (the next root)
  length: jax.Array  # (B,) the root's position before this step
  live: jax.Array  # (B,) rows that were generating in this step


class Proposer(abc.ABC):
  """A draft proposer. Subclasses are frozen dataclasses with a `name` field."""

  name: str

  # Capabilities, read instead of the proposer's type.
  # It drafts with weights of its own (draft_params): a draft model, heads or a draft layer.
  needs_draft_params: bool = False
  # One state for every row (Token Recycling's adjacency matrix of likely successors), refreshed
  # by every row's verification and carried from batch to batch.
  shared_state: bool = False
  # It drafts from the target's hidden state at each row's last accepted token: in the engine a
  # row drafts nothing in its first verification, which computes that state (the engine keeps
  # no hidden state of a prompt's last token, which its lanes leave to the row's first step).
  drafts_from_hidden: bool = False
  # In the engine, the K/V of draft layers of its own (a draft model's, EAGLE's layer over the
  # target's features, Hydra++'s prefix layer) live in the engine's page layout (`init_pages`,
  # a `PagePools` in its state): written from the prefill lanes' tokens or hidden states
  # (`lanes`) and by drafting through the rows' page tables (`Context.pages`), so a prompt page
  # shared by reference carries them too. Their K/V at position p depend on the tokens up to
  # p + `feature_lookahead` (EAGLE's pair at p holds token p + 1): the engine shares a page only
  # between prompts that agree that far.
  paged_layers: bool = False
  feature_lookahead: int = 0
  # Its layers in the pages read the target's hidden states (EAGLE's, Hydra++'s); else tokens
  # alone (a draft model's): the engine then writes a step's lanes before the step's drafts,
  # which read them (a row may verify in the step that prefills its prompt's last lane), and a
  # row whose context the plain steps computed without feeding them is caught up from its
  # tokens when it turns to trees (`Prompt.pages`) rather than holding trees back.
  layers_read_hidden: bool = True
  # The target's runtime (`attend_as`), for a draft layer or model of its own: it runs on the
  # target's mesh with the target's attention, its activations and state whole on each device
  # (`draft_runtime`), and its logits over the target's output projection are taken as the
  # target's are.
  runtime: Runtime = Runtime()

  @property
  @abc.abstractmethod
  def tree_size(self) -> int:
    """T: the nodes of a draft tree, the root included (tokens verified per row and step)."""

  @property
  @abc.abstractmethod
  def max_depth(self) -> int:
    """The deepest a draft can reach: accepted drafts per step are at most this."""

  @property
  def is_chain(self) -> bool:
    """Every tree is one chain (its accepted path's K/V already sit where they belong)."""
    return self.max_depth == self.tree_size - 1

  def validate(self, cfg, draft_params) -> None:
    """Raises ValueError if this proposer cannot draft for target `cfg` with `draft_params`."""
    if self.needs_draft_params and draft_params is None:
      raise ValueError(f"speculative decoding: the {self.name} proposer needs draft_params")

  def attend_as(self, runtime: Runtime) -> "Proposer":
    """This proposer with a draft layer or model of its own attending as the target does (its
    implementation and pattern) on the target's mesh, its activations and state whole on each
    device: the kernels the target runs (a TPU's paged decode kernel rather than XLA gathering
    each row's whole context) under shard_map with replicated arguments."""
    if "runtime" not in {f.name for f in dataclasses.fields(self)}:
      return self  # (no draft layer or model of its own)
    return dataclasses.replace(self, runtime=runtime)

  @property
  def draft_runtime(self) -> Runtime:
    """What a draft layer or model of its own runs with (`attend_as`; draft weights are whole
    on each of a replica's devices, or the target's own: `draft_from_target`)."""
    return self.runtime.whole()

  def draft_from_target(self, params) -> Any:
    """Draft weights that are the target's own arrays, taken from its `params` as a replica
    holds them (split as the target's, nothing copied); None: the draft's weights are its own
    (placed whole on each of a replica's devices)."""
    del params
    return None

  def shrink(self) -> "Proposer | None":
    """The same proposer drafting about half as many tokens per step (None: it drafts one token
    already, or cannot shrink)."""
    return None

  def init_shared(self, cfg) -> Any:
    """The first `shared_state` of a proposer that has one, for target `cfg` (else None)."""
    del cfg
    return None

  def init_state(self, weights: Weights, cfg, num_rows: int, max_len: int, shared=None) -> Any:
    """The state of `num_rows` free slots of `max_len` positions: zeros shaped as `row_state`
    makes them (a free slot is done: nothing reads them); `shared` for `shared_state`."""
    w = 16
    spec = jax.ShapeDtypeStruct
    i32 = lambda *shape: spec(shape, jnp.int32)
    prompt = Prompt(spec((num_rows, w, cfg.embed), cfg.jnp_dtype),
                    spec((num_rows, cfg.embed), cfg.jnp_dtype), i32(num_rows, w), i32(num_rows),
                    i32(num_rows), i32(num_rows), max_len=max_len)
    shapes = jax.eval_shape(lambda wt, p: self.row_state(wt, None, p), weights, prompt)
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

  def init_pages(self, weights: Weights, cfg, num_rows: int, num_pages: int,
                 page_size: int) -> Any:
    """A `paged_layers` proposer's state in the engine: `num_rows` free slots, its layers'
    K/V in `num_pages` pages of `page_size` positions."""
    raise NotImplementedError(f"the {self.name} proposer keeps no pages")

  def lanes(self, weights: Weights, state, tokens, hidden, next_tokens, positions,
            pages) -> Any:
    """A `paged_layers` proposer's state after the engine's prefill lanes or plain steps: their
    `tokens` (G, Q) at `positions` (G, Q) (out of range: padding), the target's hidden states
    there (G, Q, D), the token after each (G, Q), each lane's (or row's) page table `pages`
    (G, M)."""
    del weights, tokens, hidden, next_tokens, positions, pages
    return state

  def row_state(self, weights: Weights, state, prompt: Prompt) -> Any:
    """The state of the rows `prompt` admits, k rows (`state`: the running one)."""
    del weights, state, prompt
    return ()

  def admit(self, weights: Weights, state, prompt: Prompt) -> Any:
    """`state` with the admitted rows' (`prompt.slots`) reset to their `row_state`."""
    return put_rows(state, self.row_state(weights, state, prompt), prompt.slots)

  @abc.abstractmethod
  def draft(self, weights: Weights, state, ctx: Context) -> tuple[Any, Draft]:
    """(the state after drafting, each row's draft tree). Deterministic drafts (q None) are
    distinct top-k tokens per parent; sampled ones come with the distribution q they were
    drawn from."""

  def flush(self, weights: Weights, state, pages) -> Any:
    """A `paged_layers` proposer's state with every row's pending pairs (those its last
    verification left for the next draft to read) written through its page table in `pages`
    (B, M) (-1: nothing written), before the engine's plain steps, which feed the layer only what
    they compute themselves (`lanes`)."""
    del weights, pages
    return state

  def observe(self, weights: Weights, state, verified: Verified) -> Any:
    """The state after a verification (a row that was not `live` keeps its own)."""
    del weights, verified
    return state


def check_fits(proposer: Proposer, cfg, sparsity: Sparsity) -> None:
  """Raises ValueError when the proposer's trees cannot be verified under the target's attention
  pattern: a dynamic sparsity pattern, or a tree larger than a sliding window."""
  if sparsity.dynamic:
    raise ValueError(f"speculative decoding: {sparsity} sparsity needs whole-prompt prefill "
                     f"(use sinks_window or dense)")
  for window, what in ((cfg.min_window(), "the model's sliding window"),
                       (sparsity.window, f"the {sparsity} window")):
    if window is not None and proposer.tree_size > window:
      raise ValueError(f"speculative decoding: the draft tree ({proposer.tree_size} tokens) "
                       f"must fit {what} ({window})")


def put_rows(old, new, slots):
  """old's rows `slots` := new's rows, leaf by leaf (rows are axis 1 of a KVCache's buffers,
  axis 0 elsewhere; page pools are no rows: new's are taken, the running ones or those written
  through the rows' tables); slots past the end are dropped."""
  def put(o, n, axis=0):
    n = n if n.dtype == o.dtype else n.astype(o.dtype)
    return o.at[(slice(None),) * axis + (slots,)].set(n, mode="drop")

  def leaf(o, n):
    if isinstance(o, PagePools):
      return n
    if isinstance(o, KVCache):
      return jax.tree_util.tree_map(lambda a, b: put(a, b, 1), o, n)
    return put(o, n)

  return jax.tree_util.tree_map(leaf, old, new, is_leaf=_caches)


def _caches(x) -> bool:
  return isinstance(x, (KVCache, PagePools))
