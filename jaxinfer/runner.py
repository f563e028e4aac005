"""The batch-generation job behind `jaxinfer generate`: JSONL in, one JSONL record per input line
out (written and fsync'ed batch by batch), plus a metrics JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
from tqdm.auto import tqdm

from jaxinfer import checkpoint
from jaxinfer.config import DTYPES
from jaxinfer.generation import Generator, RowRequest, request_key
from jaxinfer.requests import (Defaults, InvalidRequest, Request, error_record, parse_request,
                               truncate_at_stop)
from jaxinfer.sampling import validate as validate_sampling
from jaxinfer.sharding import format_mesh, make_mesh, parse_mesh
from jaxinfer.sparsity import parse as parse_sparsity


class UserError(ValueError):
  """A problem with the user's flags or files: reported in one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class GenerateJob:
  prompts: str
  output: str
  model: str = checkpoint.EMBEDDED
  defaults: Defaults = Defaults()
  seed: int = 0
  dtype: str = "auto"
  mesh: str = ""
  batch_size: int = 8
  metrics_output: str | None = None
  implementation: str = "xla"
  sparsity: str = "dense"
  max_seq_len: int | None = None  # overrides the model's context (e.g. long prompts + sinks_window)
  steps_per_sync: int = 32
  cache_dir: str | None = None
  progress: bool = True

  def validate(self) -> None:
    """Everything checkable before loading a model, with the flag named in the message."""
    if not Path(self.prompts).is_file():
      raise UserError(f"--prompts: {self.prompts!r} is not a readable file")
    for flag, path in (("--output", self.output), ("--metrics_output", self.metrics_output)):
      if path is not None:
        parent = Path(path).absolute().parent
        if not parent.is_dir():
          raise UserError(f"{flag}: directory {str(parent)!r} does not exist")
        if Path(path).is_dir():
          raise UserError(f"{flag}: {path!r} is a directory, expected a file path")
    if self.dtype != "auto" and self.dtype not in DTYPES:
      raise UserError(f"--dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.max_seq_len is not None and self.max_seq_len < 2:
      raise UserError(f"--max_seq_len: must be >= 2, got {self.max_seq_len}")
    if self.batch_size < 1:
      raise UserError(f"--batch_size: must be >= 1, got {self.batch_size}")
    if self.defaults.max_new_tokens < 1:
      raise UserError(f"--max_new_tokens: must be >= 1, got {self.defaults.max_new_tokens}")
    d = self.defaults
    for problem in validate_sampling(d.temperature, d.top_k, d.top_p, d.min_p):
      raise UserError(f"--{problem.split()[0]}: {problem}")
    try:
      shape = parse_mesh(self.mesh)
      if self.mesh:
        make_mesh(shape)
    except ValueError as e:
      raise UserError(f"--{e}") from None
    from jaxinfer import attention, sparsity
    try:
      sparsity.parse(self.sparsity)
    except ValueError as e:
      raise UserError(f"--{e}") from None
    if self.implementation not in attention.IMPLEMENTATIONS:
      raise UserError(f"--implementation: expected one of {sorted(attention.IMPLEMENTATIONS)}, "
                      f"got {self.implementation!r}")


def _write(f: TextIO, records: list[dict[str, Any]]) -> None:
  """Whole lines only, then flushed to disk, so a crash never leaves a partial record."""
  if records:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def read_requests(job: GenerateJob, tokenizer, vocab_size: int,
                  max_seq_len: int) -> tuple[list[Request], list[dict[str, Any]], int]:
  """(valid requests, error records, number of request lines). Blank lines are not requests."""
  requests, errors, first_line = [], [], {}
  lines = 0
  with open(job.prompts, encoding="utf-8", errors="replace") as f:
    for line_no, text in enumerate(f, start=1):
      if not text.strip():
        continue
      lines += 1
      try:
        req = parse_request(line_no, text, job.defaults, tokenizer, vocab_size, max_seq_len)
      except InvalidRequest as e:
        rid = None
        try:
          rec = json.loads(text)
          rid = rec.get("id") if isinstance(rec, dict) else None
        except json.JSONDecodeError:
          pass
        errors.append(error_record(line_no, str(e), rid if isinstance(rid, (str, int)) else None))
        continue
      key = json.dumps(req.id)
      if key in first_line:
        errors.append(error_record(line_no, f"duplicate id {req.id!r} (first on line "
                                            f"{first_line[key]})", req.id))
        continue
      first_line[key] = line_no
      requests.append(req)
  return requests, errors, lines


def run(job: GenerateJob) -> dict[str, Any]:
  """Runs the job; returns the metrics (also written to job.metrics_output)."""
  job.validate()
  t_start = time.perf_counter()
  mesh = make_mesh(job.mesh) if job.mesh else None
  if mesh is not None and mesh.size == 1:
    mesh = None
  try:
    cfg, params, tokenizer = checkpoint.load_model(
        job.model, None if job.dtype == "auto" else job.dtype, mesh, cache_dir=job.cache_dir,
        quiet=not job.progress)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  load_s = time.perf_counter() - t_start
  if job.max_seq_len is not None:
    cfg = dataclasses.replace(cfg, max_seq_len=job.max_seq_len)

  requests, errors, num_lines = read_requests(job, tokenizer, cfg.vocab_size, cfg.max_seq_len)
  sparsity = parse_sparsity(job.sparsity)
  if sparsity.kind == "sinks_window" and cfg.sliding_window is not None:
    raise UserError(f"--sparsity: {job.model} already uses a sliding window "
                    f"({cfg.sliding_window}); sinks_window would replace it")
  gen = Generator(cfg, params, mesh, implementation=job.implementation,
                  steps_per_sync=job.steps_per_sync, sparsity=sparsity)
  requests.sort(key=lambda r: len(r.prompt_ids))  # similar lengths batch with little padding
  completion_tokens = 0
  t_gen = time.perf_counter()
  with open(job.output, "w", encoding="utf-8") as out:
    _write(out, errors)
    bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not job.progress,
               dynamic_ncols=True, file=sys.stderr)
    for start in range(0, len(requests), job.batch_size):
      batch = requests[start:start + job.batch_size]
      rows = [RowRequest(r.prompt_ids, r.max_new_tokens, request_key(job.seed, r.id),
                         r.temperature, r.top_k, r.top_p, r.min_p) for r in batch]

      def should_stop(i: int, tokens: list[int]) -> bool:
        stop = batch[i].stop
        return bool(stop) and any(s in tokenizer.decode(tokens) for s in stop)

      results = gen.generate(rows, should_stop)
      records = []
      for req, res in zip(batch, results):
        tokens, finished = res.tokens, res.finished_by_eos
        text = None
        if tokenizer is not None and req.stop:
          tokens, text, hit = truncate_at_stop(tokens, req.stop, tokenizer)
          finished = finished or hit
        elif tokenizer is not None:
          text = tokenizer.decode(tokens)
        rec = {"id": req.id, "line": req.line, "completion_ids": tokens}
        if text is not None:
          rec["completion"] = text
        rec.update(finish_reason="stop" if finished else "length",
                   prompt_tokens=len(req.prompt_ids), completion_tokens=len(tokens))
        if req.metadata is not None:
          rec["metadata"] = req.metadata
        completion_tokens += len(tokens)
        records.append(rec)
      _write(out, records)
      bar.update(len(batch))
      busy = gen.timings.prefill_s + gen.timings.decode_s
      bar.set_postfix(tok_s=f"{gen.timings.decode_tokens / max(busy, 1e-9):.0f}")
    bar.close()
  t_end = time.perf_counter()

  tm = gen.timings
  busy = tm.prefill_s + tm.decode_s
  metrics = {
      "num_requests": num_lines,
      "num_completed": len(requests),
      "num_failed": len(errors),
      "prompt_tokens": tm.prefill_tokens,
      "completion_tokens": completion_tokens,
      "tokens_per_second": round(completion_tokens / busy, 2) if busy else 0.0,
      "prefill_tokens_per_second": round(tm.prefill_tokens / tm.prefill_s, 2) if tm.prefill_s else 0.0,
      "decode_tokens_per_second": round(tm.decode_tokens / tm.decode_s, 2) if tm.decode_s else 0.0,
      "end_to_end_tokens_per_second": round(completion_tokens / (t_end - t_gen), 2),
      "prefill_seconds": round(tm.prefill_s, 4),
      "decode_seconds": round(tm.decode_s, 4),
      "compile_seconds": round(tm.compile_s, 3),
      "compilations": tm.compilations,
      "load_seconds": round(load_s, 3),
      "wall_seconds": round(t_end - t_start, 3),
      "batch_size": job.batch_size,
      "mesh": format_mesh(parse_mesh(job.mesh)) if job.mesh else "single-device",
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "model": job.model,
      "dtype": cfg.dtype,
      "implementation": job.implementation,
      "sparsity": str(sparsity),
  }
  if job.metrics_output:
    Path(job.metrics_output).write_text(json.dumps(metrics, indent=2) + "\n")
  return metrics
