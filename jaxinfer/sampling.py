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
  """(B,V) logits in float32 over each row's temperature, less the row's largest first (a
  temperature of 1e-37 made logits of 30 infinite, and their softmax NaN: token 0 was drawn);
  greedy rows as they are."""
  x = logits.astype(jnp.float32)
  t = sp.temperature[:, None]
  return jnp.where(t > 0, (x - jnp.max(x, axis=-1, keepdims=True)) / jnp.where(t > 0, t, 1.0), x)


def _ordered(x: jax.Array) -> jax.Array:
  """float32 -> uint32 in the same order (for NaN-free x; -inf lowest; -0.0 and 0.0 equal)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest(ok, rows: int, bits: int = 32, dtype=jnp.uint32) -> jax.Array:
  """(rows,) the largest value below 2**bits for which ok (monotone: true up to a point, then
  false; true at 0) holds, found one bit at a time."""
  def step(i, found):
    candidate = found | jnp.left_shift(jnp.asarray(1, dtype), (bits - 1 - i).astype(dtype))
    return jnp.where(ok(candidate), candidate, found)
  return jax.lax.fori_loop(0, bits, step, jnp.zeros(rows, dtype))


def _first(mask: jax.Array, m: jax.Array) -> jax.Array:
  """The first m (B,) True entries of each row of mask (B,V), in vocabulary order."""
  v = mask.shape[-1]
  token = jnp.arange(v, dtype=jnp.int32)[None, :]
  # the largest j with fewer than m entries before it: the m-th entry's index
  j = _largest(lambda j: jnp.sum(mask & (token < j[:, None]), axis=-1) < m, mask.shape[0],
               bits=v.bit_length(), dtype=jnp.int32)
  return mask & (token <= j[:, None])


def _top_k(key: jax.Array, k: jax.Array) -> jax.Array:
  """(B,V) mask of each row's k (B,) largest keys, ties taken in vocabulary order."""
  kth = _largest(lambda u: jnp.sum(key >= u[:, None], axis=-1) >= k, key.shape[0])[:, None]
  above = key > kth
  return above | _first(key == kth, k - jnp.sum(above, axis=-1))


def _top_p(key: jax.Array, probs: jax.Array, top_p: jax.Array) -> jax.Array:
  """(B,V) mask of the tokens whose probability before them in the descending order (ties in
  vocabulary order) is below top_p (B,): the smallest set reaching top_p."""
  mass_from = lambda u: jnp.sum(jnp.where(key >= u[:, None], probs, 0.0), axis=-1)
  edge = _largest(lambda u: mass_from(u) >= top_p, key.shape[0])[:, None]  # a kept token's key
  above = key > edge
  before = jnp.sum(jnp.where(above, probs, 0.0), axis=-1)
  tie = (key == edge) & (probs > 0)
  each = jnp.max(jnp.where(tie, probs, 0.0), axis=-1)  # tied tokens share one probability
  ties = jnp.ceil((top_p - before) / jnp.where(each > 0, each, 1.0)).astype(jnp.int32)
  return above | _first(tie, jnp.maximum(ties, 1))


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """(B,V): the rows' logits over their temperature, the tokens their filters drop at -inf.

  The filters keep a prefix of the stable descending order (ties in vocabulary order), found
  without sorting: each threshold by bisection over the logits' bits, so nothing but (B,V)
  reductions runs (a TPU sorted the vocabulary with the rows on its lanes: ~300 MiB of
  temporaries for 40 rows of Llama-3's). A filter no sampled row uses is skipped."""
  v = logits.shape[-1]
  scaled = _scaled(logits, sp)
  key = _ordered(scaled)
  sampled = sp.temperature > 0
  k = jnp.where((sp.top_k > 0) & sampled, jnp.minimum(sp.top_k, v), v)
  keep = jax.lax.cond(jnp.any(k < v), _top_k, lambda key, k: jnp.ones(key.shape, bool), key, k)
  probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
  top_p = jnp.where(sampled, sp.top_p, 1.0)
  keep &= jax.lax.cond(jnp.any(top_p < 1), _top_p, lambda key, *_: jnp.ones(key.shape, bool),
                       key, probs, top_p) | (top_p >= 1)[:, None]
  keep &= probs >= sp.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(keep, scaled, -jnp.inf)


def target_probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """(B,V): the distribution sampling draws from (one-hot argmax for greedy rows)."""
  probs = jax.nn.softmax(filtered_logits(logits, sp), axis=-1)
  greedy = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=probs.dtype)
  return jnp.where((sp.temperature > 0)[:, None], probs, greedy)


def distribution(logits: jax.Array, sp: SamplingParams, greedy_only: bool = False) -> jax.Array:
  """target_probs for (B, ..., V) logits over batch rows (B,); skips the filters when every row
  is greedy (greedy_only: known to be, compiled without them)."""
  def full(l):
    each = l.size // (l.shape[0] * l.shape[-1])
    rows = jax.tree.map(lambda a: jnp.repeat(a, each), sp)
    return target_probs(l.reshape(-1, l.shape[-1]), rows).reshape(l.shape)

  greedy = lambda l: jax.nn.one_hot(argmax(l), l.shape[-1], dtype=jnp.float32)
  if greedy_only:
    return greedy(logits)
  return jax.lax.cond(jnp.any(sp.temperature > 0), full, greedy, logits)


def sample(logits: jax.Array, sp: SamplingParams, keys: jax.Array,
           greedy_only: bool = False) -> jax.Array:
  """(B,V) logits, (B,) keys -> (B,) int32 tokens. greedy_only: every row is known to be greedy
  (compiled without the filters)."""
  greedy = argmax(logits)
  if greedy_only:
    return greedy

  def draw(_):
    drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, sp)).astype(jnp.int32)
    return jnp.where(sp.temperature > 0, drawn, greedy)

  # The filters only run when some row samples.
  return jax.lax.cond(jnp.any(sp.temperature > 0), draw, lambda _: greedy, None)


def all_greedy(requests) -> bool:
  """Whether every request (anything with a `temperature`) is greedy: its steps may run the
  `greedy_only` variant of `jit_variants`."""
  return not any(r.temperature > 0 for r in requests)


def jit_variants(step, donate: tuple[int, ...] = ()) -> list:
  """`step` (taking `greedy_only`) jitted twice: [False] for calls with sampled rows, [True] for
  calls whose rows are all greedy (compiled without the sampling filters)."""
  return [jax.jit(partial(step, greedy_only=g), donate_argnums=donate) for g in (False, True)]


FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)  # rows' temperatures are float32

# run seeds lie below this: a key keeps 32 bits of one (without x64), so larger seeds would
# repeat smaller ones' samples
SEED_LIMIT = 2**32


def validate(temperature: float, top_k: int, top_p: float, min_p: float) -> list[str]:
  """Human-readable problems with one request's sampling values (empty when valid)."""
  problems = []
  if not 0 <= temperature <= FLOAT32_MAX:
    problems.append(f"temperature must be >= 0 and a float32 (at most {FLOAT32_MAX:.4g}), got "
                    f"{temperature}")
  if not 0 <= top_k < 2**31:  # (rows' top_k are int32; any k past the vocabulary keeps all)
    problems.append(f"top_k must be in [0, 2**31) (0 disables), got {top_k}")
  if not 0 < top_p <= 1:
    problems.append(f"top_p must be in (0, 1], got {top_p}")
  if not 0 <= min_p <= 1:
    problems.append(f"min_p must be in [0, 1], got {min_p}")
  return problems
