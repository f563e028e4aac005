"""Draft-head files: safetensors weights + a JSON config with a format tag, written after
training and read when serving. The recipes' shared training set-up is `recipe`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.files import read_json_object, write_atomically


def write(directory: str | Path, weights_name: str, tensors: dict[str, np.ndarray],
          config_name: str, config: dict[str, Any]) -> Path:
  """Writes the weights, then the config that names them: a crash leaves no config (not heads,
  says `read`) or both whole, never one save's weights beside another's config."""
  from safetensors.numpy import save_file
  out = Path(directory).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  (out / config_name).unlink(missing_ok=True)
  tmp = out / (weights_name + ".tmp")
  save_file(tensors, str(tmp))
  os.replace(tmp, out / weights_name)
  write_atomically(out / config_name, json.dumps(config, indent=2) + "\n")
  return out


def read(directory: str | Path, weights_name: str, config_name: str, fmt: str,
         what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, config) of a directory written by `write`, with clear errors when it is not."""
  from safetensors.numpy import load_file
  d = Path(directory).expanduser()
  cfg_path, weights = d / config_name, d / weights_name
  if not cfg_path.is_file() or not weights.is_file():
    raise FileNotFoundError(f"{directory}: not {what} (expected {config_name} and "
                            f"{weights_name}, as written by jaxinfer train-draft)")
  config = read_json_object(cfg_path)
  if config.get("format") != fmt:
    raise ValueError(f"{directory}: format {config.get('format')!r}, expected {fmt!r}")
  try:
    return load_file(str(weights)), config
  except Exception as e:  # noqa: BLE001 (safetensors' own error type: a cut-short file, ...)
    raise ValueError(f"{weights}: not readable ({e})") from None


# The base model's record beside its heads: its shapes and a signature of its embedding table
# (rows spread over the first half of the vocabulary, projected onto fixed random directions),
# which another model of the same shapes does not share, while the same model in another dtype
# or with its table quantized does (cosine similarity near 1).
SIGNATURE_ROWS, SIGNATURE_DIMS, SAME_BASE = 16, 8, 0.9


def _signature(cfg, params) -> np.ndarray:
  import jax
  import jax.numpy as jnp

  from jaxinfer.quant.ops import take_rows
  ids = jnp.asarray(np.linspace(0, cfg.vocab_size // 2, SIGNATURE_ROWS).astype(np.int32))
  directions = np.random.default_rng(0).standard_normal((cfg.embed, SIGNATURE_DIMS))
  leaf = jax.tree_util.tree_leaves(params.embed)[0]
  mesh = getattr(leaf.sharding, "mesh", None)
  whole = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.jit(lambda e: take_rows(e, ids).astype(jnp.float32) @ directions.astype(np.float32),
                 out_shardings=whole)(params.embed)
  return np.asarray(rows, np.float64).ravel()


def base_record(cfg, params) -> dict[str, Any]:
  """What serving checks of the model the heads were trained on (`check_base`)."""
  return {"num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed,
          "signature": [round(float(v), 6) for v in _signature(cfg, params)]}


def check_base(directory, config: dict[str, Any], cfg, params) -> None:
  """ValueError where heads (their `config`) were trained on another model than (cfg, params);
  heads written without a record pass."""
  base = config.get("base")
  if not isinstance(base, dict):
    return
  have = {"num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed}
  differ = [f"{k} {base.get(k)} (the model's {v})" for k, v in have.items() if base.get(k) != v]
  if differ:
    raise ValueError(f"{directory}: trained on another model: {', '.join(differ)}")
  theirs, ours = np.asarray(base.get("signature", []), np.float64), _signature(cfg, params)
  if theirs.shape == ours.shape:
    similarity = float(theirs @ ours / max(np.linalg.norm(theirs) * np.linalg.norm(ours), 1e-30))
    if similarity < SAME_BASE:
      raise ValueError(f"{directory}: trained on another model of the same shapes (its "
                       f"embedding table differs: similarity {similarity:.2f}); train heads on "
                       f"this model")


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
