"""The batch-generation job behind `jaxinfer generate`: JSONL in, one record per input line out.

Requests run through the continuous-batching engine (or, with scheduler="static", padded static
batches). Output is written record by record and fsync'ed (on a writer thread, in groups);
re-running the same command after a crash skips what is already written. With several processes
(jax.distributed) each takes the requests whose id hashes to it and process 0 merges the parts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxinfer import checkpoint, output
from jaxinfer.config import DTYPES
from jaxinfer.engine import Engine, EngineConfig, EngineRequest
from jaxinfer.generation import Generator, RowRequest, sample_key
from jaxinfer.kv_cache import PagedKVCache
from jaxinfer.requests import (Defaults, InvalidRequest, Request, error_record, parse_request,
                               truncate_at_stop)
from jaxinfer.sampling import validate as validate_sampling
from jaxinfer.sharding import MESH_AXES, device_bytes, format_mesh, parse_mesh
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
  batch_size: int = 8  # slots per replica (continuous) or sequences per batch (static)
  metrics_output: str | None = None
  implementation: str = "xla"
  sparsity: str = "dense"
  max_seq_len: int | None = None  # overrides the model's context (e.g. long prompts + sinks)
  scheduler: str = "continuous"
  num_samples: int = 1
  chunk_size: int = 32
  chunk_lanes: int = 4
  decode_steps: int = 8
  page_size: int = 16
  kv_pages: int | None = None
  overwrite: bool = False
  steps_per_sync: int = 32  # static scheduler and speculative decoding
  prefill_chunk: int = 512  # speculative decoding: prompt tokens per row per admission chunk
  cache_dir: str | None = None
  progress: bool = True
  # none | ngram | lookahead | recycling | draft | layerskip | medusa | hydra | eagle
  speculative: str = "none"
  draft_model: str | None = None
  draft_heads: str | None = None  # medusa, hydra, eagle: a directory written by train-draft
  num_draft_tokens: int = 4
  tree: str = "4,2,1,1"  # Token Recycling's branching per depth (DEFAULT_TREE)
  draft_layers: str | None = None  # layerskip: layers the draft keeps
  draft_fallback: float = 0.0  # draft, layerskip: Big-Little fallback confidence (0: off)
  acceptance: str = "exact"  # exact | typical
  # auto: per batch the proposer's tree, a smaller one or plain decoding, by measured speed;
  # always: the proposer's tree every batch (sampled outputs then never depend on timing)
  speculation: str = "auto"

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
    for flag in ("batch_size", "num_samples", "chunk_size", "chunk_lanes", "decode_steps",
                 "page_size", "prefill_chunk"):
      if getattr(self, flag) < 1:
        raise UserError(f"--{flag}: must be >= 1, got {getattr(self, flag)}")
    if self.kv_pages is not None and self.kv_pages < 1:
      raise UserError(f"--kv_pages: must be >= 1, got {self.kv_pages}")
    if self.max_seq_len is not None and self.max_seq_len < 2:
      raise UserError(f"--max_seq_len: must be >= 2, got {self.max_seq_len}")
    if self.defaults.max_new_tokens < 1:
      raise UserError(f"--max_new_tokens: must be >= 1, got {self.defaults.max_new_tokens}")
    if self.scheduler not in ("continuous", "static"):
      raise UserError(f"--scheduler: expected continuous or static, got {self.scheduler!r}")
    d = self.defaults
    for problem in validate_sampling(d.temperature, d.top_k, d.top_p, d.min_p):
      raise UserError(f"--{problem.split()[0]}: {problem}")
    try:
      parse_mesh(self.mesh)
      sparsity = parse_sparsity(self.sparsity)
    except ValueError as e:
      raise UserError(f"--{e}") from None
    if sparsity.dynamic and self.scheduler == "continuous":
      raise UserError(f"--sparsity: {sparsity} applies to whole-prompt prefill; use it with "
                      f"--scheduler=static (the continuous engine prefills in chunks)")
    if self.scheduler == "static" and self.num_samples > 1:
      raise UserError("--num_samples: N > 1 needs the continuous scheduler")
    if self.speculative not in SPECULATIVE:
      raise UserError(f"--speculative: expected one of {SPECULATIVE}, got {self.speculative!r}")
    if self.speculative != "none":
      if sparsity.dynamic:
        raise UserError(f"--sparsity: {sparsity} is not combinable with --speculative (its "
                        f"pattern needs whole-prompt prefill); sinks_window is")
      if self.num_draft_tokens < 1:
        raise UserError(f"--num_draft_tokens: must be >= 1, got {self.num_draft_tokens}")
      if self.acceptance not in ("exact", "typical"):
        raise UserError(f"--acceptance: expected exact or typical, got {self.acceptance!r}")
      if self.speculation not in ("auto", "always"):
        raise UserError(f"--speculation: expected auto or always, got {self.speculation!r}")
      if (self.speculative == "draft") != (self.draft_model is not None):
        raise UserError("--draft_model: needed with --speculative=draft, and only then")
      if (self.speculative in HEADS) != (self.draft_heads is not None):
        raise UserError("--draft_heads: needed with --speculative=medusa, hydra or eagle, and "
                        "only then")
      try:
        if self.tree.startswith("dynamic"):
          if self.speculative != "eagle":
            raise ValueError("--tree: dynamic trees are grown by the EAGLE draft "
                             "(--speculative=eagle)")
          dynamic_tree(self.tree)
        elif self.tree.startswith("nodes:"):
          if self.speculative not in ("medusa", "hydra", "lookahead"):
            raise ValueError("--tree: nodes:N re-grows the static tree of Medusa or Hydra heads "
                             "(--speculative=medusa|hydra) or sizes the lookahead trie")
          tree_nodes(self.tree)
        elif self.speculative == "lookahead" and self.tree != DEFAULT_TREE:
          raise ValueError("--tree: the lookahead trie takes nodes:N")
        else:
          tree_branching(self.tree)
        if self.draft_layers:
          _int_list(self.draft_layers)
        if not 0.0 <= self.draft_fallback <= 1.0:
          raise ValueError(f"--draft_fallback: must be in [0, 1], got {self.draft_fallback}")
        if self.draft_fallback and self.speculative not in ("draft", "layerskip"):
          raise ValueError("--draft_fallback: Big-Little's fallback applies to a draft model "
                           "(--speculative=draft|layerskip)")
      except ValueError as e:
        raise UserError(str(e)) from None
    from jaxinfer import attention
    if self.implementation not in attention.IMPLEMENTATIONS:
      raise UserError(f"--implementation: expected one of {sorted(attention.IMPLEMENTATIONS)}, "
                      f"got {self.implementation!r}")


SPECULATIVE = ("none", "ngram", "lookahead", "recycling", "draft", "layerskip", "medusa",
               "hydra", "eagle")
DEFAULT_TREE = "4,2,1,1"
LOOKAHEAD_NODES = 16
HEADS = ("medusa", "hydra", "eagle")  # proposers served from --draft_heads


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--draft_layers: expected comma-separated integers, got {text!r}") from None


DYNAMIC_TREE = (16, 4, 5)  # nodes, top-k, depth


def dynamic_tree(text: str) -> tuple[int, int, int]:
  """`dynamic` or `dynamic:NODES,TOPK,DEPTH` -> (nodes, top_k, depth)."""
  if text == "dynamic":
    return DYNAMIC_TREE
  head, _, spec = text.partition(":")
  try:
    nodes, top_k, depth = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"--tree: expected dynamic or dynamic:NODES,TOPK,DEPTH, got {text!r}"
                     ) from None
  if head != "dynamic":
    raise ValueError(f"--tree: expected dynamic or dynamic:NODES,TOPK,DEPTH, got {text!r}")
  from jaxinfer.speculative.dynamic_tree import check_shape
  try:
    check_shape(nodes, top_k, depth)
  except ValueError as e:
    raise ValueError(f"--tree: {text!r}: {e}") from None
  return nodes, top_k, depth


def tree_nodes(text: str) -> int:
  """`nodes:N` -> N."""
  try:
    n = int(text.partition(":")[2])
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"--tree: expected nodes:N with N >= 1, got {text!r}")
  return n


def tree_branching(text: str) -> tuple[int, ...]:
  try:
    branching = tuple(int(x) for x in text.split(","))
  except ValueError:
    branching = ()
  if not branching or any(k < 1 for k in branching):
    raise ValueError(f"--tree: expected children per depth, e.g. 4,2,1,1; got {text!r}")
  return branching


def _max_nodes(accuracy) -> int:
  """Nodes in the full tree of K heads and `top` ranks each."""
  k, top = accuracy.shape
  return sum(top**d for d in range(1, k + 1))


def make_proposer(job: "GenerateJob", cfg, params, dtype):
  """(proposer, draft params) for job.speculative."""
  from jaxinfer.speculative import proposers as P
  if job.speculative == "ngram":
    return P.NGram(num_draft_tokens=job.num_draft_tokens), None
  if job.speculative == "lookahead":
    nodes = tree_nodes(job.tree) if job.tree.startswith("nodes:") else LOOKAHEAD_NODES
    return P.Lookahead(num_nodes=nodes, depth=job.num_draft_tokens), None
  if job.speculative == "recycling":
    return P.Recycling(branching=tree_branching(job.tree)), None
  if job.speculative == "layerskip":
    keep = (_int_list(job.draft_layers) if job.draft_layers
            else tuple(range(max(1, cfg.num_layers // 2))))
    try:
      dcfg, dparams = P.layer_skip_draft(cfg, params, keep)
    except ValueError as e:
      raise UserError(f"--draft_layers: {e}") from None
    return P.DraftModel(dcfg, num_draft_tokens=job.num_draft_tokens, name="layerskip",
                        fallback=job.draft_fallback), dparams
  if job.speculative in ("medusa", "hydra"):
    from jaxinfer.draft_heads import hydra, medusa
    lib = medusa if job.speculative == "medusa" else hydra
    try:
      heads, info = (medusa.load(job.draft_heads, cfg.jnp_dtype) if lib is medusa
                     else hydra.load(job.draft_heads, cfg.jnp_dtype, cfg))
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"--draft_heads: {e}") from None
    if (info["vocab_size"], info["hidden_size"]) != (cfg.vocab_size, cfg.embed):
      raise UserError(f"--draft_heads: heads for vocabulary {info['vocab_size']} / hidden "
                      f"{info['hidden_size']}, the model has {cfg.vocab_size} / "
                      f"{cfg.embed}")
    paths = tuple(tuple(p) for p in info["tree"])
    # the heads' measured accuracies: they re-grow the tree (--tree=nodes:N) and rank the paths
    # a smaller tree keeps
    acc = info.get("accuracy_topk")
    acc = None if acc is None else tuple(tuple(float(a) for a in row) for row in acc)
    if job.tree.startswith("nodes:"):
      accuracy = np.asarray(info["accuracy_topk"])
      paths = tuple(medusa.build_tree(accuracy, min(tree_nodes(job.tree),
                                                    _max_nodes(accuracy))))
    if lib is medusa:
      return P.Medusa(paths=paths, accuracy=acc), heads
    return P.Hydra(paths=paths, prefix=None if heads.prefix is None
                   else hydra.prefix_config(cfg), accuracy=acc), heads
  if job.speculative == "eagle":
    from jaxinfer.draft_heads import eagle
    try:
      draft, vocab, _ = eagle.load(job.draft_heads, cfg, cfg.jnp_dtype)
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"--draft_heads: {e}") from None
    heads = eagle.serving_heads(draft, params, vocab)
    if job.tree.startswith("dynamic"):
      from jaxinfer.speculative.dynamic_tree import EagleTree
      nodes, top_k, depth = dynamic_tree(job.tree)
      return EagleTree(eagle.draft_config(cfg), num_nodes=nodes, top_k=top_k,
                       depth=depth), heads
    return P.Eagle(eagle.draft_config(cfg), num_draft_tokens=job.num_draft_tokens), heads
  try:
    dcfg, dparams, _ = checkpoint.load_model(job.draft_model, dtype, quiet=True)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"--draft_model: {e}") from None
  if dcfg.vocab_size != cfg.vocab_size:
    raise UserError(f"--draft_model: its vocabulary ({dcfg.vocab_size}) differs from the "
                    f"model's ({cfg.vocab_size})")
  return P.DraftModel(dcfg, num_draft_tokens=job.num_draft_tokens,
                      fallback=job.draft_fallback), dparams


def read_requests(job: GenerateJob, tokenizer, vocab_size: int, max_seq_len: int,
                  chat=None) -> tuple[list[Request], list[dict[str, Any]], int]:
  """(valid requests, error records, number of request lines). Blank lines are not requests.
  `chat`: the model's chat template, for conversation prompts."""
  requests, errors, first_line = [], [], {}
  lines = 0
  with open(job.prompts, encoding="utf-8", errors="replace") as f:
    for line_no, text in enumerate(f, start=1):
      if not text.strip():
        continue
      lines += 1
      try:
        req = parse_request(line_no, text, job.defaults, tokenizer, vocab_size, max_seq_len,
                            chat)
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


def _owner(record_key: tuple, num_processes: int) -> int:
  return zlib.crc32(repr(record_key).encode()) % num_processes


def _sample_record(tokens: list[int], eos: bool, stop: tuple[str, ...], tokenizer) -> dict:
  finished = eos
  text = None
  if tokenizer is not None and stop:
    tokens, text, hit = truncate_at_stop(tokens, stop, tokenizer)
    finished = finished or hit
  elif tokenizer is not None:
    text = tokenizer.decode(tokens)
  rec: dict[str, Any] = {"completion_ids": tokens}
  if text is not None:
    rec["completion"] = text
  rec.update(finish_reason="stop" if finished else "length", completion_tokens=len(tokens))
  return rec


def make_record(req: Request, samples: list[tuple[list[int], bool]], tokenizer) -> dict:
  rec: dict[str, Any] = {"id": req.id, "line": req.line}
  parts = [_sample_record(t, eos, req.stop, tokenizer) for t, eos in samples]
  if len(parts) == 1:
    rec.update(parts[0])
  else:
    rec["samples"] = parts
  rec["prompt_tokens"] = len(req.prompt_ids)
  if req.metadata is not None:
    rec["metadata"] = req.metadata
  return rec


def _init_distributed(coordinator_address, num_processes, process_id, auto) -> tuple[int, int]:
  if coordinator_address is None and not auto:
    if num_processes not in (None, 1):
      raise UserError("--num_processes: a multi-process run needs --coordinator_address (or "
                      "--distributed on a TPU pod)")
    return 0, 1
  # Cross-process barriers on CPU need a collectives library (no effect on accelerators).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if auto:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
  except Exception as e:  # the runtime's own message says what is wrong (address, timeout, ...)
    raise UserError(f"--coordinator_address: jax.distributed could not start: {e}") from None
  return jax.process_index(), jax.process_count()


def _replica_meshes(mesh_spec: str) -> list[jax.sharding.Mesh]:
  """One (1, fsdp, model) mesh per data-parallel replica, over this process's devices."""
  local = jax.local_devices()
  shape = parse_mesh(mesh_spec) if mesh_spec else {"data": len(local), "fsdp": 1, "model": 1}
  r, f, m = (shape[a] for a in MESH_AXES)
  grid = np.asarray(local[:r * f * m], dtype=object).reshape(r, 1, f, m)
  return [jax.sharding.Mesh(grid[i], MESH_AXES) for i in range(r)]


def _bytes_limit(mesh) -> int | None:
  """Memory of the mesh's first device (the reference for every one of a replica's devices), or
  None where the backend does not say (CPU)."""
  device = mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0]
  stats = getattr(device, "memory_stats", lambda: None)()
  return stats.get("bytes_limit") if stats else None


def _check_memory(what: str, kv_bytes: int, kv_device_bytes: int, params, mesh,
                  fix: str) -> None:
  """Refuses KV memory (kv_bytes in all, kv_device_bytes on one device of the mesh) that cannot
  fit on a device beside its shards of the weights, saying how much it needs and which flags
  size it."""
  limit = _bytes_limit(mesh)
  if not limit:
    return
  per_device = kv_device_bytes + device_bytes(params)
  if per_device > 0.95 * limit:
    raise UserError(f"{what}, {kv_bytes / 2**30:.2f} GiB) plus weights need "
                    f"{per_device / 2**30:.2f} GiB per device, more than its "
                    f"{limit / 2**30:.2f} GiB; {fix}")


def run(job: GenerateJob, *, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        distributed: bool = False) -> dict[str, Any]:
  """Runs the job; returns this run's metrics (also written to job.metrics_output)."""
  job.validate()
  pid, nproc = _init_distributed(coordinator_address, num_processes, process_id, distributed)
  shape = parse_mesh(job.mesh)
  if job.mesh and np.prod([shape[a] for a in MESH_AXES]) > jax.local_device_count():
    raise UserError(f"--mesh: {format_mesh(shape)} needs {np.prod(list(shape.values()))} "
                    f"devices, but this process has {jax.local_device_count()}")
  t_start = time.perf_counter()
  speculative = job.speculative != "none"  # (its own batching; replicas with --mesh=data:N)
  meshes = (_replica_meshes(job.mesh) if (job.scheduler == "continuous" and not speculative)
            or (speculative and job.mesh) else [])
  static_mesh = None
  if job.scheduler == "static" and not speculative and job.mesh:
    from jaxinfer.sharding import make_mesh
    static_mesh = make_mesh(job.mesh, jax.local_devices())
  try:
    cfg, params, tokenizer = checkpoint.load_model(
        job.model, None if job.dtype == "auto" else job.dtype,
        meshes[0] if meshes else static_mesh, cache_dir=job.cache_dir, quiet=not job.progress)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  if job.max_seq_len is not None:
    cfg = dataclasses.replace(cfg, max_seq_len=job.max_seq_len)
  sparsity = parse_sparsity(job.sparsity)
  if sparsity.kind == "sinks_window" and cfg.sliding_window is not None:
    raise UserError(f"--sparsity: {job.model} already uses a sliding window "
                    f"({cfg.sliding_window}); sinks_window would replace it")
  load_s = time.perf_counter() - t_start

  from jaxinfer.chat import ChatTemplate
  chat = (ChatTemplate.from_dir(checkpoint.resolve_model_dir(job.model, job.cache_dir, True))
          if tokenizer is not None else None)
  requests, errors, num_lines = read_requests(job, tokenizer, cfg.vocab_size, cfg.max_seq_len,
                                              chat)
  part = output.part_path(job.output, pid, nproc) if nproc > 1 else Path(job.output)
  if job.overwrite and pid == 0:
    for p in [Path(job.output)] + [output.part_path(job.output, i, nproc) for i in range(nproc)]:
      p.unlink(missing_ok=True)
  done = set() if job.overwrite else {output.record_key(r) for r in
                                      output.completed(job.output, nproc, repair_part=pid)}
  key_of = lambda r: output.record_key({"id": r.id, "line": r.line})
  err_key = output.record_key
  mine = lambda k: _owner(k, nproc) == pid
  skipped = sum(1 for r in requests if key_of(r) in done) + sum(
      1 for e in errors if err_key(e) in done)
  todo = [r for r in requests if key_of(r) not in done and mine(key_of(r))]
  my_errors = [e for e in errors if err_key(e) not in done and mine(err_key(e))]

  # the engines' pools, speculative decoding's proposer and trees, and the memory each needs,
  # are checked before the output is touched
  if speculative:
    replicas = _speculative_generators(job, cfg, params, meshes, todo, sparsity)
  elif job.scheduler == "continuous":
    replicas = _engines(job, cfg, params, meshes, todo, sparsity)
  writer = output.RecordWriter(part)
  writer.write(my_errors)
  bar = tqdm(total=len(todo), desc="generate", unit="req", disable=not job.progress,
             dynamic_ncols=True, file=sys.stderr)
  t_gen = time.perf_counter()
  try:
    if speculative:
      stats = _run_speculative(job, replicas, tokenizer, todo, writer, bar)
    elif job.scheduler == "continuous":
      stats = _run_engine(job, replicas, tokenizer, todo, writer, bar)
    else:
      stats = _run_static(job, cfg, params, tokenizer, static_mesh, todo, writer, bar, sparsity)
  finally:  # whatever was completed reaches the disk, even when generation fails
    bar.close()
    writer.close()
  t_end = time.perf_counter()

  merged = None
  if nproc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxinfer_generate_done")
    if pid == 0:
      merged = output.merge_parts(job.output, nproc)
    multihost_utils.sync_global_devices("jaxinfer_generate_merged")

  busy = stats["busy_s"]
  metrics = {
      "num_requests": num_lines,
      "num_completed": len(todo),
      "num_skipped_already_done": skipped,
      "num_failed": len(errors),
      "num_samples": job.num_samples,
      "prompt_tokens": int(sum(len(r.prompt_ids) for r in todo)),
      "completion_tokens": stats["completion_tokens"],
      "tokens_per_second": round(stats["completion_tokens"] / busy, 2) if busy else 0.0,
      "prefill_tokens_per_second": stats["prefill_tps"],
      "decode_tokens_per_second": stats["decode_tps"],
      "end_to_end_tokens_per_second": round(stats["completion_tokens"] / (t_end - t_gen), 2),
      # wall time of generation minus compilation: host scheduling included
      "generation_tokens_per_second": round(
          stats["completion_tokens"] / max(t_end - t_gen - stats["compile_s"], 1e-9), 2),
      "prefill_tokens_computed": stats["prefill_tokens"],
      "prefill_tokens_saved": stats.get("prefill_saved", 0),
      "mean_slot_occupancy": stats.get("occupancy", 1.0),
      "kv_pages_used_peak": stats.get("peak_pages"),
      "kv_pages_pool": stats.get("pool_pages"),
      "steps": stats["steps"],
      "dispatches": stats.get("dispatches"),
      "decode_tokens_discarded": stats.get("decode_tokens_discarded"),
      "compile_seconds": round(stats["compile_s"], 3),
      "compilations": stats["compilations"],
      # beyond the fixed shapes (continuous: decode-only + lane lengths per engine; static: one
      # per bucket it met)
      "recompilations": max(0, stats["compilations"] - stats["expected_compilations"]),
      "load_seconds": round(load_s, 3),
      "wall_seconds": round(t_end - t_start, 3),
      "scheduler": job.scheduler,
      "replicas": stats["replicas"],
      "batch_size": job.batch_size,
      "mesh": format_mesh(parse_mesh(job.mesh)) if job.mesh else "default",
      "processes": nproc,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "model": job.model,
      "dtype": cfg.dtype,
      "implementation": job.implementation,
      "sparsity": str(sparsity),
  }
  for key in ("mean_accepted_tokens", "accepted_length_histogram", "per_depth_acceptance",
              "verify_steps", "host_syncs", "prefill_chunks", "speculation",
              "speculative_batches", "plain_batches", "tree_sizes", "draft_verify_split"):
    if key in stats:
      metrics[key] = stats[key]
  if job.speculative != "none":
    metrics["speculative"] = job.speculative
    metrics["acceptance"] = job.acceptance
  if merged is not None:
    metrics["records_in_output"] = merged
  if job.metrics_output and pid == 0:
    Path(job.metrics_output).write_text(json.dumps(metrics, indent=2) + "\n")
  return metrics


def _hits_stop(req: Request, tokens: list[int], tokenizer) -> bool:
  """Whether the text of `tokens` contains one of the request's stop strings (checked by the
  generators between chunks; the record is cut there by make_record)."""
  return bool(req.stop) and any(s in tokenizer.decode(tokens) for s in req.stop)


class _Records:
  """Gathers each request's N samples as they finish (in any order, from any thread) and writes
  its record once all are in."""

  def __init__(self, num_samples: int, tokenizer, writer: output.RecordWriter, bar):
    self.n, self.tokenizer, self.writer, self.bar = num_samples, tokenizer, writer, bar
    self.completion_tokens = 0
    self._pending: dict[int, dict[int, tuple[list[int], bool]]] = {}
    self._lock = threading.Lock()

  def add(self, req: Request, k: int, tokens: list[int], eos: bool) -> bool:
    """Sample k of `req`; True when that completed (and wrote) the request's record."""
    with self._lock:
      got = self._pending.setdefault(id(req), {})
      got[k] = (tokens, eos)
      if len(got) < self.n:
        return False
      del self._pending[id(req)]
      record = make_record(req, [got[j] for j in range(self.n)], self.tokenizer)
      self.completion_tokens += sum(s["completion_tokens"]
                                    for s in record.get("samples", [record]))
      self.writer.write([record])
      self.bar.update(1)
      return True

  def complete(self) -> bool:
    return not self._pending


def _engines(job, cfg, params, meshes, todo, sparsity) -> list:
  """One engine per replica, its KV pool checked against the device and the longest request."""
  max_len = max([len(r.prompt_ids) + r.max_new_tokens for r in todo] + [2])
  ecfg = EngineConfig(num_slots=job.batch_size, chunk_size=job.chunk_size,
                      chunk_lanes=job.chunk_lanes, page_size=job.page_size,
                      kv_pages=job.kv_pages, decode_steps=job.decode_steps)
  engines = []
  for mesh in meshes:
    engines.append(Engine(cfg, _on_replica(params, mesh, meshes), ecfg, max_len, mesh,
                          implementation=job.implementation, sparsity=sparsity))
  for eng in engines:
    _check_memory(f"--kv_pages: the KV pool ({eng.num_pool_pages} pages of {job.page_size} "
                  f"tokens", eng.pool_bytes(), device_bytes((eng.k, eng.v)), eng.params,
                  eng.mesh,
                  "lower --kv_pages or --batch_size")
  pages_needed = max([-(-(len(r.prompt_ids) + r.max_new_tokens) // job.page_size) for r in todo]
                     + [1])
  if pages_needed > engines[0].num_pool_pages:
    need = PagedKVCache.pool_bytes(cfg, pages_needed, job.page_size)
    raise UserError(f"--kv_pages: the longest request needs {pages_needed} KV pages "
                    f"({need / 2**20:.1f} MiB) but the pool holds {engines[0].num_pool_pages}; "
                    f"raise --kv_pages to at least {pages_needed} or lower --max_new_tokens")
  return engines


def _run_engine(job, engines, tokenizer, todo, writer, bar) -> dict:
  n = job.num_samples
  # Engine requests: N samples per record, sorted by prompt so sharers run together.
  by_uid: dict[int, tuple[Request, int]] = {}
  ereqs = []
  for i, req in enumerate(todo):
    for k in range(n):
      uid = i * n + k
      by_uid[uid] = (req, k)
      key = np.asarray(jax.random.key_data(sample_key(job.seed, req.id, k)))
      ereqs.append(EngineRequest(uid, req.prompt_ids, req.max_new_tokens, key, req.temperature,
                                 req.top_k, req.top_p, req.min_p))
  ereqs.sort(key=lambda e: (e.prompt_ids, e.uid))
  shares = _split_by_tokens(ereqs, len(engines))

  records = _Records(n, tokenizer, writer, bar)

  def on_result(res):
    req, k = by_uid[res.uid]
    if records.add(req, k, res.tokens, res.finished_by_eos):
      busy = sum(e.stats.busy_s for e in engines)
      bar.set_postfix(tok_s=f"{records.completion_tokens / max(busy, 1e-9):.0f}")

  def should_stop(uid, tokens):
    return _hits_stop(by_uid[uid][0], tokens, tokenizer)

  _in_threads(lambda engine, share: engine.run(share, on_result, should_stop),
              list(zip(engines, shares)))
  st = [e.stats for e in engines]
  busy = max(s.busy_s for s in st)
  prefill = sum(s.prefill_tokens for s in st)
  mixed = max(s.mixed_busy_s for s in st)
  pure = max(s.decode_busy_s for s in st)
  return {
      "busy_s": busy, "completion_tokens": records.completion_tokens,
      "prefill_tokens": prefill, "prefill_saved": sum(s.prefill_tokens_saved for s in st),
      "prefill_tps": round(sum(s.lane_tokens for s in st) / mixed, 2) if mixed else 0.0,
      "decode_tps": round(sum(s.pure_decode_tokens for s in st) / pure, 2) if pure else 0.0,
      "occupancy": round(float(np.mean([s.mean_occupancy for s in st])), 4),
      "peak_pages": max(s.peak_pages for s in st), "pool_pages": st[0].pool_pages,
      "steps": sum(s.steps for s in st), "dispatches": sum(s.dispatches for s in st),
      "decode_tokens_discarded": sum(s.decode_tokens_discarded for s in st),
      "compile_s": sum(s.compile_s for s in st),
      "compilations": sum(s.compilations for s in st), "replicas": len(engines),
      "expected_compilations": sum(e.max_shapes for e in engines),
  }


def _in_threads(fn, jobs: list[tuple]) -> None:
  """fn(*job) for every job, each in a thread of its own (one per replica); the first failure
  is raised once all have finished."""
  failures = []

  def work(*args):
    try:
      fn(*args)
    except Exception as e:  # surfaced after the other replicas finish
      failures.append(e)

  threads = [threading.Thread(target=work, args=job) for job in jobs]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failures:
    raise failures[0]


def _on_replica(params, mesh, meshes):
  """params (placed on meshes[0]) on replica `mesh`, with the same partitioning."""
  if mesh is meshes[0]:
    return params
  return jax.device_put(params, jax.tree_util.tree_map(
      lambda x: jax.sharding.NamedSharding(mesh, x.sharding.spec), params))


def _split_by_tokens(reqs: list, parts: int, request=lambda r: r) -> list[list]:
  """Contiguous shares of a sorted list with about equal prompt + output tokens each
  (`request(item)`: the item's request)."""
  if parts == 1:
    return [reqs]
  cost = np.cumsum([len(request(r).prompt_ids) + request(r).max_new_tokens for r in reqs])
  total = cost[-1] if len(cost) else 0
  cuts = [int(np.searchsorted(cost, total * (i + 1) / parts)) for i in range(parts - 1)]
  bounds = [0] + cuts + [len(reqs)]
  return [reqs[bounds[i]:bounds[i + 1]] for i in range(parts)]


def _run_static(job, cfg, params, tokenizer, mesh, todo, writer, bar, sparsity) -> dict:
  gen = Generator(cfg, params, mesh, implementation=job.implementation,
                  steps_per_sync=job.steps_per_sync, sparsity=sparsity)
  todo = sorted(todo, key=lambda r: len(r.prompt_ids))  # similar lengths pad little
  completion = 0
  for start in range(0, len(todo), job.batch_size):
    batch = todo[start:start + job.batch_size]
    rows = [RowRequest(r.prompt_ids, r.max_new_tokens, sample_key(job.seed, r.id, 0),
                       r.temperature, r.top_k, r.top_p, r.min_p) for r in batch]

    def should_stop(i: int, tokens: list[int]) -> bool:
      return _hits_stop(batch[i], tokens, tokenizer)

    results = gen.generate(rows, should_stop)
    records = [make_record(r, [(res.tokens, res.finished_by_eos)], tokenizer)
               for r, res in zip(batch, results)]
    completion += sum(rec["completion_tokens"] for rec in records)
    writer.write(records)
    bar.update(len(batch))
  return _generator_stats(gen.timings, completion)


def _generator_stats(tm, completion: int) -> dict:
  return {
      "busy_s": tm.prefill_s + tm.decode_s, "completion_tokens": completion,
      "prefill_tokens": tm.prefill_tokens,
      "prefill_tps": round(tm.prefill_tokens / tm.prefill_s, 2) if tm.prefill_s else 0.0,
      "decode_tps": round(tm.decode_tokens / tm.decode_s, 2) if tm.decode_s else 0.0,
      "occupancy": round(tm.decode_tokens / tm.row_steps, 4) if tm.row_steps else 0.0,
      "steps": tm.decode_steps, "compile_s": tm.compile_s, "compilations": tm.compilations,
      "replicas": 1,
      "expected_compilations": tm.compilations,
  }


# Continuous speculative batching hands each batch of this many x --batch_size requests to the
# speculative generator (its slots refilled as rows finish), but a mode's first (compiling)
# batch is --batch_size requests; the policy picks the tree size or plain decoding per batch.
SPECULATIVE_WAVE = 8


def _speculative_generators(job, cfg, params, meshes, todo, sparsity) -> list:
  """One SpeculativeGenerator per replica (--mesh=data:N: N replicas, each on one device or
  sharded over its fsdp / model devices), their proposer built, their memory checked against
  the job's longest request and (continuous) their slots sized for it."""
  from jaxinfer.speculative.decode import SpeculativeGenerator
  continuous = job.scheduler == "continuous"
  proposer, draft_params = make_proposer(job, cfg, params, None if job.dtype == "auto"
                                         else job.dtype)
  gens = []
  for mesh in meshes or [None]:
    dparams = (draft_params if mesh is None or draft_params is None  # replicated on a replica
               else jax.device_put(draft_params, jax.sharding.NamedSharding(
                   mesh, jax.sharding.PartitionSpec())))
    try:
      gens.append(SpeculativeGenerator(
          cfg, params if mesh is None else _on_replica(params, mesh, meshes), proposer,
          draft_params=dparams, rule=job.acceptance, implementation=job.implementation,
          steps_per_sync=job.steps_per_sync, page_size=job.page_size,
          prefill_chunk=job.prefill_chunk, num_slots=job.batch_size if continuous else None,
          policy=job.speculation,
          sparsity=sparsity, mesh=mesh, engine_config=EngineConfig(
              num_slots=job.batch_size, chunk_size=job.chunk_size,
              chunk_lanes=job.chunk_lanes, page_size=job.page_size, kv_pages=job.kv_pages,
              decode_steps=job.decode_steps)))
    except ValueError as e:  # e.g. a tree larger than the model's sliding window
      raise UserError(f"--speculative={job.speculative} (--tree / --num_draft_tokens): "
                      f"{e}") from None
  longest = (max(len(r.prompt_ids) for r in todo), max(r.max_new_tokens for r in todo)) \
      if todo else (0, 0)
  if todo:
    for gen in gens:
      what = (f"--batch_size: speculative decoding's KV memory ({job.batch_size} rows of up "
              f"to {sum(longest)} tokens, the proposer's caches, the plain-decoding pool")
      _check_memory(what, gen.memory_bytes(*longest, job.batch_size),
                    gen.memory_bytes(*longest, job.batch_size, per_device=True), gen.params,
                    gen.mesh, "lower --batch_size or --max_new_tokens")
      if continuous:  # one slot geometry for the whole job: compiled once
        gen.reserve(*longest)
  return gens


def _run_speculative(job, gens, tokenizer, todo, writer, bar) -> dict:
  """Speculative decoding: with --scheduler=continuous, --batch_size slots refilled as rows
  finish (records written as they complete); with static, batches of --batch_size rows. With
  several replicas, every one with its share of the rows (in a thread of its own, as the
  engine's replicas run)."""
  from jaxinfer.speculative.decode import SpecStats
  continuous = job.scheduler == "continuous"
  n = job.num_samples
  # continuous: sorted by prompt, so rows sharing a prefix run close together (reusing its
  # K/V); static: by length, so that a batch's rows pad little
  todo = sorted(todo, key=(lambda r: r.prompt_ids) if continuous else
                (lambda r: len(r.prompt_ids)))
  rows = [(req, k) for req in todo for k in range(n)]
  wave = job.batch_size * (SPECULATIVE_WAVE if continuous else 1)
  records = _Records(n, tokenizer, writer, bar)

  def work(gen, share):
    start = 0
    while start < len(share):
      # a mode's first batch compiles its steps: one batch; measured batches and the rest are
      # long waves (slots refilled for longer between decisions, as the job will run them)
      size = job.batch_size if gen.compiling_next else wave
      batch = share[start:start + size]
      start += size
      reqs = [RowRequest(r.prompt_ids, r.max_new_tokens, sample_key(job.seed, r.id, k),
                         r.temperature, r.top_k, r.top_p, r.min_p) for r, k in batch]

      def should_stop(i: int, tokens: list[int], batch=batch) -> bool:
        return _hits_stop(batch[i][0], tokens, tokenizer)

      gen.generate(reqs, should_stop, on_result=lambda i, res, batch=batch: records.add(
          *batch[i], res.tokens, res.finished_by_eos))

  # static: rows dealt round-robin, so every replica gets a like mix of lengths; continuous:
  # contiguous shares of about equal tokens, so that sharers of a prefix meet on one replica
  if continuous:
    shares = _split_by_tokens(rows, len(gens), request=lambda row: row[0])
  else:
    shares = [rows[i::len(gens)] for i in range(len(gens))]
  _in_threads(work, list(zip(gens, shares)))
  assert records.complete(), "every sample of every request is delivered"
  tms = [g.timings for g in gens]
  stats = _generator_stats(dataclasses.replace(  # replicas run side by side: the longest time
      tms[0], prefill_s=max(t.prefill_s for t in tms), decode_s=max(t.decode_s for t in tms),
      **{f: sum(getattr(t, f) for t in tms) for f in (
          "compile_s", "prefill_tokens", "decode_tokens", "compilations", "decode_steps",
          "row_steps")}), records.completion_tokens)
  stats["busy_s"] = max(t.prefill_s + t.decode_s for t in tms)
  stats["replicas"] = len(gens)
  stats["prefill_saved"] = sum(g.stats.prefill_tokens_saved for g in gens)
  return stats | SpecStats.merge([g.stats for g in gens]).metrics()
