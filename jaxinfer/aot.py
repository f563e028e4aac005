"""Ahead-of-time compilation of the engine's steps for hardware that is not here.

A TPU target ("tpu:v5e:2x4") is compiled by libtpu's compile-only client for the named topology
(no TPU needed); `compiled.memory_analysis()` then says what one device holds while a step runs.
A CUDA target is lowered only: compiling for a GPU needs the GPU.

Shapes only: the parameters are `jax.ShapeDtypeStruct`s laid out by the model's ParamSpecs over a
mesh of the target's devices, so no weights are read. The steps are the engine's own
(`engine_step`: S decode rows beside G lanes of Q prompt tokens; `engine_decode`: decode-only
steps in one dispatch) and speculative decoding's verification steps, jitted as the engine jits
them (aot_steps.py). With `--mesh=data:N` every replica is the same
program on its own devices, so one replica is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer import compilation_cache
from jaxinfer.checkpoint import is_embedded
from jaxinfer.aot_steps import (CompileError, check_speculative, engine_steps,
                                engine_tree_steps, params_shapes, proposer_for, whole_on)
from jaxinfer.config import DTYPES, PRESETS, ModelConfig
from jaxinfer.engine.engine import EngineConfig
from jaxinfer.options import ignored_chunk_option
from jaxinfer.runtime import Runtime
from jaxinfer.sharding import MESH_AXES, device_bytes, format_mesh, parse_mesh
from jaxinfer.sparsity import parse as parse_sparsity, window_conflict
from pallas_kernels.common import gpu_target

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip
GIB = 2**30
# proposers compile builds without trained weights (EAGLE: its draft layer by shape)
SPECULATIVE = ("none", "ngram", "lookahead", "recycling", "layerskip", "eagle")


class StepFailed(RuntimeError):
  """The compiler refused a step for a reason other than memory (its message follows)."""


@dataclasses.dataclass(frozen=True)
class CompileJob:
  target: str  # tpu:GEN:TOPOLOGY (e.g. tpu:v5e:2x4) or cuda
  model: str = "embedded"  # preset:NAME, embedded[:RECIPE], or a directory with a config.json
  dtype: str = "auto"
  mesh: str = ""  # empty: every device on `data`
  batch_size: int = 8  # slots per replica
  kv_pages: int | None = None  # None: the engine's default for batch_size x max_seq_len
  page_size: int = 16
  chunk_size: int = 32
  chunk_lanes: int = 4
  decode_steps: int = 8
  max_seq_len: int | None = None  # None: the model's
  implementation: str = "xla"
  sparsity: str = "dense"
  speculative: str = "none"
  num_draft_tokens: int = 4
  tree: str = "4,2,1,1"
  draft_layers: str | None = None
  quantize: str | None = None  # a weight format (int8, int4:g128, fp8_e4m3, ...): served quantized
  quantize_include: tuple[str, ...] = ()  # with quantize: embed, lm_head, norm besides
  kv_cache_dtype: str | None = None  # int8: the engine's KV pages quantized

  @property
  def engine_config(self) -> EngineConfig:
    return EngineConfig(num_slots=self.batch_size, chunk_size=self.chunk_size,
                        chunk_lanes=self.chunk_lanes, page_size=self.page_size,
                        kv_pages=self.kv_pages, decode_steps=self.decode_steps,
                        kv_cache_dtype=self.kv_cache_dtype)


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str  # "tpu" or "cuda"
  topology: str | None = None  # libtpu's name, e.g. "v5e:2x4"

  @property
  def generation(self) -> str | None:
    return None if self.topology is None else self.topology.split(":")[0]

  def __str__(self) -> str:
    return self.platform if self.topology is None else f"tpu:{self.topology}"


def parse_target(text: str) -> Target:
  if text == "cuda":
    return Target("cuda")
  platform, _, topology = text.partition(":")
  gen = topology.split(":")[0]
  if platform != "tpu" or gen not in HBM_GIB or ":" not in topology:
    raise CompileError(f"--target: expected tpu:GEN:TOPOLOGY with GEN one of "
                       f"{', '.join(HBM_GIB)} (e.g. tpu:v5e:2x4), or cuda; got {text!r}")
  if gen in ("v5e", "v6e") and topology.count("x") != 1:  # (libtpu takes 2x2x2 and lays it out)
    raise CompileError(f"--target: {gen} slices are two-dimensional (e.g. tpu:{gen}:2x4), got "
                       f"{text!r}")
  return Target("tpu", topology)


def prepare_host(target: Target, mesh: str) -> None:
  """Before JAX's first computation: the host computes on its CPU (the target is compiled for,
  never run), libtpu asks no metadata server, and a CUDA target's mesh gets that many host
  devices to be laid out over (lowering needs devices; any will do). The compile-only client
  holds no chip, so it does not take libtpu's one-process lock (another JAX program on this
  host may hold it)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax.config.update("jax_platforms", "cpu")
  if target.platform == "cuda":
    with contextlib.suppress(RuntimeError, ValueError):  # already started / a bad mesh (later)
      shape = parse_mesh(mesh)
      jax.config.update("jax_num_cpu_devices", math.prod(shape.values()))


@contextlib.contextmanager
def _quiet_stderr():
  """libtpu writes start-up warnings (no metadata server, no TPU host here) straight to file
  descriptor 2; they say nothing about the target."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def target_devices(target: Target) -> list:
  """The target's devices: a compile-only TPU topology, or (CUDA) the host's CPU devices."""
  if target.platform == "cuda":
    return jax.devices("cpu")
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError(f"--target={target}: compiling for TPU needs libtpu: "
                       f"pip install -e \".[tpu-aot]\"")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies
  try:
    with _quiet_stderr():
      topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                          **_slice_options(target.topology))
  except Exception as e:  # libtpu's own message says what is wrong with the name
    raise CompileError(f"--target={target}: libtpu does not know this topology: "
                       f"{_first_line(e)}") from None
  return list(topo.devices)


def _slice_options(topology: str) -> dict[str, Any]:
  """libtpu's options for the slice as JAX on it sees it: a v4 chip's two cores as one device
  (megacore, as a v4 host runs them: 32 GiB each), and the slice's hosts: a v5e or v6e slice of
  up to 8 chips on one host (v5litepod-8, v6e-8), other slices on hosts of 2x2x1 chips, a
  smaller slice (one chip, say) on one host of its own size (libtpu's default host, 2x2x1,
  refuses it)."""
  gen, _, dims = topology.partition(":")
  options: dict[str, Any] = {"chip_config_name": "megacore"} if gen == "v4" else {}
  try:
    size = [int(d) for d in dims.split("x")]
  except ValueError:
    return options  # (libtpu names what is wrong with the name)
  size += [1] * (3 - len(size))
  if gen in ("v5e", "v6e") and len(size) == 3 and math.prod(size) <= 8:
    options["chips_per_host_bounds"] = tuple(size)
  elif len(size) == 3 and any(s < h for s, h in zip(size, (2, 2, 1))):
    options["chips_per_host_bounds"] = tuple(min(s, h) for s, h in zip(size, (2, 2, 1)))
  return options


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _device_grid(devices: list, shape: tuple[int, ...]) -> np.ndarray:
  """Devices as a (data, fsdp, model) grid, the model axis on neighbouring chips where jax knows
  the topology's layout (else in order)."""
  if math.prod(shape) == len(devices) and devices[0].platform == "tpu":
    from jax.experimental import mesh_utils
    try:
      return mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):  # a layout it does not know
      pass
  return np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape)


def replica_mesh(devices: list, mesh: str, target: Target) -> tuple[Mesh, int]:
  """(one replica's (1, fsdp, model) mesh, number of data-parallel replicas). An empty mesh puts
  every TPU device on `data`; for CUDA (laid out over host devices) it is one device."""
  try:
    everything = {"data": len(devices) if target.platform == "tpu" else 1, "fsdp": 1, "model": 1}
    shape = parse_mesh(mesh) if mesh.strip() else everything
  except ValueError as e:
    raise CompileError(f"--{e}") from None
  dims = tuple(shape[a] for a in MESH_AXES)
  if math.prod(dims) > len(devices):
    what = f"{target} has" if target.platform == "tpu" else "the host has"
    raise CompileError(f"--mesh: {format_mesh(shape)} needs {math.prod(dims)} devices, but "
                       f"{what} {len(devices)}")
  hosts = len({getattr(d, "process_index", 0) for d in devices})
  if target.platform == "tpu" and math.prod(dims) < len(devices) and hosts > 1:
    raise CompileError(f"--mesh: {format_mesh(shape)} uses {math.prod(dims)} devices, but "
                       f"{target} spans {hosts} hosts and a multi-host run must use all "
                       f"{len(devices)} (as jaxinfer generate requires)")
  return Mesh(_device_grid(devices, dims)[:1], MESH_AXES), dims[0]


def model_config(job: CompileJob) -> ModelConfig:
  """The model's configuration alone: a preset, the embedded model's recipe, or a directory's
  config.json (no weights are read)."""
  name = job.model
  if name.startswith("preset:"):
    preset = name.partition(":")[2]
    if preset not in PRESETS:
      raise CompileError(f"--model: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
  elif is_embedded(name):
    from jaxinfer import embedded
    recipe = name.partition(":")[2] or "default"
    if recipe not in embedded.RECIPES:
      raise CompileError(f"--model: unknown embedded recipe {recipe!r} (known: "
                         f"{', '.join(embedded.RECIPES)})")
    cfg = embedded.RECIPES[recipe].model
  else:
    path = Path(os.path.expanduser(name))
    if not (path / "config.json").is_file():
      raise CompileError(f"--model: expected preset:NAME, embedded, or a directory with a "
                         f"config.json; got {name!r}")
    from jaxinfer.checkpoint.hf import read_config
    try:
      cfg = read_config(path)
    except ValueError as e:
      raise CompileError(f"--model: {e}") from None
  if job.dtype != "auto":
    if job.dtype not in DTYPES:
      raise CompileError(f"--dtype: expected auto or one of {sorted(DTYPES)}, got {job.dtype!r}")
    cfg = dataclasses.replace(cfg, dtype=job.dtype)
  if job.max_seq_len is not None:
    cfg = dataclasses.replace(cfg, max_seq_len=job.max_seq_len)
  return cfg


@dataclasses.dataclass
class StepReport:
  """One step's compilation and what one device holds while it runs (None: lowered only)."""

  name: str
  lower_s: float
  compile_s: float | None = None
  weights_bytes: int | None = None  # from the shardings (None: lowered only)
  kv_bytes: int | None = None  # KV pools (and, verifying, the speculative state)
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None  # outputs written in place of donated arguments
  temp_bytes: int | None = None
  code_bytes: int | None = None
  kernels: int = 0  # Pallas kernels in the program (Mosaic TPU or Triton custom calls)
  collective_bytes: int | None = None  # what the step's collectives deliver to one device

  @property
  def total_bytes(self) -> int | None:
    if self.argument_bytes is None:
      return None
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"total_bytes": self.total_bytes}


@dataclasses.dataclass
class Report:
  target: str
  device_kind: str
  devices: int  # the target's
  hbm_bytes: int | None  # per device (a chip's HBM over its devices); None for CUDA
  mesh: str  # one replica's
  replicas: int
  model: str
  config: dict[str, Any]
  settings: dict[str, Any]  # batch_size, kv_pages, page_size, ...
  steps: list[StepReport] = dataclasses.field(default_factory=list)
  note: str | None = None
  devices_used: int | None = None  # by the mesh's replicas (None: all)

  @property
  def peak_bytes(self) -> int | None:
    totals = [s.total_bytes for s in self.steps if s.total_bytes is not None]
    return max(totals) if totals else None

  def as_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "steps"}
    return out | {"steps": [s.as_dict() for s in self.steps], "peak_bytes": self.peak_bytes,
                  "fits": None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes}

  def _unused(self) -> str:
    used = self.devices_used
    if used is None or used >= self.devices:
      return ""
    return f" on {used} of the {self.devices} devices"

  def table(self) -> str:
    cfg, st = self.config, self.settings
    hbm = "" if self.hbm_bytes is None else f", {_size(self.hbm_bytes)} HBM each"
    spec = "" if st["speculative"] == "none" else f", speculative {st['speculative']}"
    n = cfg["params"]
    params = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    weights = cfg["dtype"] + (f", weights {st['quantize']}" if st.get("quantize") else "")
    weights += f" with {', '.join(st['quantize_include'])}" if st.get("quantize_include") else ""
    lines = [f"{self.model} ({params} params, {weights}) on {self.target} "
             f"({self.devices} x {self.device_kind}{hbm})",
             f"mesh {self.mesh} per replica, {self.replicas} replica(s){self._unused()}; "
             f"{st['batch_size']} slots, "
             f"{st['kv_pages']} KV pages of {st['page_size']} tokens; {st['implementation']} "
             f"attention{spec}",
             f"{'step':<15}{'lower s':>8}{'compile s':>10}{'kernels':>8}{'weights':>11}{'KV':>11}"
             f"{'temp':>11}{'total':>11}{'of HBM':>7}{'comm':>11}   (per device)"]
    for s in self.steps:
      share = ("-" if s.total_bytes is None or not self.hbm_bytes
               else f"{100 * s.total_bytes / self.hbm_bytes:.0f}%")
      compile_s = "-" if s.compile_s is None else f"{s.compile_s:.1f}"
      lines.append(f"{s.name:<15}{s.lower_s:>8.1f}{compile_s:>10}{s.kernels:>8}"
                   f"{_size(s.weights_bytes):>11}"
                   f"{_size(s.kv_bytes):>11}{_size(s.temp_bytes):>11}"
                   f"{_size(s.total_bytes):>11}{share:>7}{_size(s.collective_bytes):>11}")
    if self.note:
      lines.append(self.note)
    return "\n".join(lines)


def _size(b: int | None) -> str:
  if b is None:
    return "-"
  return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"


def hbm_per_device(target: Target, devices: list) -> int:
  """A chip's HBM over its devices (one device a chip on every slice `_slice_options` asks for:
  a v4 chip's two cores are one megacore device)."""
  chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
  return HBM_GIB[target.generation] * GIB * chips // len(devices)


_TPU_CALL = "custom_call @tpu_custom_call("  # in the lowered StableHLO text
_TRITON_CALL = "custom_call @__gpu$xla.gpu.triton("


def _lower_for_cuda(fn, args) -> str:
  """The step lowered for CUDA from this host. jax >= 0.11's Triton lowering asks which GPU it
  is for; an abstract GPU (`gpu_target`) answers for a lone kernel, but a step's meshes (its
  shardings, shard_map) replace that context, so there its Pallas kernels lower on a GPU host
  only."""
  traced = fn.trace(*args)
  try:
    return traced.lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:
    if "No supported GPU devices" not in str(e):
      raise
  try:
    with gpu_target():
      return traced.lower(lowering_platforms=("cuda",)).as_text()
  except (RuntimeError, ValueError):
    raise CompileError(f"--target=cuda: jax {jax.__version__} lowers a step's Triton kernels "
                       "only on a GPU host; use --implementation=xla here (jax 0.10 lowers "
                       "them anywhere)") from None


def compile_step(name: str, fn, args, target: Target) -> StepReport:
  """Lowers (and for a TPU compiles) one step; StepFailed when the compiler refuses it, with
  "RESOURCE_EXHAUSTED" in the message when it does not fit."""
  t0 = time.perf_counter()
  if target.platform == "cuda":
    text = _lower_for_cuda(fn, args)
    return StepReport(name, time.perf_counter() - t0, kernels=text.count(_TRITON_CALL))
  try:
    lowered = fn.lower(*args)
  except CompileError:
    raise
  except Exception as e:  # noqa: BLE001 (a kernel Mosaic refuses: its words, for its author)
    raise StepFailed(f"{name}: lowering: {type(e).__name__}: {e}") from None
  kernels = lowered.as_text().count(_TPU_CALL)
  t1 = time.perf_counter()
  try:
    with compilation_cache.suspended():
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    raise StepFailed(f"{name}: {e}") from None
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  return StepReport(name, t1 - t0, t2 - t1, argument_bytes=mem.argument_size_in_bytes,
                    output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                    temp_bytes=mem.temp_size_in_bytes,
                    code_bytes=mem.generated_code_size_in_bytes, kernels=kernels,
                    collective_bytes=collective_bytes(compiled.as_text()))


_COLLECTIVE = re.compile(r"=\s+(\([^=]*?\)|\S+)\s+(?:all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-done)?\(")


def collective_bytes(hlo: str) -> int:
  """Bytes the collectives of a compiled program (its HLO text) deliver to one device: the sum of
  their results (of asynchronous ones, the -done half's), each instruction once (a loop's body
  counted once)."""
  total = 0
  for result in _COLLECTIVE.findall(re.sub(r"/\*.*?\*/", "", hlo)):  # (tuples' index notes)
    for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([\d,]*)\]", result):
      bits = re.search(r"\d+", dtype)
      total += math.prod(int(d) for d in dims.split(",") if d) * (int(bits[0]) if bits else 8)
  return total // 8


def _shrink_advice(report: Report, step: str, need: int, weights: int, kv: int, engine_kv: int,
                   usable: int | None = None, temporaries: bool = True) -> str:
  """One line: what needs how much, and which flag to lower (or the mesh to widen). usable: the
  HBM the compiler said it had (a chip keeps some for itself: 15.75 of v5e's 16 GiB), else the
  chip's; temporaries: whether `need` counts the step's temporaries (the check before compiling
  does not, so its page count is an upper bound)."""
  hbm, st = report.hbm_bytes, report.settings
  usable = usable or hbm
  head = (f"the {step} step needs {_size(need)} per device (weights {_size(weights)}, KV "
          f"{_size(kv)}) but a {report.device_kind} device has {_size(usable)} of HBM")
  if usable != hbm:
    head += " free"
  wider = f"spread the model over more chips (--mesh, now {report.mesh})"
  if weights > 0.8 * usable:
    return f"--mesh: {head}; the weights alone need {_size(weights)}: {wider}"
  # (the compiler's figures are rounded to 0.01 GiB: a page count that fits either way)
  slack = 0.01 * GIB if usable != hbm else 0
  if engine_kv:
    per_page = engine_kv / st["kv_pages"]
    fit = st["kv_pages"] - max(1, math.ceil((need + slack - usable) / per_page))
    if fit >= 1:  # (else the pool is not what to shrink: the step's temporaries are)
      most = "at most" if temporaries else "fewer than"
      return (f"--kv_pages: {head}; lower --kv_pages to {most} {fit} (now {st['kv_pages']}) "
              f"or --batch_size (now {st['batch_size']}), or {wider}")
  return f"--batch_size: {head}; lower --batch_size (now {st['batch_size']}) or {wider}"


def _compiler_oom(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes usable) from libtpu's out-of-memory error, in either of its forms, or
  None."""
  said = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
  if said:  # "... required for HLO temporaries (16.00G) exceeds available HBM (15.75G) ..."
    return int(float(said.group(1)) * GIB), int(float(said.group(2)) * GIB)
  # "... Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 2.23M."
  said = re.search(r"of ([\d.]+)G hbm\. Exceeded hbm capacity by ([\d.]+)([KMG])", message)
  if said:
    usable = int(float(said.group(1)) * GIB)
    over = float(said.group(2)) * {"K": 1 << 10, "M": 1 << 20, "G": GIB}[said.group(3)]
    return usable + math.ceil(over), usable
  return None


def _checked(job: CompileJob, target: Target, cfg: ModelConfig):
  """The job's sparsity, after refusing what the engine or this command cannot compile for
  `target` (and `jaxinfer generate` would refuse to serve)."""
  from jaxinfer import attention
  if job.implementation not in attention.IMPLEMENTATIONS:
    raise CompileError(f"--implementation: expected one of {sorted(attention.IMPLEMENTATIONS)}, "
                       f"got {job.implementation!r}")
  if job.speculative not in SPECULATIVE:
    raise CompileError(f"--speculative: compile takes one of {', '.join(SPECULATIVE)} (medusa, "
                       f"hydra and draft read trained weights' files), got "
                       f"{job.speculative!r}")
  try:
    job.engine_config  # noqa: B018 (validates the sizes)
    sparsity = parse_sparsity(job.sparsity)
  except ValueError as e:
    raise CompileError(f"--{str(e).removeprefix('EngineConfig: ')}") from None
  if sparsity.dynamic and job.speculative != "none":
    raise CompileError(f"--sparsity: {sparsity} is not combinable with --speculative (its "
                       f"pattern needs whole-prompt prefill)")
  if why := window_conflict(sparsity, cfg):
    raise CompileError(f"--sparsity: {job.model} {why}")
  if why := ignored_chunk_option(sparsity, job):
    raise CompileError(why)
  check_speculative(job)
  why = attention.unsupported(sparsity, job.implementation, target.platform)
  if why:
    raise CompileError(f"--sparsity: {why}")
  return sparsity


def _compile_checked(name, fn, args, target: Target, report: Report, weights: int, kv: int,
                     engine_kv: int, log=None, twice: int = 0) -> StepReport:
  """compile_step, its memory checked against the device's HBM (CompileError when over).
  twice: bytes of arguments passed twice (layer skip's draft weights are the target's own
  buffers), counted once."""
  hbm = report.hbm_bytes
  if hbm and weights + kv > hbm:  # no need to ask the compiler
    raise CompileError(_shrink_advice(report, name, weights + kv, weights, kv, engine_kv,
                                      temporaries=False))
  if log:
    log(f"{'lowering' if target.platform == 'cuda' else 'compiling'} the {name} step")
  try:
    step = compile_step(name, fn, args, target)
  except StepFailed as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    said = _compiler_oom(str(e))
    if said is None:  # (a form not known here: the compiler's own words)
      first = str(e).strip().splitlines()[0]
      raise CompileError(f"--batch_size: the {name} step does not fit a {report.device_kind} "
                         f"device ({first}); lower --kv_pages (now {report.settings['kv_pages']}) "
                         f"or --batch_size (now {report.settings['batch_size']}), or spread the "
                         f"model over more chips (--mesh, now {report.mesh})") from None
    need, usable = max(weights + kv, said[0]), said[1]
    raise CompileError(_shrink_advice(report, name, need, weights, kv, engine_kv,
                                      usable)) from None
  if target.platform == "cuda":
    return step
  step.weights_bytes, step.kv_bytes = weights, kv
  step.argument_bytes -= twice
  if step.total_bytes > hbm:
    raise CompileError(_shrink_advice(report, name, step.total_bytes, weights, kv, engine_kv))
  return step


def checkpoint_format(job: CompileJob) -> CompileJob:
  """A quantized checkpoint's directory compiles as it serves, in its own format (its
  quantization.json); a --quantize naming another is refused."""
  path = Path(os.path.expanduser(job.model))
  if job.model.startswith("preset:") or is_embedded(job.model) or not path.is_dir():
    return job
  from jaxinfer import quant
  from jaxinfer.model import Transformer
  cfg = model_config(job)
  tied = cfg.tie_embeddings
  try:
    fmt = quant.read_metadata(path, tied)
  except ValueError as e:
    raise CompileError(f"--model: {e}") from None
  try:
    asked = None if job.quantize is None else quant.QuantFormat.parse(job.quantize)
  except ValueError as e:
    raise CompileError(f"--quantize: {e}") from None
  if fmt is None:
    return job
  try:  # (a group size that does not divide one of this model's axes)
    quant.selected_specs(Transformer.spec(cfg), fmt)
  except ValueError as e:
    raise CompileError(f"--model: {path / quant.QUANT_FILE}: {e}") from None
  if asked is not None and asked != dataclasses.replace(fmt, include=()):
    raise CompileError(f"--quantize: {job.model} is quantized as {fmt.name} already; leave "
                       f"--quantize out to compile it as it serves")
  if not job.quantize_include:
    return dataclasses.replace(job, quantize=fmt.name, quantize_include=fmt.include)
  try:  # (as quantize took them: a tied model's lm_head is its embed)
    roles = quant.QuantFormat.parse(fmt.name, tuple(job.quantize_include)).for_model(tied).include
  except ValueError as e:
    raise CompileError(f"--quantize_include: {e}") from None
  if set(roles) != set(fmt.include):
    raise CompileError(f"--quantize_include: {job.model} is quantized with "
                       f"{list(fmt.include) or 'no'} optional roles already; leave "
                       f"--quantize_include out to compile it as it serves")
  return dataclasses.replace(job, quantize=fmt.name, quantize_include=fmt.include)


def _check_quantize(job: CompileJob, cfg) -> None:
  """--quantize and --quantize_include as `jaxinfer quantize` takes its --format and
  --include, and as `jaxinfer generate` serves them."""
  if not job.quantize:
    if job.quantize_include:
      raise CompileError("--quantize_include: needs --quantize (the format to quantize them in)")
    return
  from jaxinfer import quant
  try:
    fmt = quant.QuantFormat.parse(job.quantize, job.quantize_include).for_model(
        cfg.tie_embeddings)
  except ValueError as e:
    flag = "--quantize_include" if isinstance(e, quant.IncludeError) else "--quantize"
    raise CompileError(f"{flag}: {e}") from None
  if fmt.activations and job.speculative != "none":  # (as jaxinfer generate refuses it)
    raise CompileError(f"--speculative: {job.quantize} quantizes activations (:a8), under which "
                       f"speculation would not equal plain decoding; use a weight-only format")


def run(job: CompileJob, log=None) -> Report:
  """Compiles (TPU) or lowers (CUDA) the engine's steps and, with job.speculative, the
  verification step; CompileError (one line, naming the flag) for bad flags or a configuration
  that does not fit; StepFailed when the compiler refuses a step for another reason."""
  job = checkpoint_format(job)
  target = parse_target(job.target)
  cfg = model_config(job)
  _check_quantize(job, cfg)
  sparsity = _checked(job, target, cfg)
  devices = target_devices(target)
  mesh, replicas = replica_mesh(devices, job.mesh, target)
  runtime = Runtime(mesh, implementation=job.implementation, sparsity=sparsity)
  params = params_shapes(cfg, job, mesh, runtime)
  # the proposer first: a bad --tree or --draft_layers fails before minutes of compiling, and
  # the engine's one pool holds its trees too
  proposer, draft = (None, None) if job.speculative == "none" else proposer_for(cfg, job, params)
  steps = engine_steps(cfg, job, params, runtime, proposer.tree_size if proposer else 0)
  pools = steps["decode"][1][1:3]  # (k, v): every layer's (K/c, P, ps, c*H) pool
  kv_pages = pools[0][0].shape[1]
  report = Report(
      target=str(target), device_kind=devices[0].device_kind if target.platform == "tpu"
      else "cuda", devices=len(devices) if target.platform == "tpu" else mesh.size * replicas,
      hbm_bytes=hbm_per_device(target, devices) if target.platform == "tpu" else None,
      mesh=",".join(f"{a}:{n}" for a, n in mesh.shape.items() if n > 1) or "one device",
      replicas=replicas, devices_used=mesh.size * replicas, model=job.model,
      config=dataclasses.asdict(cfg) | {"params": cfg.num_params()},
      settings={f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
      | {"kv_pages": kv_pages, "max_seq_len": cfg.max_seq_len},
      note=("lowered only: compiling for cuda needs the GPU (no memory numbers)"
            if target.platform == "cuda" else None))
  weights, engine_kv = device_bytes(params), device_bytes(pools)
  for name, (fn, args) in steps.items():
    report.steps.append(_compile_checked(name, fn, args, target, report, weights, engine_kv,
                                         engine_kv, log=log))
  if proposer is None:
    return report
  shared = proposer.draft_from_target(params)  # layer skip's: the target's own weights
  if shared is not None:
    draft = shared
  elif draft is not None:  # whole on each of a replica's devices, as serving places a draft
    whole = whole_on(runtime.mesh)
    draft = jax.tree_util.tree_map(lambda x: whole(x.shape, x.dtype), draft)
  # speculation inside the engine: its own pool and rows' state
  tree_steps, kv, draft_bytes = engine_tree_steps(cfg, job, params, runtime, proposer, draft)
  twice = 0 if shared is None else draft_bytes  # the target's buffers, passed again
  for name, (fn, args) in tree_steps.items():
    report.steps.append(_compile_checked(name, fn, args, target, report,
                                         weights + draft_bytes - twice, kv, kv, log=log,
                                         twice=twice))
  return report
