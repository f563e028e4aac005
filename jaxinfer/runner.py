"""The batch-generation job behind `jaxinfer generate`: JSONL in, one record per input line out,
run through `jaxinfer.LLM`.

Output is written record by record and fsync'ed (on a writer thread, in groups); re-running the
same command after a crash skips what is already written. With several processes
(jax.distributed) the requests are split among all replicas of the run, each process writes the
records of the replicas it leads to a part of its own, and process 0 merges the parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jaxinfer import output
from jaxinfer.api import LLM, Completion, SamplingParams
from jaxinfer.errors import UserError
from jaxinfer.options import ServeOptions, plain
from jaxinfer.requests import (Defaults, InvalidRequest, Request, error_record, is_text,
                               load_line, parse_request, special_stop)
from jaxinfer.sampling import SEED_LIMIT, validate as validate_sampling
from jaxinfer.serving import placement

__all__ = ["GenerateJob", "UserError", "generate_file", "run"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateJob(ServeOptions):
  """A JSONL file of prompts in, one of records out; the model served with the inherited
  options."""

  prompts: str
  output: str
  defaults: Defaults = Defaults()  # what a record does not say
  seed: int = 0
  num_samples: int = 1
  metrics_output: str | None = None
  overwrite: bool = False

  def __post_init__(self):
    for name in ("prompts", "output", "metrics_output"):  # (a Path is the path it names)
      if isinstance(getattr(self, name), os.PathLike):
        object.__setattr__(self, name, os.fspath(getattr(self, name)))

  def validate(self) -> None:
    """Everything checkable before loading a model, with the flag named in the message."""
    self.check_types()
    if not Path(self.prompts).is_file() or not os.access(self.prompts, os.R_OK):
      raise UserError(f"--prompts: {self.prompts!r} is not a readable file")
    for flag, path in (("--output", self.output), ("--metrics_output", self.metrics_output)):
      if path is not None:
        parent = Path(path).absolute().parent
        if not parent.is_dir():
          raise UserError(f"{flag}: directory {str(parent)!r} does not exist")
        if Path(path).is_dir():
          raise UserError(f"{flag}: {path!r} is a directory, expected a file path")
        if Path(path).exists() and Path(path).samefile(self.prompts):
          raise UserError(f"{flag}: {path!r} is the --prompts file")
    if self.metrics_output is not None and (
        Path(self.metrics_output).resolve() == Path(self.output).resolve()):
      raise UserError(f"--metrics_output: {self.metrics_output!r} is the --output file")
    if self.num_samples < 1:
      raise UserError(f"--num_samples: must be >= 1, got {self.num_samples}")
    if self.defaults.max_new_tokens < 1:
      raise UserError(f"--max_new_tokens: must be >= 1, got {self.defaults.max_new_tokens}")
    d = self.defaults
    for problem in validate_sampling(d.temperature, d.top_k, d.top_p, d.min_p):
      raise UserError(f"--{problem.split()[0]}: {problem}")
    if not all(d.stop):
      raise UserError(f"--stop: stop strings must be non-empty, got {list(d.stop)}")
    if not 0 <= self.seed < SEED_LIMIT:
      raise UserError(f"--seed: expected an integer in [0, 2**32), got {self.seed}")
    super().validate()


def read_requests(job: GenerateJob, tokenizer, vocab_size: int, max_seq_len: int,
                  chat=None) -> tuple[list[Request], list[dict[str, Any]], int]:
  """(valid requests, error records, number of request lines). Blank lines are not requests.
  `chat`: the model's chat template, for conversation prompts."""
  requests, errors, first_line = [], [], {}
  lines = 0
  with open(job.prompts, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      lines += 1
      try:
        text = output.decode_line(raw, line_no)
      except ValueError as e:
        errors.append(error_record(line_no, str(e)))
        continue
      try:
        req = parse_request(line_no, text, job.defaults, tokenizer, vocab_size, max_seq_len,
                            chat, n=job.num_samples, seed=job.seed)
      except InvalidRequest as e:
        errors.append(error_record(line_no, str(e), _request_id(text)))
        continue
      key = json.dumps(req.id)
      if key in first_line:
        errors.append(error_record(line_no, f"duplicate id {req.id!r} (first on line "
                                            f"{first_line[key]})", req.id))
        continue
      first_line[key] = line_no
      requests.append(req)
  return requests, errors, lines


def _request_id(text: str):
  """The id of a line that failed to parse as a request, where it has a usable one."""
  try:
    rec = load_line(text)
  except InvalidRequest:
    return None
  rid = rec.get("id") if isinstance(rec, dict) else None
  return rid if is_text(rid) or (isinstance(rid, int) and not isinstance(rid, bool)) else None


def make_record(req: Request, samples: list[Completion]) -> dict:
  rec: dict[str, Any] = {"id": req.id, "line": req.line}
  parts = []
  for s in samples:
    part: dict[str, Any] = {"completion_ids": s.ids}
    if s.text is not None:
      part["completion"] = s.text
    part.update(finish_reason=s.finish_reason, completion_tokens=len(s.ids))
    parts.append(part)
  if len(parts) == 1:
    rec.update(parts[0])
  else:
    rec["samples"] = parts
  rec["prompt_tokens"] = len(req.prompt_ids)
  if req.metadata is not None:
    rec["metadata"] = req.metadata
  return rec


def _check_resumable(written: list[dict[str, Any]], requests: list[Request]) -> None:
  """Refuses to resume from records another job wrote: a completion for an id this --prompts
  does not have, or made from a prompt of another length, with another number of samples or
  another token budget (a `length` finish that is not this budget, or one overrun)."""
  by_id = {json.dumps(r.id): r for r in requests}

  def refuse(rec, why):
    raise UserError(f"--output: its record for id {rec.get('id')!r} {why}: it holds another "
                    f"job's output (--overwrite starts over)")

  for rec in written:
    if "error" in rec:
      continue
    req = by_id.get(json.dumps(rec.get("id")))
    if req is None:
      refuse(rec, "matches no request of this --prompts")
    if rec.get("prompt_tokens") != len(req.prompt_ids):
      refuse(rec, f"was made from a prompt of {rec.get('prompt_tokens')} tokens, not the "
                  f"{len(req.prompt_ids)} of this --prompts")
    samples = rec.get("samples", [rec])
    if len(samples) != req.n:
      refuse(rec, f"holds {len(samples)} completions, this job asks {req.n} (--num_samples)")
    for sample in samples:
      n, budget = sample.get("completion_tokens"), req.max_new_tokens
      if not isinstance(n, int) or n > budget or (sample.get("finish_reason") == "length"
                                                  and n != budget):
        refuse(rec, f"ended after {n} tokens by {sample.get('finish_reason')!r}, under another "
                    f"budget than this job's {budget} (max_new_tokens)")


def _init_distributed(coordinator_address, num_processes, process_id, auto) -> tuple[int, int]:
  """(this process's index, processes): jax.distributed started from the options, or as the
  caller already started it (each process then writes its part of the output)."""
  if auto and (coordinator_address, num_processes, process_id) != (None, None, None):
    raise UserError("--distributed: takes the run's processes from the environment; pass "
                    "--coordinator_address, --num_processes and --process_id without it, or "
                    "neither")
  if jax.distributed.is_initialized():
    if coordinator_address is not None or auto:
      raise UserError("--coordinator_address: jax.distributed is already initialised in this "
                      "process; leave the multi-process options out")
    for flag, given, actual in (("num_processes", num_processes, jax.process_count()),
                                ("process_id", process_id, jax.process_index())):
      if given is not None and given != actual:
        raise UserError(f"--{flag}: {given}, but jax.distributed (initialised already) has "
                        f"{actual}")
    return jax.process_index(), jax.process_count()
  if coordinator_address is None and not auto:
    for flag, value, alone in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
      if value not in (None, alone):
        raise UserError(f"--{flag}: a multi-process run needs --coordinator_address (or "
                        f"--distributed on a TPU pod)")
    return 0, 1
  # Cross-process barriers on CPU need a collectives library (no effect on accelerators).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  print(f"process {process_id} of {num_processes}: waiting for the others at "
        f"{coordinator_address} (jax.distributed gives up after 5 minutes)" if not auto else
        "waiting for the other processes (jax.distributed, from the environment)",
        file=sys.stderr, flush=True)
  try:
    if auto:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
  except Exception as e:  # the runtime's own message says what is wrong (address, timeout, ...)
    flag = "--distributed" if auto else "--coordinator_address"
    raise UserError(f"{flag}: jax.distributed could not start: {e}") from None
  return jax.process_index(), jax.process_count()


def _process_ended(e: Exception) -> UserError:
  """A collective that failed because another process of the run died, in one line (the
  records written so far are kept: the same commands, rerun, resume)."""
  return UserError(f"another process of this run ended before it ({str(e).splitlines()[0]}); "
                   f"rerun every process with the same command to resume")


def _barrier(name: str) -> None:
  """Waits for every process of the run."""
  from jax.experimental import multihost_utils
  try:
    multihost_utils.sync_global_devices(name)
  except Exception as e:
    raise _process_ended(e) from None


# Options a process may hold for itself: where it keeps caches, what it shows, the files only
# process 0 writes, and paths (a model's copy on each host) whose contents decide nothing here.
_PER_PROCESS = ("prompts", "cache_dir", "progress", "metrics_output", "model", "draft_model",
                "draft_heads")


def _job_digest(job: GenerateJob) -> bytes:
  """What every process of a run must share: the prompts file's bytes and every option that
  decides the requests, their split among the replicas or their records."""
  options = {k: v for k, v in dataclasses.asdict(job).items() if k not in _PER_PROCESS}
  digest = hashlib.sha256(Path(job.prompts).read_bytes())
  digest.update(json.dumps(options, sort_keys=True, default=str).encode())
  return digest.digest()


def _agree(job: GenerateJob, ready: bool) -> None:
  """One exchange among the processes of a run before any writes: each says whether it is ready
  (its model loaded, the input read and checked) and which job it runs. A process that failed
  ends every other one with a line naming it (they once waited for it until jax.distributed
  aborted them all); processes reading different input or options are refused: each splits the
  requests among all replicas alike, so different ones would lose or repeat records."""
  import numpy as np
  from jax.experimental import multihost_utils
  digest = np.frombuffer(_job_digest(job)[:8], np.int32) if ready else np.zeros(2, np.int32)
  try:
    every = np.asarray(multihost_utils.process_allgather(np.append(np.int32(ready), digest)))
  except Exception as e:
    raise _process_ended(e) from None
  if not ready:
    return  # (the caller raises its own error)
  failed = [i for i, row in enumerate(every) if not row[0]]
  if failed:
    raise UserError(f"process {failed[0]} of this run failed before generating (its own error "
                    f"says why); fix it and rerun every process with the same command")
  if (every[:, 1:] != digest).any():
    raise UserError("--prompts: the processes of this run read different input or options; "
                    "give every process the same --prompts and options")


@contextlib.contextmanager
def _ready_together(job: GenerateJob, nproc: int):
  """The block's preparation, then `_agree` among the processes (a failure in it too)."""
  try:
    yield
  except Exception:
    if nproc > 1:
      _agree(job, ready=False)
    raise
  if nproc > 1:
    _agree(job, ready=True)


class _JobLLM(LLM):
  """The job's LLM: its errors name the CLI's flags (`generate_file` words them as keywords)."""

  _worded = staticmethod(contextlib.nullcontext)


def run(job: GenerateJob, *, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        distributed: bool = False) -> dict[str, Any]:
  """Runs the job; returns this run's metrics (also written to job.metrics_output)."""
  job.validate()
  pid, nproc = _init_distributed(coordinator_address, num_processes, process_id, distributed)
  with output.exclusive(job.output) if pid == 0 else contextlib.nullcontext():
    if nproc > 1:  # (no process reads the output before process 0 holds it)
      _barrier("jaxinfer_generate_locked")
    return _run(job, pid, nproc)


def _run(job: GenerateJob, pid: int, nproc: int) -> dict[str, Any]:
  t_start = time.perf_counter()
  with _ready_together(job, nproc):  # every process ready before the output is cleared
    llm = _JobLLM(**dataclasses.asdict(ServeOptions.of(job)))
    cfg = llm.config
    if job.defaults.stop and llm.tokenizer is None:  # (every line's, not an error of each)
      raise UserError("--stop: stop strings need a tokenizer and the model has no "
                      "tokenizer.json")
    if problem := special_stop(job.defaults.stop, llm.tokenizer):
      raise UserError(f"--stop: {problem}")
    requests, errors, num_lines = read_requests(job, llm.tokenizer, cfg.vocab_size,
                                                cfg.max_seq_len, llm._chat)
    stray = output.stray_part_counts(job.output, nproc)  # a killed run of another size's parts
    for n in stray:
      if nproc > 1 and not job.overwrite:
        raise UserError(f"--output: {job.output} has the parts of a {n}-process run; rerun it "
                        f"with --num_processes={n}, or as one process (which merges them)")
    written = [] if job.overwrite else output.completed(job.output, nproc, repair_part=pid)
    if not job.overwrite and stray:  # (checked as this job's before they are merged)
      written += [r for n in stray for r in output.part_records(job.output, n)]
    _check_resumable(written, requests)
    for n in [] if job.overwrite else stray:
      output.merge_parts(job.output, n)
    # what is done, as the input now reads (lines inserted or corrected since): a single
    # process writes it out once the job is checked, a multi-process run's process 0 when it
    # merges
    line_of = {json.dumps(r.id): r.line for r in requests}
    kept = output.reconciled(written, line_of, errors)
    done = {output.record_key(r) for r in kept}
    key_of = lambda r: output.record_key({"id": r.id, "line": r.line})
    mine = lambda k: placement.owner(k, nproc) == pid  # error records: one process each
    skipped = sum(1 for r in requests if key_of(r) in done) + sum(
        1 for e in errors if output.record_key(e) in done)
    # every process is given every request: the backend splits them among all replicas of the
    # run alike everywhere, each process writing the records of the replicas it leads
    todo = [r for r in requests if key_of(r) not in done]
    my_errors = [e for e in errors if output.record_key(e) not in done
                 and mine(output.record_key(e))]
    llm.prepare(todo)  # pools, trees and memory checked before the output is touched

  part = output.part_path(job.output, pid, nproc) if nproc > 1 else Path(job.output)
  if job.overwrite and pid == 0:
    for p in [Path(job.output)] + [output.part_path(job.output, i, n)
                                   for n in [nproc] + stray for i in range(n)]:
      p.unlink(missing_ok=True)
  if nproc == 1 and kept != written:
    output.rewrite(job.output, kept)
  if nproc > 1:  # every process has read what is done before any writes
    _barrier("jaxinfer_generate_start")
  try:
    writer = output.RecordWriter(part)
  except OSError as e:
    raise UserError(f"--output: cannot write {str(part)!r} ({e.strerror or e})") from None
  try:
    try:
      writer.write(my_errors)
      generated = llm.serve(todo, lambda req, samples: writer.write([make_record(req, samples)]))
    finally:  # whatever was completed reaches the disk, even when generation fails
      writer.close()
  except OSError:
    if writer.error is None:
      raise
    raise UserError(f"--output: writing {str(part)!r} failed ({writer.error}); the records "
                    f"written before are kept: free the space and rerun to resume") from None
  t_end = time.perf_counter()

  merged = None
  if nproc > 1:
    _barrier("jaxinfer_generate_done")
    if pid == 0:
      merged = output.merge_parts(job.output, nproc,
                                  lambda records: output.reconciled(records, line_of, errors))
    _barrier("jaxinfer_generate_merged")

  metrics = {"num_requests": num_lines, "num_completed": len(todo),
             "num_skipped_already_done": skipped, "num_failed": len(errors),
             "num_samples": job.num_samples, **generated,
             "load_seconds": round(llm.load_seconds, 3),
             "wall_seconds": round(t_end - t_start, 3), "processes": nproc}
  if merged is not None:
    metrics["records_in_output"] = merged
  if job.metrics_output and pid == 0:
    try:
      Path(job.metrics_output).write_text(json.dumps(metrics, indent=2) + "\n")
    except OSError as e:
      raise UserError(f"--metrics_output: cannot write {job.metrics_output!r} "
                      f"({e.strerror or e}); the records are in --output") from None
  return metrics


def generate_file(prompts: str, output: str, model: str = "embedded", **options
                  ) -> dict[str, Any]:
  """`jaxinfer generate` from Python: the JSONL job (resumable: records already in `output`
  are skipped), with its flags as keywords (max_new_tokens, temperature, top_k, top_p, min_p
  and stop are the defaults a line may override; coordinator_address, num_processes,
  process_id and distributed start a multi-process run, as does calling it in processes that
  initialised jax.distributed themselves); returns the run's metrics."""
  sampling = {k: options.pop(k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                          "min_p", "stop") if k in options}
  processes = {k: options.pop(k) for k in ("coordinator_address", "num_processes", "process_id",
                                           "distributed") if k in options}
  cache = options.pop("compilation_cache", None)
  known = {f.name for f in dataclasses.fields(GenerateJob)} - {"defaults"}  # (its sampling keys)
  unknown = sorted(set(options) - known)
  if unknown:
    raise UserError(f"unknown option(s) {unknown}")
  if not all(isinstance(p, (str, os.PathLike)) for p in (prompts, output)):
    raise UserError(f"prompts, output: expected file paths, got {prompts!r}, {output!r}")
  job = GenerateJob(prompts=str(prompts), output=str(output), model=plain(model),
                    defaults=SamplingParams(**sampling).defaults(),
                    **{k: plain(v) for k, v in options.items()})
  if cache is not None:  # (as `jaxinfer.LLM(compilation_cache=...)`: for the whole process)
    from jaxinfer import compilation_cache
    job.validate()
    compilation_cache.apply(plain(cache), job.cache_dir)
  return run(job, **processes)
