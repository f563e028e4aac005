"""Our own checkpoints: a directory with an HF-style config.json, the tokenizer files, and the
parameter pytree under params/ written by orbax; restored straight into the mesh's shardings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxinfer import params as P
from jaxinfer.checkpoint.hf import TOKENIZER_FILES, read_config
from jaxinfer.checkpoint.hf_config import config_to_hf
from jaxinfer.config import ModelConfig
from jaxinfer.model import Transformer
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules, make_mesh

PARAMS_DIR = "params"


def is_orbax_dir(directory: str | os.PathLike) -> bool:
  return (Path(directory) / PARAMS_DIR).is_dir() and (Path(directory) / "config.json").exists()


def save_orbax(directory: str | os.PathLike, cfg: ModelConfig, params: Transformer,
               tokenizer_dir: str | os.PathLike | None = None) -> Path:
  directory = Path(directory).absolute()
  P.check_against_spec(params, Transformer.spec(cfg))
  target = directory / PARAMS_DIR
  if target.exists() and jax.process_index() == 0:
    shutil.rmtree(target)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != directory.resolve():
      for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
          shutil.copyfile(Path(tokenizer_dir) / name, directory / name)
  return directory


def load_orbax(directory: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None,
               rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, Transformer]:
  directory = Path(directory).absolute()
  cfg = read_config(directory, dtype)
  spec = Transformer.spec(cfg)
  if mesh is None:
    mesh = make_mesh("data:1", jax.devices()[:1])
  target = P.abstract_params(spec, cfg.jnp_dtype, mesh, rules)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      params = ckptr.restore(directory / PARAMS_DIR, target)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{directory}: checkpoint does not match config.json: {e}") from None
  P.check_against_spec(params, spec, str(directory))
  return cfg, params
