"""Parameter declarations: each weight is declared once as a `ParamSpec` (shape, logical axes,
initializer) inside a flax.struct dataclass; random init, abstract shapes, shardings,
checkpoint restore targets and quantized variants (quant/) are all derived from that one
declaration tree.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer.sharding import DEFAULT_RULES, ShardingRules

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

# What a weight is to quantization: "linear" weights are quantized whenever a model is; the rest
# only when a run opts them in by this name.
QUANT_ROLES = ("linear", "embed", "lm_head", "norm")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One weight. For quantization (quant/) it also declares `contract`, the axes the weight is
  contracted (or reduced) over, so one scale is shared along them and every other axis gets its
  own; and `group`, the contracted axis that groups of a grouped format run along (the other
  contracted axes then get a scale per index). `quant` is its role (QUANT_ROLES), None if never
  quantized. The grouping is declared here, never inferred from an einsum string."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Initializer
  dtype: Any = None  # None: the model's dtype
  contract: tuple[str, ...] = ()
  group: str | None = None
  quant: str | None = None

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"ParamSpec: shape {self.shape} and axes {self.axes} differ in rank")
    if self.quant is not None:
      if self.quant not in QUANT_ROLES:
        raise ValueError(f"ParamSpec: quant must be one of {QUANT_ROLES}, got {self.quant!r}")
      if not self.contract or not set(self.contract) <= set(self.axes):
        raise ValueError(f"ParamSpec: contract {self.contract} must name axes of {self.axes}")
      if self.group not in self.contract:
        raise ValueError(f"ParamSpec: group {self.group!r} must be one of contract "
                         f"{self.contract}")

  def axis(self, name: str) -> int:
    return self.axes.index(name)


def linear(shape: tuple[int, ...], axes: tuple[str, ...], init: Initializer,
           contract: tuple[str, ...], group: str | None = None, quant: str = "linear") -> ParamSpec:
  """A weight contracted over `contract` (groups along `group`, default the first of them)."""
  return ParamSpec(shape, axes, init, contract=contract, group=group or contract[0], quant=quant)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def fan_in_init(fan_in_dims: int = 1) -> Initializer:
  """Normal(0, 1/sqrt(fan_in)) where fan_in is the product of the leading `fan_in_dims` dims."""

  def init(key, shape, dtype):
    fan_in = 1
    for d in shape[:fan_in_dims]:
      fan_in *= d
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

  return init


def constant_init(value: float) -> Initializer:
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def normal_init(std: float) -> Initializer:
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _leaves_with_paths(spec_tree):
  return jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=is_spec)


def init_params(spec_tree, key: jax.Array, dtype) -> Any:
  """Random parameters for a declaration tree; each leaf's key is folded from its path."""
  leaves, treedef = _leaves_with_paths(spec_tree)
  out = []
  for path, spec in leaves:
    leaf_key = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
    out.append(spec.init(leaf_key, spec.shape, spec.dtype or dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(spec_tree, dtype, mesh: Mesh | None = None,
                    rules: ShardingRules = DEFAULT_RULES) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings when a mesh is given): restore/compile targets."""

  def one(spec):
    sharding = None if mesh is None else rules.sharding(mesh, spec.axes, spec.shape)
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype or dtype, sharding=sharding)

  return jax.tree_util.tree_map(one, spec_tree, is_leaf=is_spec)


def param_shardings(spec_tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
  return jax.tree_util.tree_map(lambda s: rules.sharding(mesh, s.axes, s.shape), spec_tree,
                                is_leaf=is_spec)


def logical_axes(spec_tree) -> Any:
  return jax.tree_util.tree_map(lambda s: s.axes, spec_tree, is_leaf=is_spec)


def check_against_spec(params, spec_tree, where: str = "params",
                       shape_of: Callable[[Any], tuple[int, ...]] = lambda x: tuple(x.shape)
                       ) -> None:
  """Raises a ValueError naming every leaf whose shape (by `shape_of`: a quantized tree passes
  quant.logical_shape, the shape of the weight a leaf stands for) differs from its declaration."""
  spec_leaves, spec_def = _leaves_with_paths(spec_tree)
  try:
    param_leaves = spec_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: structure does not match the model declaration: {e}") from None
  bad = [f"{jax.tree_util.keystr(path)}: expected {spec.shape}, got {shape_of(p)}"
         for (path, spec), p in zip(spec_leaves, param_leaves) if shape_of(p) != spec.shape]
  if bad:
    raise ValueError(f"{where}: shape mismatch: " + "; ".join(bad))
