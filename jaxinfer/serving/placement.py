"""Where a model runs: `--mesh` over every process's devices (JAX's multi-controller way), one
(1, fsdp, model) mesh per data-parallel replica; weights copied onto each; memory checked
against a device before anything is allocated; and requests split among all replicas of the
run, each process driving the replicas that hold its devices (a replica whose devices span
processes is driven by all of them, in step) from a thread per replica."""

from __future__ import annotations

import dataclasses
import threading
import zlib

import jax
import numpy as np

from jaxinfer.errors import UserError
from jaxinfer.sharding import MESH_AXES, device_bytes, format_mesh, parse_mesh

WAIT_SLICE_S = 0.1  # how soon an interrupt is raised while the replicas run


@dataclasses.dataclass(frozen=True)
class Replica:
  mesh: jax.sharding.Mesh
  index: int  # among all replicas of the run
  leads: bool  # this process hands on its results (the first of the processes it spans)
  spans_processes: bool


def _shape(mesh_spec: str) -> dict[str, int]:
  """The mesh's shape over all processes' devices (default: a replica per device); refuses more
  devices than the run has, or (several processes) fewer."""
  if not mesh_spec:
    return {"data": jax.device_count(), "fsdp": 1, "model": 1}
  shape = parse_mesh(mesh_spec)
  need = int(np.prod([shape[a] for a in MESH_AXES]))
  nproc = jax.process_count()
  if nproc == 1 and need > jax.device_count():
    raise UserError(f"--mesh: {format_mesh(shape)} needs {need} devices, but this process has "
                    f"{jax.device_count()}")
  if nproc > 1 and need != jax.device_count():
    raise UserError(f"--mesh: {format_mesh(shape)} has {need} devices; a run of {nproc} "
                    f"processes spans all {jax.device_count()} of their devices")
  return shape


def replicas(mesh_spec: str) -> tuple[list[Replica], int]:
  """(the replicas this process drives, how many the run has)."""
  shape = _shape(mesh_spec)
  r, f, m = (shape[a] for a in MESH_AXES)
  grid = np.asarray(jax.devices()[:r * f * m], dtype=object).reshape(r, 1, f, m)
  me, mine = jax.process_index(), []
  for i in range(r):
    procs = sorted({d.process_index for d in grid[i].flat})
    if me in procs:
      mine.append(Replica(jax.sharding.Mesh(grid[i], MESH_AXES), i, procs[0] == me,
                          len(procs) > 1))
  return mine, r


def on_replica(params, mesh, meshes):
  """params (placed on meshes[0]) on replica `mesh`, with the same partitioning."""
  if mesh is meshes[0]:
    return params
  return jax.device_put(params, jax.tree_util.tree_map(
      lambda x: jax.sharding.NamedSharding(mesh, x.sharding.spec), params))


def replicated(tree, mesh):
  """`tree` whole on each of a replica's devices (a draft model's weights)."""
  if mesh is None or tree is None:
    return tree
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def first_device(mesh):
  """The mesh's first device in this process (the default device without a mesh): the
  reference for every one of a replica's devices."""
  me = jax.process_index()
  return (next(d for d in mesh.devices.flat if d.process_index == me) if mesh is not None
          else jax.local_devices()[0])


def bytes_limit(mesh) -> int | None:
  """Memory of the mesh's first device, or None where the backend does not say (CPU)."""
  stats = getattr(first_device(mesh), "memory_stats", lambda: None)()
  return stats.get("bytes_limit") if stats else None


def check_memory(what: str, kv_bytes: int, kv_device_bytes: int, params, mesh,
                 fix: str) -> None:
  """Refuses KV memory (kv_bytes in all, kv_device_bytes on one device of the mesh) that cannot
  fit on a device beside its shards of the weights, saying how much it needs and which flags
  size it."""
  limit = bytes_limit(mesh)
  if not limit:
    return
  per_device = kv_device_bytes + device_bytes(params)
  if per_device > 0.95 * limit:
    raise UserError(f"{what}, {kv_bytes / 2**30:.2f} GiB) plus weights need "
                    f"{per_device / 2**30:.2f} GiB per device, more than its "
                    f"{limit / 2**30:.2f} GiB; {fix}")


def owner(key, num_processes: int) -> int:
  """The process that owns `key` (anything with a stable repr), alike in every process."""
  return zlib.crc32(repr(key).encode()) % num_processes


def split_by_tokens(items: list, parts: int, request=lambda r: r) -> list[list]:
  """Contiguous shares of a sorted list with about equal prompt + output tokens each
  (`request(item)`: the item's request)."""
  if parts == 1:
    return [items]
  cost = np.cumsum([len(request(r).prompt_ids) + request(r).max_new_tokens for r in items])
  total = cost[-1] if len(cost) else 0
  cuts = [int(np.searchsorted(cost, total * (i + 1) / parts)) for i in range(parts - 1)]
  bounds = [0] + cuts + [len(items)]
  return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def in_threads(fn, jobs: list[tuple], cancel: threading.Event | None = None) -> None:
  """fn(*job) for every job, each in a thread of its own (one per replica); the first failure
  is raised once all have finished. An interrupt while they run sets `cancel` (which the jobs
  watch) and waits for them before it is raised: no replica outlives the call (a second interrupt
  leaves without waiting).

  It waits in short slices rather than in Thread.join: a SIGINT that the kernel hands to another
  of the process's threads does not wake a blocked join, and a join interrupted on Python 3.11
  can mark a running thread as stopped (cpython bpo-45274's handler)."""
  failures: list[BaseException] = []
  cv = threading.Condition()
  began = ended = 0
  closed = False  # interrupted: a replica not yet begun does not begin

  def work(*args):
    nonlocal began, ended
    with cv:
      if closed:
        return
      began += 1
    try:
      fn(*args)
    except BaseException as e:  # surfaced after the other replicas finish (SystemExit too)
      failures.append(e)
    finally:
      with cv:
        ended += 1
        cv.notify_all()

  def wait(done):
    with cv:
      while not done():
        cv.wait(WAIT_SLICE_S)

  threads = [threading.Thread(target=work, args=job, daemon=True) for job in jobs]
  try:
    for t in threads:
      t.start()
    wait(lambda: ended == len(threads))
  except BaseException:
    with cv:
      closed = True
    if cancel is not None:
      cancel.set()
    wait(lambda: ended == began)
    raise
  if failures:
    raise failures[0]
