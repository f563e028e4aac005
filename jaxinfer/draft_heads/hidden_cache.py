"""The frozen base's hidden states, computed once and cached with tensorstore (zarr), for
heads-only training.

Medusa-1, Hydra and EAGLE train a draft on top of a base that never changes, so the base's final
hidden states (after the final norm) over the training windows are the same at every step and in
every run. `build` computes them once — a pass of the base over the data, resumable — and
`HiddenBatches` streams them back in shuffled batches, so a training step runs the heads alone.
For a base much larger than its heads that is most of a step's cost.

A cache directory holds
  tokens/      zarr int32 (N, T + 1): N non-overlapping windows of the training tokens
  hidden/      zarr (N, T, D): the base's hidden states at window positions 0..T-1
  cache.json   format, the windows' fingerprint (token hash, T, D, dtype) and how many windows
               are written; a crashed build continues from there.
Opening a cache checks it against the data (token hash) and against the model (the first
windows' hidden states are recomputed and compared), so a cache of another model or other data
is refused rather than silently trained on. Batches are dicts {"tokens", "hidden"}; the recipes'
losses take them or plain token windows alike (`tokens_and_hidden`).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.files import read_json_object, write_atomically

FORMAT = "jaxinfer-hidden-cache-1"
_CONFIG = "cache.json"


def tokens_and_hidden(base: M.Transformer, batch, cfg: ModelConfig):
  """(tokens (B, T+1), the frozen base's hidden states (B, T, D)) of a training batch: a cache
  batch {"tokens", "hidden"}, or token windows (B, T+1) run through the base."""
  if isinstance(batch, dict):
    return batch["tokens"], jax.lax.stop_gradient(batch["hidden"])
  inputs = batch[:, :-1]
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
  hidden, _ = M.forward(base, inputs, positions, cfg)
  return batch, jax.lax.stop_gradient(hidden)  # the base is frozen


@partial(jax.jit, static_argnames=("cfg",))
def _hidden(base: M.Transformer, windows: jax.Array, cfg: ModelConfig) -> jax.Array:
  return tokens_and_hidden(base, windows, cfg)[1]


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise ValueError(f"hidden cache: {len(tokens)} tokens cannot fill one {seq_len + 1}-token "
                     f"window")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return np.asarray(tokens)[idx].astype(np.int32)


def _fingerprint(windows: np.ndarray, hidden_size: int, dtype: str) -> dict[str, Any]:
  return {"format": FORMAT, "num_windows": int(windows.shape[0]),
          "seq_len": int(windows.shape[1] - 1), "hidden_size": int(hidden_size), "dtype": dtype,
          "tokens_sha256": hashlib.sha256(windows.tobytes()).hexdigest()}


def _open(path: Path, name: str, *, create_shape=None, dtype=None, chunks=None):
  import tensorstore as ts
  spec: dict[str, Any] = {"driver": "zarr",
                          "kvstore": {"driver": "file", "path": str(path / name)}}
  if create_shape is None:
    return ts.open(spec, open=True).result()
  spec["metadata"] = {"shape": list(create_shape), "chunks": list(chunks),
                      "dtype": dtype, "compressor": None}
  return ts.open(spec, create=True, delete_existing=True).result()


def _zarr_dtype(dtype) -> str:
  dtype = np.dtype(dtype)
  return "bfloat16" if dtype == jnp.bfloat16 else dtype.str


def _write_config(path: Path, config: dict[str, Any]) -> None:
  write_atomically(path / _CONFIG, json.dumps(config, indent=2) + "\n")  # the old count or the new


class HiddenCache:
  """An opened, complete cache: `tokens` (N, T+1) and `hidden` (N, T, D) tensorstore arrays."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    cfg_path = self.path / _CONFIG
    if not cfg_path.is_file():
      raise FileNotFoundError(f"{path}: not a hidden-state cache (no {_CONFIG})")
    self.config = read_json_object(cfg_path)
    if self.config.get("format") != FORMAT:
      raise ValueError(f"{path}: format {self.config.get('format')!r}, expected {FORMAT!r}")
    if self.config["written"] < self.config["num_windows"]:
      raise ValueError(f"{path}: incomplete ({self.config['written']} of "
                       f"{self.config['num_windows']} windows); build it again to finish")
    self.tokens = _open(self.path, "tokens")
    self.hidden = _open(self.path, "hidden")

  @property
  def num_windows(self) -> int:
    return int(self.config["num_windows"])

  def read(self, index: np.ndarray):
    """Futures of the windows `index` (tokens, hidden), in that order."""
    return self.tokens[index].read(), self.hidden[index].read()


def build(path: str | os.PathLike, base: M.Transformer, cfg: ModelConfig, tokens: np.ndarray,
          seq_len: int, *, batch_size: int = 16, verify_windows: int = 2,
          progress: bool = True) -> HiddenCache:
  """Opens the cache at `path` for (base, tokens, seq_len), building what it lacks: a missing
  cache is created, a partial one (a crashed build) is completed. Raises ValueError when `path`
  holds a cache of other data, another window length or another model."""
  from tqdm.auto import tqdm
  if jax.process_count() > 1:
    raise ValueError("hidden cache: built by one process (run heads-only training with the "
                     "cache on one host, or without it)")
  path = Path(path)
  windows = _windows(tokens, seq_len)
  batch = lambda start: jnp.asarray(_padded(windows, start, batch_size))
  out = jax.eval_shape(_hidden, base, batch(0), cfg)
  dtype = _zarr_dtype(out.dtype)
  want = _fingerprint(windows, cfg.embed, dtype)
  config = None
  if (path / _CONFIG).is_file():
    config = read_json_object(path / _CONFIG)
    have = {k: config.get(k) for k in want}
    if have != want:
      diff = sorted(k for k in want if have[k] != want[k])
      raise ValueError(f"{path}: a hidden-state cache of other data or another model "
                       f"({', '.join(diff)} differ); remove it or choose another directory")
  n = len(windows)
  if config is None:
    path.mkdir(parents=True, exist_ok=True)
    _open(path, "tokens", create_shape=(n, seq_len + 1), dtype="<i4",
          chunks=(min(n, 256), seq_len + 1))
    _open(path, "hidden", create_shape=(n, seq_len, cfg.embed), dtype=dtype,
          chunks=(1, seq_len, cfg.embed))
    config = dict(want, written=0)
    _write_config(path, config)
  if config["written"] > 0:  # the stored states must be this model's
    check = min(verify_windows, batch_size, config["written"])
    stored = np.asarray(_open(path, "hidden")[:check].read().result(), np.float32)
    fresh = np.asarray(_hidden(base, batch(0), cfg), np.float32)[:check]
    scale = max(float(np.abs(fresh).max()), 1e-6)
    if float(np.abs(stored - fresh).max()) > 1e-2 * scale:
      raise ValueError(f"{path}: holds the hidden states of another model; remove it or "
                       f"choose another directory")
  if config["written"] < n:
    tok_store, hid_store = _open(path, "tokens"), _open(path, "hidden")
    bar = tqdm(total=n, initial=config["written"], desc="hidden cache", disable=not progress,
               dynamic_ncols=True)
    pending = None
    for start in range(config["written"], n, batch_size):
      end = min(n, start + batch_size)
      hidden = np.asarray(_hidden(base, batch(start), cfg))[:end - start]
      if pending is not None:  # the previous batch's writes overlapped this batch's forward
        _finish(path, config, *pending)
      pending = (end, tok_store[start:end].write(windows[start:end]),
                 hid_store[start:end].write(hidden))
      bar.update(end - start)
    _finish(path, config, *pending)
    bar.close()
  return HiddenCache(path)


def _padded(windows: np.ndarray, start: int, size: int) -> np.ndarray:
  """windows[start:start + size], the last window repeated to `size` (one compiled shape)."""
  chunk = windows[start:start + size]
  return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])


def _finish(path: Path, config: dict[str, Any], end: int, *writes) -> None:
  for w in writes:
    w.result()
  config["written"] = end
  _write_config(path, config)


class HiddenBatches:
  """batch_fn(step) -> {"tokens": (B, T+1) int32, "hidden": (B, T, D)} for the training loop:
  every epoch visits each cached window once, in an order fixed by (seed, epoch), so a resumed
  run reads exactly the batches an uninterrupted one would. The next step's batch is read in
  the background while the current step trains."""

  def __init__(self, cache: HiddenCache, batch_size: int, seed: int = 0):
    if batch_size < 1:
      raise ValueError(f"HiddenBatches: batch_size must be >= 1, got {batch_size}")
    self.cache, self.batch_size, self.seed = cache, batch_size, seed
    self._pending: dict[int, Any] = {}
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          self.cache.num_windows)
    return self._orders[epoch]

  def indices(self, step: int) -> np.ndarray:
    n = self.cache.num_windows
    pos = step * self.batch_size + np.arange(self.batch_size)
    return np.asarray([self._order(int(p // n))[p % n] for p in pos], np.int64)

  def _start(self, step: int):
    idx = self.indices(step)
    order = np.argsort(idx, kind="stable")  # read in storage order, hand back in batch order
    return order, self.cache.read(idx[order])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    order, (tok, hid) = self._pending.pop(step, None) or self._start(step)
    self._pending = {step + 1: self._start(step + 1)}
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {"tokens": np.asarray(tok.result())[inverse],
            "hidden": np.asarray(hid.result())[inverse]}
