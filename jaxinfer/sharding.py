"""Meshes and the one rules object that maps logical axis names to mesh axes.

Every parameter, cache and block-boundary activation names its dimensions with logical axes
(see model.py); `ShardingRules` turns those names into a `PartitionSpec` for a given mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses "data:4,model:2" into {"data": 4, "fsdp": 1, "model": 2}; absent axes are 1."""
  shape = {axis: 1 for axis in MESH_AXES}
  if not spec or not spec.strip():
    return shape
  seen = set()
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    if not sep or name not in MESH_AXES:
      raise ValueError(f"mesh: expected comma-separated axis:size with axes {MESH_AXES}, got {spec!r}")
    if name in seen:
      raise ValueError(f"mesh: axis {name!r} given twice in {spec!r}")
    try:
      value = int(size)
    except ValueError:
      value = 0
    if value < 1:
      raise ValueError(f"mesh: size of {name!r} must be a positive integer, got {size!r}")
    seen.add(name)
    shape[name] = value
  return shape


def make_mesh(shape: dict[str, int] | str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh. With no shape, all devices go on `data`."""
  devices = list(jax.devices() if devices is None else devices)
  if shape is None or (isinstance(shape, str) and not shape.strip()):
    shape = {"data": len(devices), "fsdp": 1, "model": 1}
  elif isinstance(shape, str):
    shape = parse_mesh(shape)
  size = math.prod(shape[a] for a in MESH_AXES)
  if size > len(devices):
    raise ValueError(f"mesh: {format_mesh(shape)} needs {size} devices, but only {len(devices)} "
                     f"are available")
  if size < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"mesh: {format_mesh(shape)} uses {size} devices, but a multi-process run "
                       f"must use all {len(devices)}")
    devices = devices[:size]
  grid = np.asarray(devices, dtype=object).reshape([shape[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def mesh_flag(spec: str) -> Mesh:
  """`make_mesh` for a --mesh flag (empty: every device on `data`), its errors naming the flag."""
  try:
    return make_mesh(spec)
  except ValueError as e:
    raise ValueError(f"--{e}") from None


def format_mesh(shape: dict[str, int]) -> str:
  return ",".join(f"{a}:{shape[a]}" for a in MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axes. Names not listed are replicated.

  A dimension whose size the mesh axes do not divide is replicated instead (e.g. 2 KV heads on a
  model axis of 4), so any model runs on any mesh; two dimensions of one array mapped to the same
  mesh axis is a configuration error.
  """

  mapping: tuple[tuple[str, tuple[str, ...]], ...]

  def __post_init__(self):
    names = [name for name, _ in self.mapping]
    if len(names) != len(set(names)):
      raise ValueError(f"ShardingRules: logical axis listed twice in {names}")
    for name, axes in self.mapping:
      unknown = set(axes) - set(MESH_AXES)
      if unknown:
        raise ValueError(f"ShardingRules: {name!r} maps to unknown mesh axes {sorted(unknown)}")

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    return dict(self.mapping).get(logical, ())

  def partition_spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                     mesh: Mesh | None = None) -> PartitionSpec:
    used: dict[str, str] = {}
    spec = []
    for i, logical in enumerate(logical_axes):
      axes = tuple(a for a in self.mesh_axes(logical) if mesh is None or mesh.shape.get(a, 1) > 1)
      for a in axes:
        if a in used:
          raise ValueError(f"ShardingRules: logical axes {used[a]!r} and {logical!r} of one array "
                           f"both map to mesh axis {a!r} (axes {tuple(logical_axes)})")
        used[a] = logical
      if axes and shape is not None and mesh is not None:
        if shape[i] % math.prod(mesh.shape[a] for a in axes):
          axes = ()
      spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)

  def sharding(self, mesh: Mesh, logical_axes: Sequence[str | None],
               shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, self.partition_spec(logical_axes, shape, mesh))


# Weights: FSDP shards `embed`, tensor parallelism shards heads / mlp / vocab. Activations carry
# `act_*` names so the FSDP axis shards only the batch there.
DEFAULT_RULES = ShardingRules((
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("q_heads", ("model",)),
    ("kv_heads", ("model",)),
    ("mlp", ("model",)),
    ("vocab", ("model",)),
    ("act_heads", ("model",)),
    ("act_kv_heads", ("model",)),
    ("act_mlp", ("model",)),
    ("act_vocab", ("model",)),
))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
              rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
  """`with_sharding_constraint` by logical axes; a no-op outside a mesh."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, logical_axes, x.shape))


def rows_split(b: int, mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> bool:
  """Whether b rows split over the mesh's batch axes (into more than one shard)."""
  if mesh is None:
    return False
  shards = math.prod(mesh.shape.get(a, 1) for a in rules.mesh_axes("batch"))
  return shards > 1 and b % shards == 0


def device_bytes(tree, shardings=None) -> int:
  """Bytes one device holds of a tree of arrays (each by its own sharding; an array the tree
  holds twice, such as layer skip's draft weights beside the target's, counted once) or of
  shapes laid out by `shardings` (a matching tree; None: whole on the device)."""
  def nbytes(x, where):
    where = where if shardings is not None else getattr(x, "sharding", None)
    shape = x.shape if where is None else where.shard_shape(x.shape)
    return math.prod(shape) * x.dtype.itemsize

  if shardings is None:  # (shapes are not buffers: each counts, the same one repeated too)
    leaves = {id(x) if isinstance(x, jax.Array) else i: x
              for i, x in enumerate(jax.tree_util.tree_leaves(tree))}
    return sum(nbytes(x, None) for x in leaves.values())
  return sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(nbytes, tree, shardings)))
