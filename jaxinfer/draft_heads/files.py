"""Draft-head files: safetensors weights + a JSON config with a format tag, written after
training and read when serving. The recipes' shared training set-up is `recipe`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write(directory: str | Path, weights_name: str, tensors: dict[str, np.ndarray],
          config_name: str, config: dict[str, Any]) -> Path:
  from safetensors.numpy import save_file
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / weights_name))
  (out / config_name).write_text(json.dumps(config, indent=2) + "\n")
  return out


def read(directory: str | Path, weights_name: str, config_name: str, fmt: str,
         what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, config) of a directory written by `write`, with clear errors when it is not."""
  from safetensors.numpy import load_file
  d = Path(directory)
  cfg_path, weights = d / config_name, d / weights_name
  if not cfg_path.is_file() or not weights.is_file():
    raise FileNotFoundError(f"{directory}: not {what} (expected {config_name} and "
                            f"{weights_name}, as written by jaxinfer train-draft)")
  config = json.loads(cfg_path.read_text())
  if config.get("format") != fmt:
    raise ValueError(f"{directory}: format {config.get('format')!r}, expected {fmt!r}")
  return load_file(str(weights)), config


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """A pytree's leaves by their dotted path ("layer.attn.q", ...; under `prefix` if given), as
  `write` stores them."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  name = lambda k: jax.tree_util.keystr(k, simple=True, separator=".")
  return {(f"{prefix}.{name(k)}" if prefix else name(k)): v for k, v in leaves}


def unflatten(template, tensors: dict[str, np.ndarray], directory, prefix: str = "", dtype=None):
  """The pytree shaped like `template` (arrays or ShapeDtypeStructs) from `tensors` written by
  `flatten` — every name present, every shape right, or a ValueError naming the difference."""
  import jax
  import jax.numpy as jnp
  flat = flatten(template, prefix)
  for k, spec in flat.items():
    if k not in tensors:
      raise ValueError(f"{directory}: the weights lack {k}")
    if tensors[k].shape != spec.shape:
      raise ValueError(f"{directory}: {k} has shape {tensors[k].shape}, this model needs "
                       f"{spec.shape}")
  treedef = jax.tree_util.tree_structure(template)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(tensors[k], dtype or spec.dtype) for k, spec in flat.items()])
