"""The reference decoding loop: one jitted prefill of a padded batch into a dense cache, then
jitted chunks of decode steps with the cache donated. Serving runs in the paged engine
(`jaxinfer.engine`); this loop, an implementation of its own, is what tests hold the engine's
outputs against and benchmarks measure padded static batches with.

B batch, T padded prompt len, M output buffer len, S cache len, V vocab.

Prompts are right-padded; row b's token i sits at position i and cache slot i, so a request's
output does not depend on what it was batched with. Each row's sampling key (`RowRequest.key`,
`sampling.sample_key`) is folded with the token index.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.compilation_cache import call_compiled
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import CACHE_AXES, KVCache
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingParams, all_greedy, jit_variants, sample


@struct.dataclass
class DecodeState:
  tokens: jax.Array  # (B, M) int32: generated tokens
  num_generated: jax.Array  # (B,) int32
  prompt_len: jax.Array  # (B,) int32
  max_new: jax.Array  # (B,) int32
  done: jax.Array  # (B,) bool
  keys: jax.Array  # (B,) typed PRNG keys, one per request


def _constrain_state(state: DecodeState, runtime: Runtime) -> DecodeState:
  c = lambda x: runtime.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  return DecodeState(tokens=c(state.tokens), num_generated=c(state.num_generated),
                     prompt_len=c(state.prompt_len), max_new=c(state.max_new), done=c(state.done),
                     keys=state.keys)


def _constrain_cache(cache: KVCache, runtime: Runtime) -> KVCache:
  c = lambda x: runtime.constrain(x, CACHE_AXES)
  return KVCache(k=tuple(map(c, cache.k)), v=tuple(map(c, cache.v)))


def _sample_and_append(params, hidden, state: DecodeState, sampling: SamplingParams,
                       eos_ids: jax.Array, greedy_only: bool) -> DecodeState:
  logits = M.logits(params, hidden)  # (B, V)
  index = state.num_generated
  keys = jax.vmap(jax.random.fold_in)(state.keys, index)
  tok = sample(logits, sampling, keys, greedy_only)
  active = ~state.done
  rows = jnp.arange(tok.shape[0])
  tokens = state.tokens.at[rows, jnp.where(active, index, state.tokens.shape[1])].set(
      tok, mode="drop")
  num_generated = index + active.astype(jnp.int32)
  hit_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
  done = state.done | (active & (hit_eos | (num_generated >= state.max_new)))
  return dataclasses.replace(state, tokens=tokens, num_generated=num_generated, done=done)


def prefill_fn(params, cache, prompt, state: DecodeState, sampling, eos_ids, *, cfg, runtime,
               greedy_only=False):
  """prompt (B,T) -> state with the first token sampled, cache filled for slots < T.
  greedy_only: every row is known to be greedy (`sampling.sample`)."""
  t = prompt.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), prompt.shape)
  hidden, cache = M.forward(params, prompt, positions, cfg, cache, kv_source="chunk",
                            runtime=runtime)
  last = jnp.take_along_axis(hidden, (state.prompt_len - 1)[:, None, None], axis=1)[:, 0]
  state = _sample_and_append(params, last, state, sampling, eos_ids, greedy_only)
  return _constrain_state(state, runtime), _constrain_cache(cache, runtime)


def decode_fn(params, cache, state: DecodeState, sampling, eos_ids, *, num_steps, cfg, runtime,
              greedy_only=False):
  """Up to `num_steps` decode steps; stops early once every row is done (greedy_only as in
  `prefill_fn`)."""
  rows = jnp.arange(state.tokens.shape[0])

  def cond(carry):
    i, state, _ = carry
    return (i < num_steps) & ~jnp.all(state.done)

  def body(carry):
    i, state, cache = carry
    last = state.tokens[rows, jnp.maximum(state.num_generated - 1, 0)]
    pos = state.prompt_len + state.num_generated - 1
    pos = jnp.where(state.done, cache.max_len, pos)  # finished rows write nowhere
    hidden, cache = M.forward(params, last[:, None], pos[:, None], cfg, cache, kv_source="cache",
                              runtime=runtime)
    state = _sample_and_append(params, hidden[:, 0], state, sampling, eos_ids, greedy_only)
    return i + 1, _constrain_state(state, runtime), _constrain_cache(cache, runtime)

  _, state, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), state, cache))
  return state, cache


def next_pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class RowRequest:
  """One sequence of a batch: prompt ids, its budget and sampling values."""

  prompt_ids: Sequence[int]
  max_new_tokens: int
  key: jax.Array
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0


@dataclasses.dataclass
class RowResult:
  tokens: list[int]
  finished_by_eos: bool


@dataclasses.dataclass
class Timings:
  prefill_s: float = 0.0
  decode_s: float = 0.0
  compile_s: float = 0.0
  prefill_tokens: int = 0
  decode_tokens: int = 0
  compilations: int = 0
  decode_steps: int = 0
  row_steps: int = 0  # decode steps x batch rows: decode_tokens / row_steps is the occupancy


class Generator:
  """Compiles and runs batched generation for one model on one mesh (the reference loop).

  `generate(rows)` pads the batch to a multiple of the mesh's batch axes and the prompt / output
  lengths to powers of two, so a long run compiles a handful of shapes.
  """

  def __init__(self, cfg: ModelConfig, params: M.Transformer, runtime: Runtime = Runtime(),
               steps_per_sync: int = 32):
    self.cfg, self.params, self.runtime = cfg, params, runtime
    self.steps_per_sync = steps_per_sync
    self.timings = Timings()
    self._compiled: dict[tuple, Callable] = {}
    eos = list(cfg.eos_token_ids) or [-1]
    self._eos = jnp.asarray(eos, jnp.int32)
    kw = dict(cfg=cfg, runtime=runtime)
    self._prefill = jit_variants(partial(prefill_fn, **kw), (1,))
    self._decode = jit_variants(partial(decode_fn, num_steps=steps_per_sync, **kw), (1,))

  @property
  def batch_multiple(self) -> int:
    mesh = self.runtime.mesh
    if mesh is None:
      return 1
    return mesh.shape["data"] * mesh.shape["fsdp"]

  def _put(self, x, axes):
    x = jnp.asarray(x)
    mesh, rules = self.runtime.mesh, self.runtime.rules
    if mesh is None:
      return x
    return jax.device_put(x, rules.sharding(mesh, axes, x.shape))

  def _run(self, name, fn, *args):
    """Calls `fn` through an AOT-compiled executable cached by argument shapes."""
    key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args[1:]))
    return call_compiled(self._compiled, key, fn, args, self.timings)

  def generate(self, rows: Sequence[RowRequest],
               should_stop: Callable[[int, list[int]], bool] | None = None) -> list[RowResult]:
    """Generates for every row. `should_stop(row, tokens)` lets the host end a row early (stop
    strings); it is consulted between decode chunks, so the answer never depends on chunking."""
    if not rows:
      return []
    n = len(rows)
    b = -(-n // self.batch_multiple) * self.batch_multiple
    t = next_pow2(max(len(r.prompt_ids) for r in rows), 16)
    m = next_pow2(max(r.max_new_tokens for r in rows), 16)
    s = t + m

    prompt = np.zeros((b, t), np.int32)
    prompt_len = np.ones((b,), np.int32)
    max_new = np.zeros((b,), np.int32)
    done = np.ones((b,), bool)
    keys = [jax.random.key(0)] * b
    sp = {f: np.zeros((b,), dt) for f, dt in (("temperature", np.float32), ("top_k", np.int32),
                                              ("top_p", np.float32), ("min_p", np.float32))}
    sp["top_p"][:] = 1.0
    for i, r in enumerate(rows):
      prompt[i, :len(r.prompt_ids)] = r.prompt_ids
      prompt_len[i] = len(r.prompt_ids)
      max_new[i] = r.max_new_tokens
      done[i] = r.max_new_tokens <= 0
      keys[i] = r.key
      for f in sp:
        sp[f][i] = getattr(r, f)
    batch = ("batch",)
    state = DecodeState(
        tokens=self._put(np.zeros((b, m), np.int32), ("batch", None)),
        num_generated=self._put(np.zeros((b,), np.int32), batch),
        prompt_len=self._put(prompt_len, batch), max_new=self._put(max_new, batch),
        done=self._put(done, batch), keys=jnp.stack(keys))
    sampling = SamplingParams(**{f: self._put(v, batch) for f, v in sp.items()})
    cache = KVCache.init(self.cfg, b, s, self.runtime.mesh, self.runtime.rules)
    prompt_arr = self._put(prompt, ("batch", None))

    compile0 = self.timings.compile_s
    t0 = time.perf_counter()
    greedy = all_greedy(rows)
    state, cache = self._run(("prefill", greedy), self._prefill[greedy], self.params, cache,
                             prompt_arr, state, sampling, self._eos)
    host_done = np.asarray(state.done)
    t1 = time.perf_counter()
    self.timings.prefill_s += t1 - t0 - (self.timings.compile_s - compile0)
    self.timings.prefill_tokens += int(prompt_len[:n].sum())

    while not host_done.all():
      compile0 = self.timings.compile_s
      t2 = time.perf_counter()
      state, cache = self._run(("decode", greedy), self._decode[greedy], self.params, cache,
                               state, sampling, self._eos)
      host_done = np.asarray(state.done)
      self.timings.decode_s += time.perf_counter() - t2 - (self.timings.compile_s - compile0)
      if should_stop is not None:
        tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
        newly = [i for i in range(n)
                 if not host_done[i] and should_stop(i, list(tokens[i, :counts[i]]))]
        if newly:
          host_done = host_done.copy()
          host_done[newly] = True
          state = dataclasses.replace(state, done=self._put(host_done, batch))
    tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
    eos = set(int(e) for e in self.cfg.eos_token_ids)
    results = []
    for i in range(n):
      toks = [int(x) for x in tokens[i, :counts[i]]]
      results.append(RowResult(toks, bool(toks) and toks[-1] in eos))
    self.timings.decode_tokens += int(sum(max(0, c - 1) for c in counts[:n]))
    self.timings.decode_steps += max(0, int(counts.max()) - 1)
    self.timings.row_steps += max(0, int(counts.max()) - 1) * b
    return results
