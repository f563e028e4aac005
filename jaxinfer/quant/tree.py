"""Parameter trees: PTQ conversion (`quantize_params`), the QAT view (`qat_params`), restore
targets for a quantized checkpoint, and the metadata file that names its format.

Which leaves are quantized derives from the declarations: every ParamSpec whose role (`quant`)
is "linear" (attention q/k/v/o, MLP), plus the roles a format opts in (embed, lm_head, norm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer.files import read_json_object, write_atomically
from jaxinfer.params import ParamSpec, is_spec
from jaxinfer.quant.formats import QuantFormat
from jaxinfer.quant.ops import (ActQuantized, TrainedTable, dequantize, fake_quant, is_quantized,
                                load_qwix, quantize, scale_axes, straight_through)
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules

QUANT_FILE = "quantization.json"
# The layout of quantized leaves in a checkpoint (qwix QArray: qvalue, scale; qtype static).
# Bump when it changes; a checkpoint of another version is refused, not misread.
# 5: a long last axis in a multiple of 8 blocks (shorter runs where 128 would not give that);
# 4: packed values in blocks along the last axis (ops.pack), so that a shard unpacks alone;
# 3: fp4 values packed too (their 4-bit codes), fp6 four to three bytes; 2: int4 / int2 /
# ternary values packed into uint8 (ops.pack); 1 held them a byte each.
QUANT_VERSION = 5


def _map(fn: Callable[[str, ParamSpec, Any], Any], params, spec_tree, fmt: QuantFormat):
  """fn(path, spec, leaf) on the leaves `fmt` quantizes; the others are kept as they are."""
  roles = ("linear",) + fmt.include

  def one(path, spec, leaf):
    where = jax.tree_util.keystr(path)
    if spec.quant in roles:
      return fn(where, spec, leaf)
    if is_quantized(leaf):
      raise ValueError(f"{where}: is quantized, but {fmt.name} with include "
                       f"{list(fmt.include)} does not quantize {spec.quant} weights")
    return leaf

  return jax.tree_util.tree_map_with_path(one, spec_tree, params, is_leaf=is_spec)


def selected_specs(spec_tree, fmt: QuantFormat) -> list[tuple[str, ParamSpec]]:
  """(path, spec) of every leaf `fmt` quantizes; raises a one-line ValueError naming the first
  whose group axis the group size does not divide."""
  out = []

  def check(where, spec, leaf):
    try:
      scale_axes(spec, fmt)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    out.append((where, spec))
    return leaf

  _map(check, spec_tree, spec_tree, fmt)
  return out


def _leaf(fmt: QuantFormat, q):
  """A quantized weight as the tree holds it: with int8 activations, marked for `linear`."""
  return ActQuantized(q) if fmt.activations else q


def _qat_leaf(w, spec: ParamSpec, fmt: QuantFormat):
  """A weight as QAT sees it: fake-quantized; with int8 activations, or as an embedding table,
  also its QArray, from which `linear` or `take_rows` computes the served forward."""
  if not fmt.activations and spec.quant != "embed":
    return fake_quant(w, spec, fmt)
  q = jax.lax.stop_gradient(quantize(w, spec, fmt))
  trained = straight_through(w, dequantize(q))
  return ActQuantized(q, trained) if fmt.activations else TrainedTable(q, trained)


def quantize_params(params, spec_tree, fmt: QuantFormat):
  """PTQ: every selected leaf quantized with `fmt`. Idempotent: a leaf already quantized in
  `fmt` is kept as it is; one in another layout is an error."""
  selected_specs(spec_tree, fmt)

  def one(where, spec, leaf):
    if not is_quantized(leaf):
      return _leaf(fmt, quantize(leaf, spec, fmt))
    q = leaf.q if isinstance(leaf, ActQuantized) else leaf
    want = jax.eval_shape(lambda w: quantize(w, spec, fmt),
                          jax.ShapeDtypeStruct(spec.shape, q.dtype))
    if ((q.qtype, q.qvalue.dtype, q.scale.shape, isinstance(leaf, ActQuantized))
        != (want.qtype, want.qvalue.dtype, want.scale.shape, fmt.activations)):
      qtype = q.qtype if isinstance(q.qtype, str) else jnp.dtype(q.qtype).name
      acts = ", int8 activations" if isinstance(leaf, ActQuantized) else ""
      raise ValueError(f"{where}: already quantized in another format ({qtype}, scales "
                       f"{q.scale.shape}{acts}); quantize the full-precision model to "
                       f"{fmt.name}")
    return leaf

  return _map(one, params, spec_tree, fmt)


def qat_params(params, spec_tree, fmt: QuantFormat | None):
  """The QAT view: every selected leaf through `fake_quant` (the served weights' values, the
  full-precision gradient). Call it inside the loss. fmt None returns `params` itself."""
  if fmt is None:
    return params
  selected_specs(spec_tree, fmt)

  def one(where, spec, leaf):
    if is_quantized(leaf):
      raise ValueError(f"{where}: already quantized; QAT trains full-precision weights")
    return _qat_leaf(leaf, spec, fmt)

  return _map(one, params, spec_tree, fmt)


def abstract_quantized(abstract, spec_tree, fmt: QuantFormat, mesh: Mesh | None = None,
                       rules: ShardingRules = DEFAULT_RULES):
  """Restore targets: `abstract` (ShapeDtypeStructs of the full-precision tree) with each
  selected leaf replaced by its QArray's shapes, sharded like the weight when a mesh is given."""
  selected_specs(spec_tree, fmt)

  def one(where, spec, sds):
    q = jax.eval_shape(lambda w: _leaf(fmt, quantize(w, spec, fmt)),
                       jax.ShapeDtypeStruct(sds.shape, sds.dtype))
    if mesh is None:
      return q
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=rules.sharding(mesh, spec.axes, x.shape)), q)

  return _map(one, abstract, spec_tree, fmt)


def metadata_text(fmt: QuantFormat) -> str:
  """QUANT_FILE's text for `fmt`."""
  meta = {"version": QUANT_VERSION, "format": fmt.name, "include": list(fmt.include),
          "qwix": load_qwix().__version__}
  return json.dumps(meta, indent=2) + "\n"


def write_metadata(directory: str | os.PathLike, fmt: QuantFormat | None) -> None:
  """Records `fmt` beside a checkpoint's params/ (removes the record when fmt is None)."""
  path = Path(directory) / QUANT_FILE
  if fmt is None:
    path.unlink(missing_ok=True)
    return
  write_atomically(path, metadata_text(fmt))


def read_metadata(directory: str | os.PathLike,
                  tie_embeddings: bool | None = None) -> QuantFormat | None:
  """The format a checkpoint was quantized with, None when it is not quantized; given whether
  the model ties its LM head to its embeddings, as the model takes it (`QuantFormat.for_model`)."""
  path = Path(directory) / QUANT_FILE
  if not path.exists():
    return None
  meta = read_json_object(path)
  version = meta.get("version")
  if version != QUANT_VERSION:
    raise ValueError(f"{path}: quantized checkpoint version {version!r}, but this jaxinfer reads "
                     f"version {QUANT_VERSION}; re-run jaxinfer quantize on the full-precision "
                     f"model")
  if "format" not in meta:
    raise ValueError(f"{path}: no \"format\" (the quantization format, e.g. \"int4:g128\")")
  try:
    name, include = meta["format"], meta.get("include", ())
    if not isinstance(name, str) or not isinstance(include, (list, tuple)) or not all(
        isinstance(role, str) for role in include):
      raise ValueError(f"expected a format name and a list of roles, got format {name!r}, "
                       f"include {include!r}")
    fmt = QuantFormat.parse(name, include)
    return fmt if tie_embeddings is None else fmt.for_model(tie_embeddings)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None
