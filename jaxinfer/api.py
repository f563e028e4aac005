"""The Python API: `LLM(model, **options).generate(prompts, SamplingParams(...))`.

Options have the names of `jaxinfer generate`'s flags (`--batch_size` is `batch_size=`; see
`jaxinfer.options.ServeOptions`). The model loads once; each call builds nothing it already has
(replicas large enough for an earlier call are kept, with their compiled steps).
"""

from __future__ import annotations

import atexit
import dataclasses
import queue
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from jaxinfer.errors import Cancelled, UserError, keywords
from jaxinfer.options import ServeOptions
from jaxinfer.requests import (Defaults, InvalidRequest, Request, is_integer, is_number,
                               make_request, truncate_at_stop)
from jaxinfer.sampling import SEED_LIMIT, validate as validate_sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample each prompt's completions. temperature 0 is greedy; top_k 0, top_p 1 and
  min_p 0 disable their filters; generation stops at the model's EOS, at a `stop` string (the
  completion is cut before it) or after max_new_tokens; n completions per prompt, each with its
  own key derived from (seed, the prompt's index, the sample's index)."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  stop: str | Sequence[str] = ()
  seed: int = 0
  n: int = 1

  def __post_init__(self):
    stop = (self.stop,) if isinstance(self.stop, str) else self.stop
    if not (isinstance(stop, Sequence) and all(isinstance(x, str) and x for x in stop)):
      raise UserError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
    object.__setattr__(self, "stop", tuple(stop))
    for name in ("max_new_tokens", "top_k", "seed", "n"):
      if not is_integer(getattr(self, name)):
        raise UserError(f"{name}: expected an integer, got {getattr(self, name)!r}")
    for name in ("temperature", "top_p", "min_p"):
      if not is_number(getattr(self, name)):
        raise UserError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
    if self.n < 1:
      raise UserError(f"n: must be >= 1, got {self.n}")
    if not 0 <= self.seed < SEED_LIMIT:
      raise UserError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
    problems = validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
    if problems:
      raise UserError("; ".join(problems))

  def defaults(self) -> Defaults:
    return Defaults(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, stop=self.stop)


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sample: its token ids, their text (None without a tokenizer) and why it ended: "stop"
  (EOS or a stop string) or "length" (max_new_tokens or the model's context)."""

  ids: list[int]
  text: str | None
  finish_reason: str


def completion(tokens: list[int], eos: bool, req: Request, tokenizer) -> Completion:
  """A finished sample of `req`, cut before the first of its stop strings it contains; its text
  is what it adds to the prompt's."""
  text, hit = None, False
  if tokenizer is not None and req.stop:
    tokens, text, hit = truncate_at_stop(tokens, req.stop, tokenizer, req.prompt_ids)
  elif tokenizer is not None:
    text = tokenizer.decode(tokens, req.prompt_ids)
  return Completion(list(tokens), text, "stop" if eos or hit else "length")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """A prompt's result: `outputs` holds its n completions; the first one's fields are also
  `completion_ids`, `text` and `finish_reason`. stats: prompt_tokens, completion_tokens and
  seconds (from the call's start until this prompt finished)."""

  index: int
  prompt_ids: list[int]
  outputs: list[Completion]
  stats: dict[str, Any]

  @property
  def completion_ids(self) -> list[int]:
    return self.outputs[0].ids

  @property
  def text(self) -> str | None:
    return self.outputs[0].text

  @property
  def finish_reason(self) -> str:
    return self.outputs[0].finish_reason


class _Samples:
  """Gathers each request's n samples as they finish (in any order, from any replica's thread)
  and hands the request on once all are in."""

  def __init__(self, tokenizer, on_request: Callable[[Request, list[Completion]], None]):
    self.tokenizer, self.on_request = tokenizer, on_request
    self.completion_tokens = 0
    self._pending: dict[int, dict[int, Completion]] = {}
    self._lock = threading.Lock()

  def add(self, req: Request, k: int, tokens: list[int], eos: bool) -> None:
    with self._lock:
      got = self._pending.setdefault(id(req), {})
      got[k] = completion(tokens, eos, req, self.tokenizer)
      if len(got) < req.n:
        return
      del self._pending[id(req)]
      samples = [got[j] for j in range(req.n)]
      self.completion_tokens += sum(len(s.ids) for s in samples)
      self.on_request(req, samples)


def _one_prompt(p) -> bool:
  """A single prompt, not a list of them: text, token ids (a 1-D array of them too) or one
  conversation."""
  if isinstance(p, (bytes, bytearray)):
    raise UserError("prompts: bytes are neither text nor token ids; decode them to str")
  if isinstance(p, dict):
    raise UserError("prompts: a dict is one message; a conversation is a list of them "
                    "([{'role': ..., 'content': ...}, ...])")
  if isinstance(p, str) or getattr(p, "ndim", None) == 1 and getattr(
      getattr(p, "dtype", None), "kind", None) in ("i", "u"):  # (a 1-D array of ids)
    return True
  return (isinstance(p, Sequence) and len(p) > 0 and all(map(is_integer, p))
          or isinstance(p, Sequence) and len(p) > 0 and all(isinstance(x, dict) for x in p))


def _record(i: int, p) -> dict[str, Any]:
  if isinstance(p, str):
    return {"id": i, "prompt": p}
  if hasattr(p, "tolist"):  # numpy / jax arrays of ids
    p = p.tolist()
  if isinstance(p, Sequence) and p and all(isinstance(x, dict) for x in p):
    return {"id": i, "messages": list(p)}
  if isinstance(p, Sequence) and not isinstance(p, (bytes, bytearray)) and all(map(is_integer, p)):
    return {"id": i, "prompt_ids": [int(x) for x in p]}
  if isinstance(p, Sequence) and not isinstance(p, (str, bytes, bytearray)) and p:
    bad = next(((j, x) for j, x in enumerate(p) if not is_integer(x) and not isinstance(x, dict)),
               None)
    raise UserError(f"prompts[{i}]: mixes token ids and messages" if bad is None else
                    f"prompts[{i}][{bad[0]}]: expected a token id (an integer) or a message (a "
                    f"dict), got {bad[1]!r}")
  raise UserError(f"prompts[{i}]: expected text, a list of token ids or a conversation (a list "
                  f"of {{'role', 'content'}} messages), got {type(p).__name__}")


class LLM:
  """A model served on this process's devices.

  model: "embedded" (the built-in model), a Hugging Face directory or an orbax checkpoint
  (quantized ones included). options: the serving flags of `jaxinfer generate` by name, e.g.
  dtype="float32", mesh="data:2,model:4", batch_size=16, speculative="ngram",
  draft_heads="heads/", scheduler="static", sparsity="sinks_window:4,256".
  compilation_cache: as `--compilation_cache`, for the whole process: compiled steps kept in a
  directory across runs ("none": off, for later LLMs of the process too; default: the
  directory JAX has, else the CLI's).
  """

  _worded = staticmethod(keywords)  # its errors name options as keywords (a CLI job's: flags)

  def __init__(self, model: str = "embedded", compilation_cache: str | None = None, **options):
    from jaxinfer import compilation_cache as cache
    from jaxinfer.serving.build import load
    with self._worded():
      self.options = ServeOptions.from_keywords(model, options)
      self.options.validate()
      cache.apply(compilation_cache, self.options.cache_dir)
      t0 = time.perf_counter()
      (self.config, self.params, self.tokenizer, self._chat, self._backend,
       self.sparsity) = load(self.options)
    self.load_seconds = time.perf_counter() - t0
    self.metrics: dict[str, Any] = {}  # the last call's
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    o = self.options
    return (f"LLM({o.model!r}, {self.config.num_layers} layers, dtype={self.config.dtype}, "
            f"scheduler={o.scheduler}, speculative={o.speculative}, mesh={o.mesh or 'default'})")

  def requests(self, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> list[Request]:
    """The prompts as validated requests (ids 0, 1, ... in order); a bad one raises UserError
    naming its index."""
    one = _one_prompt(prompts)
    if not (one or isinstance(prompts, Iterable)):
      raise UserError(f"prompts: expected a prompt (text, token ids or a conversation) or a "
                      f"list of them, got {type(prompts).__name__}")
    prompts = [prompts] if one else list(prompts)
    if sampling is None or isinstance(sampling, SamplingParams):
      sampling = [sampling or SamplingParams()] * len(prompts)
    elif not (isinstance(sampling, Sequence)
              and all(isinstance(sp, SamplingParams) for sp in sampling)):
      raise UserError(f"sampling_params: expected a SamplingParams or a list of them, got "
                      f"{type(sampling).__name__}")
    elif len(sampling) != len(prompts):
      raise UserError(f"sampling_params: {len(sampling)} for {len(prompts)} prompts")
    cfg, reqs = self.config, []
    for i, (p, sp) in enumerate(zip(prompts, sampling)):
      try:
        reqs.append(make_request(i, _record(i, p), sp.defaults(), self.tokenizer,
                                 cfg.vocab_size, cfg.max_seq_len, self._chat, n=sp.n,
                                 seed=sp.seed))
      except InvalidRequest as e:
        raise UserError(f"prompts[{i}]: {e}") from None
    return reqs

  def prepare(self, requests: list[Request]) -> None:
    """Builds (or keeps) replicas large enough for these requests and checks their memory
    against the devices: what `serve` does first, for callers that must fail before touching
    their output."""
    self._backend.prepare(requests)

  def reset_prefix_cache(self) -> None:
    """Forgets the prompt pages earlier calls left cached (a later call reuses them otherwise):
    for calls that must not benefit from earlier ones, such as a benchmark's rounds."""
    self._backend.reset_prefix_cache()

  def serve(self, requests: list[Request],
            on_request: Callable[[Request, list[Completion]], None],
            progress: bool | None = None, cancel: threading.Event | None = None
            ) -> dict[str, Any]:
    """Generates every request, calling on_request(request, its completions) as each finishes
    (from a replica's thread, one call at a time); returns the call's metrics. Setting `cancel`
    stops every replica after its dispatch in flight (`Cancelled` is raised); an interrupt does
    too."""
    from jaxinfer.compilation_cache import CompileClock
    from jaxinfer.serving.metrics import generation_metrics
    if not self._lock.acquire(blocking=False):
      raise RuntimeError("LLM: another generate call of this LLM is running (a generate_iter "
                         "not read to its end runs until it is closed: call its close())")
    try:
      with self._worded():
        self._backend.prepare(requests)
      import jax
      show = self.options.progress if progress is None else progress
      # (several processes: each finishes the requests of the replicas it leads)
      bar = tqdm(total=len(requests) if jax.process_count() == 1 else None, desc="generate",
                 unit="req", disable=not show, dynamic_ncols=True, file=sys.stderr)

      def finished(req, samples):
        on_request(req, samples)
        bar.update(1)

      samples = _Samples(self.tokenizer, finished)
      tok = self.tokenizer

      def stop(req, tokens) -> bool:  # (the text decoded once for all of the request's strings)
        text = tok.decode(tokens, req.prompt_ids) if req.stop else ""
        return any(s in text for s in req.stop)

      clock = CompileClock.totals()
      t0 = time.perf_counter()
      try:
        with self._worded():
          stats = self._backend.run(requests, samples.add, stop, cancel)
      finally:  # whatever finished has been handed on, even when generation fails
        bar.close()
      compiled = [now - then for now, then in zip(CompileClock.totals(), clock)]
      compiled[0] = CompileClock.critical(t0)
      self.metrics = generation_metrics(
          stats, compiled=compiled, completion_tokens=samples.completion_tokens,
          prompt_tokens=sum(len(r.prompt_ids) for r in requests),
          seconds=time.perf_counter() - t0, opts=self.options, dtype=self.config.dtype,
          sparsity=self.sparsity)
      return self.metrics
    finally:
      self._lock.release()

  def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams]
               | None = None, *, progress: bool | None = None) -> list[RequestOutput]:
    """One RequestOutput per prompt, in order. prompts: a prompt or a list of them, each text,
    token ids or a conversation (rendered by the model's chat template); sampling_params: one
    for all or one per prompt. In a run of several processes (all calling with the same
    prompts) each process's list holds the outputs of the replicas it leads, None elsewhere."""
    reqs = self.requests(prompts, sampling_params)
    results: list[RequestOutput | None] = [None] * len(reqs)
    t0 = time.perf_counter()

    def done(req, samples):
      results[req.id] = _output(req, samples, t0)

    self.serve(reqs, done, progress)
    return results

  def generate_iter(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams]
                    | None = None, *, progress: bool | None = None
                    ) -> Iterator[RequestOutput]:
    """As `generate`, but yields each prompt's RequestOutput as soon as it finishes (completion
    order; `.index` is its place among the prompts). Generation runs in a thread of its own;
    an error there is raised here. Leaving the loop early (or closing the iterator) stops the
    generation once each replica's dispatch in flight is read. Bad input is raised by the
    call itself; generation starts with the first item asked for."""
    return self._stream(self.requests(prompts, sampling_params), progress)

  def _stream(self, reqs: list[Request], progress: bool | None) -> Iterator[RequestOutput]:
    results: queue.Queue = queue.Queue()
    end = object()
    cancel = threading.Event()
    t0 = time.perf_counter()

    def work():
      try:
        self.serve(reqs, lambda req, samples: results.put(_output(req, samples, t0)), progress,
                   cancel)
      except Cancelled:
        pass  # the consumer left
      except BaseException as e:  # handed to the consumer
        results.put(e)
      finally:
        results.put(end)

    thread = threading.Thread(target=work, name="jaxinfer-generate", daemon=True)
    _live[thread] = cancel
    thread.start()
    try:
      while (item := results.get()) is not end:
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:  # (left early, interrupted or done: no generation outlives the iterator)
      cancel.set()
      thread.join()
      _live.pop(thread, None)


_live: dict[threading.Thread, threading.Event] = {}  # generate_iter generations running


@atexit.register
def _stop_live() -> None:
  """At exit, stops the generation of every generate_iter left open (a daemon thread still
  inside JAX as the interpreter ends aborts the process)."""
  for thread, cancel in list(_live.items()):
    cancel.set()
    thread.join()


def _output(req: Request, samples: list[Completion], t0: float) -> RequestOutput:
  return RequestOutput(req.id, list(req.prompt_ids), samples, {
      "prompt_tokens": len(req.prompt_ids),
      "completion_tokens": sum(len(s.ids) for s in samples),
      "seconds": round(time.perf_counter() - t0, 4)})
