"""Token sampling with per-row parameters, so one compiled step serves any mix of requests.

B batch, V vocab. Filters apply in Hugging Face's order: temperature, top-k, top-p, min-p.
A row with temperature 0 is greedy. Top-k 0, top-p 1 and min-p 0 disable their filter. A call
whose rows are all greedy runs steps compiled without the sampling machinery (`jit_variants`).
Each request's key derives from (run seed, request id, sample index) (`sample_key`) and is
folded with the token index, so its samples never depend on what it runs beside.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


def request_key(seed: int, request_id: Any) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(request_id).encode()) & 0x7FFFFFFF)


def sample_key(seed: int, request_id: Any, sample: int = 0) -> jax.Array:
  """The key of a request's `sample`-th completion; sample 0 is what a one-sample run draws."""
  key = request_key(seed, request_id)
  return key if sample == 0 else jax.random.fold_in(key, sample)


@struct.dataclass
class SamplingParams:
  temperature: jax.Array  # (B,) float32
  top_k: jax.Array  # (B,) int32
  top_p: jax.Array  # (B,) float32
  min_p: jax.Array  # (B,) float32

  @classmethod
  def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "SamplingParams":
    full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (batch,))
    return cls(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
               full(min_p, jnp.float32))


def argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (int32), the same index (the first maximum, or the first NaN),
  as a max and a min-index reduction: on CPU about 2x faster than argmax's single (value,
  index) reduction over a vocabulary."""
  v = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  hit = (x == top) | jnp.isnan(x)
  return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _scaled(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """(B,V) logits in float32 over each row's temperature (greedy rows: unscaled)."""
  return logits.astype(jnp.float32) / jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]


def filtered_sorted(logits: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """(B,V) logits -> (masked log-probs in descending order, the token of each sorted slot).

  Every filter keeps a prefix of the sorted order, so the result is exact (no tie ambiguity
  when mapping a threshold back to the vocabulary).
  """
  v = logits.shape[-1]
  scaled = _scaled(logits, sp)
  order = jnp.argsort(-scaled, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(v)[None, :]
  keep = (sp.top_k[:, None] <= 0) | (rank < sp.top_k[:, None])
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  cum_before = jnp.cumsum(probs, axis=-1) - probs
  keep &= (cum_before < sp.top_p[:, None]) | (rank == 0)
  keep &= probs >= sp.min_p[:, None] * probs[:, :1]
  masked = jnp.where(keep, sorted_logits, -jnp.inf)
  return jax.nn.log_softmax(masked, axis=-1), order


def target_probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """(B,V): the distribution sampling draws from (one-hot argmax for greedy rows).

  The tokens `filtered_sorted` keeps are a prefix of the stable descending order, so in the
  vocabulary's own order they are those above the prefix's last logit and those equal to it at
  or before its token: the probabilities are taken there, with no scatter back from the sorted
  order (on a TPU, a scatter of B*T*V indices laid out with the tree's nodes minor, padded 25x:
  ~1 GiB of a Llama-3-8B verification's temporaries)."""
  logp, order = filtered_sorted(logits, sp)
  kept = jnp.sum(logp > -jnp.inf, axis=-1, keepdims=True)  # >= 1: the top token is kept
  scaled = _scaled(logits, sp)
  last = jnp.take_along_axis(order, kept - 1, axis=-1)  # the prefix's last token
  edge = jnp.take_along_axis(scaled, last, axis=-1)
  token = jnp.arange(logits.shape[-1], dtype=order.dtype)[None, :]
  keep = (scaled > edge) | ((scaled == edge) & (token <= last))
  probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
  greedy = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=probs.dtype)
  return jnp.where((sp.temperature > 0)[:, None], probs, greedy)


def distribution(logits: jax.Array, sp: SamplingParams, greedy_only: bool = False) -> jax.Array:
  """target_probs for (..., V) logits over batch rows (B, ...); skips the vocabulary sort when
  every row is greedy (greedy_only: known to be, compiled without it)."""
  def full(l):
    flat = l.reshape(l.shape[0], -1, l.shape[-1])
    out = jax.vmap(lambda x: target_probs(x, sp), in_axes=1, out_axes=1)(flat)
    return out.reshape(l.shape)

  greedy = lambda l: jax.nn.one_hot(argmax(l), l.shape[-1], dtype=jnp.float32)
  if greedy_only:
    return greedy(logits)
  return jax.lax.cond(jnp.any(sp.temperature > 0), full, greedy, logits)


def sample(logits: jax.Array, sp: SamplingParams, keys: jax.Array,
           greedy_only: bool = False) -> jax.Array:
  """(B,V) logits, (B,) keys -> (B,) int32 tokens. greedy_only: every row is known to be greedy
  (compiled without the vocabulary sort)."""
  greedy = argmax(logits)
  if greedy_only:
    return greedy

  def draw(_):
    logp, order = filtered_sorted(logits, sp)
    slot = jax.vmap(jax.random.categorical)(keys, logp)
    drawn = jnp.take_along_axis(order, slot[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(sp.temperature > 0, drawn, greedy)

  # The vocabulary sort only runs when some row samples.
  return jax.lax.cond(jnp.any(sp.temperature > 0), draw, lambda _: greedy, None)


def all_greedy(requests) -> bool:
  """Whether every request (anything with a `temperature`) is greedy: its steps may run the
  `greedy_only` variant of `jit_variants`."""
  return not any(r.temperature > 0 for r in requests)


def jit_variants(step, donate: tuple[int, ...] = ()) -> list:
  """`step` (taking `greedy_only`) jitted twice: [False] for calls with sampled rows, [True] for
  calls whose rows are all greedy (compiled without the vocabulary sort: on the embedded model
  a quarter of a plain step's compilation, two fifths of a speculative one's)."""
  return [jax.jit(partial(step, greedy_only=g), donate_argnums=donate) for g in (False, True)]


# run seeds lie below this: a key keeps 32 bits of one (without x64), so larger seeds would
# repeat smaller ones' samples
SEED_LIMIT = 2**32


def validate(temperature: float, top_k: int, top_p: float, min_p: float) -> list[str]:
  """Human-readable problems with one request's sampling values (empty when valid)."""
  problems = []
  if not 0 <= temperature < float("inf"):
    problems.append(f"temperature must be finite and >= 0, got {temperature}")
  if top_k < 0:
    problems.append(f"top_k must be >= 0 (0 disables), got {top_k}")
  if not 0 < top_p <= 1:
    problems.append(f"top_p must be in (0, 1], got {top_p}")
  if not 0 <= min_p <= 1:
    problems.append(f"min_p must be in [0, 1], got {min_p}")
  return problems
