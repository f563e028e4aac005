"""Loading a model by name: "embedded", a Hugging Face directory, or one of our orbax
checkpoints. Each is returned as (config, params, tokenizer or None)."""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from jaxinfer.checkpoint import pending
from jaxinfer.checkpoint.hf import load_hf, read_config, save_hf
from jaxinfer.checkpoint.hf import weights_save as hf_weights_save
from jaxinfer.checkpoint.orbax_io import is_orbax_dir, load_orbax, save_orbax
from jaxinfer.checkpoint.orbax_io import weights_save as orbax_weights_save
from jaxinfer.config import ModelConfig
from jaxinfer.model import Transformer
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules
from jaxinfer.tokenizer import Tokenizer

EMBEDDED = "embedded"

__all__ = ["EMBEDDED", "is_embedded", "load_model", "resolve_model_dir", "load_hf", "save_hf",
           "load_orbax", "save_orbax", "read_config"]


def is_embedded(name: str) -> bool:
  """`name` names the embedded model: "embedded" or "embedded:RECIPE" (a directory such as
  embedded_int4/ does not)."""
  return name == EMBEDDED or name.startswith(EMBEDDED + ":")


def resolve_model_dir(name: str, cache_dir: str | None = None, quiet: bool = False) -> Path:
  """A model directory for `name`; "embedded" (or "embedded:RECIPE") builds it if needed."""
  if is_embedded(name):
    from jaxinfer import embedded
    recipe = name.partition(":")[2] or "default"
    if recipe not in embedded.RECIPES:
      raise ValueError(f"--model: unknown embedded recipe {recipe!r} (known: "
                       f"{', '.join(embedded.RECIPES)})")
    return embedded.ensure(cache_dir, embedded.RECIPES[recipe], quiet=quiet)
  path = Path(os.path.expanduser(name))
  if not path.is_dir():
    raise FileNotFoundError(f"--model: {name!r} is not a directory (expected a Hugging Face "
                            f"model directory, a jaxinfer checkpoint, or 'embedded')")
  pending.settle(path, lambda: (hf_weights_save if any(path.glob("*.safetensors"))
                                else orbax_weights_save)(path))  # (a save cut short: finished)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"--model: {path} has no config.json")
  if not any(path.glob("*.safetensors")) and not is_orbax_dir(path):
    raise FileNotFoundError(f"--model: {path} has neither *.safetensors nor a params/ checkpoint")
  return path


def load_model(name: str, dtype: str | None = None, mesh: Mesh | None = None,
               rules: ShardingRules = DEFAULT_RULES, cache_dir: str | None = None,
               quiet: bool = False) -> tuple[ModelConfig, Transformer, Tokenizer | None]:
  path = resolve_model_dir(name, cache_dir, quiet)
  if any(path.glob("*.safetensors")):
    cfg, params = load_hf(path, dtype, mesh, rules)
  else:
    cfg, params = load_orbax(path, dtype, mesh, rules)
  return cfg, params, Tokenizer.from_dir(path)
