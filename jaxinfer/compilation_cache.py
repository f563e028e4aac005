"""A persistent XLA compilation cache shared by every jaxinfer command.

A run compiles a handful of step functions (the engine's step shapes, speculative
verification); with the cache on, a later run with the same model,
shapes, mesh and jax version loads them from disk instead of compiling again. Entries are keyed by
the computation and the backend, so a changed model or flag compiles afresh, and a damaged entry
is recompiled, never trusted. The directory is not size-capped: JAX's capped mode needs every
process writing there to run capped (it keeps access-time files beside the entries), and the
directory may be shared with other JAX programs through $JAX_COMPILATION_CACHE_DIR; entries
hold code, not weights (tens to hundreds of KiB each), and deleting the directory is safe.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

MIN_COMPILE_SECONDS = 0.2  # cheaper computations are not worth a file
_turned_off = False  # by a caller of `enable`: later `apply(None)`s keep it off


def min_compile_seconds() -> float:
  """MIN_COMPILE_SECONDS, unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (JAX's own setting)
  says otherwise."""
  value = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  return MIN_COMPILE_SECONDS if value is None else float(value)


def default_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """$JAX_COMPILATION_CACHE_DIR (JAX's own setting) if set, else xla/ in jaxinfer's cache."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  from jaxinfer.embedded import cache_root
  return cache_root(cache_dir) / "xla"


def enable(path: str | os.PathLike | None) -> Path | None:
  """Keeps compiled executables under `path` (None or '' turns the cache off). Takes effect
  for compilations after the call, even if the process has compiled before. An unusable
  directory is reported on stderr and the run goes on without the cache."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  global _turned_off
  _turned_off = not path
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
    return None
  path = Path(path).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    print(f"warning: compilation cache off ({e}); pass --compilation_cache=DIR to choose another "
          f"directory", file=sys.stderr)
    return None
  least = min_compile_seconds()
  if (jax.config.jax_compilation_cache_dir == str(path)
      and jax.config.jax_persistent_cache_min_compile_time_secs == least):
    return path  # as it is (no reset under compilations running in other threads)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", least)
  cc.reset_cache()  # jax decides once per process whether to use the cache: decide again
  return path


def apply(value: str | None, cache_dir: str | os.PathLike | None = None) -> Path | None:
  """What `--compilation_cache` (and `jaxinfer.LLM(compilation_cache=...)`) asks for: 'none' (or
  '') turns the cache off, a directory keeps executables there, None keeps what the process
  has: the cache off where it was turned off (`jaxinfer generate --compilation_cache=none`
  before its `jaxinfer.LLM`), else the directory JAX has ($JAX_COMPILATION_CACHE_DIR, or one the
  caller set), else `default_dir`."""
  import jax
  if value is not None and value.lower() in ("", "none") or (
      value is None and _turned_off and not jax.config.jax_compilation_cache_dir):
    return enable(None)
  return enable(value or jax.config.jax_compilation_cache_dir or default_dir(cache_dir))


@contextlib.contextmanager
def suspended():
  """Compilations inside stay out of the cache: an executable compiled for an absent target (a
  TPU topology compiled for on this host) cannot be loaded back, which needs a client of its
  platform; kept there, a later run would warn and compile again."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  cc.reset_cache()  # jax decides once per process whether to use the cache: decide again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    cc.reset_cache()


class CompileClock:
  """Every compilation this process runs (jit steps and small eager operations alike), from
  jax's own compile and cache events: `totals()` -> (seconds, backend compilations, of them
  loaded from the persistent cache). Read two totals around a call for what it compiled.
  Seconds are wall-clock time during which something compiled: compilations running at once
  (each replica's engine compiles its own steps in a thread of its own) count once;
  `critical(since)` is what a call waited for (see there)."""

  _spans: list = []  # (start, end, thread) in perf_counter seconds, one per compile phase
  _count, _loaded, _listening = 0, 0, False

  @classmethod
  def start(cls) -> None:
    if not cls._listening:
      import jax
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      jax.monitoring.register_event_listener(cls._on_count)
      cls._listening = True

  @classmethod
  def _on_event(cls, event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):  # tracing, lowering and the backend's compile
      end = time.perf_counter()
      cls._spans.append((end - duration, end, threading.get_ident()))
      cls._count += event.endswith("backend_compile_duration")

  @classmethod
  def _on_count(cls, event: str, **_) -> None:
    cls._loaded += event == "/jax/compilation_cache/cache_hits"

  @classmethod
  def totals(cls) -> tuple[float, int, int]:
    cls.start()
    return covered([s[:2] for s in list(cls._spans)]), cls._count, cls._loaded

  @classmethod
  def critical(cls, since: float) -> float:
    """Seconds of compilation since `since` that the calling thread waited for: its own, and
    the most that any one other thread (a replica's, running beside the others) spent. Replicas
    compiling at different moments while others generate count as one replica's compiling (the
    union of all their spans took generating time for compiling: 8 replicas' 0.25 s of
    generation was once reported as 5.65 s of compilation in 5.9 s)."""
    threads: dict[int, list] = {}
    for start, end, thread in list(cls._spans):
      if end > since:
        threads.setdefault(thread, []).append((max(start, since), end))
    own = covered(threads.pop(threading.get_ident(), []))
    return own + max(map(covered, threads.values()), default=0.0)


def covered(spans: list[tuple[float, float]]) -> float:
  """The length of the union of (start, end) spans."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def call_compiled(executables: dict, key, jitted, args: tuple, counter):
  """`jitted(*args)` through an executable compiled ahead of time once per `key` (kept in
  `executables`); a compilation's seconds and count are added to `counter.compile_s` and
  `counter.compilations` (a run's stats)."""
  if key not in executables:
    t0 = time.perf_counter()
    executables[key] = jitted.lower(*args).compile()
    counter.compile_s += time.perf_counter() - t0
    counter.compilations += 1
  return executables[key](*args)
