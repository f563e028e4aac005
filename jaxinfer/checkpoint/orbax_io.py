"""Our own checkpoints: a directory with an HF-style config.json, the tokenizer files, and the
parameter pytree under params/ written by orbax; restored straight into the mesh's shardings.
A quantized model (jaxinfer quantize) also has quantization.json naming its format (params/
record it too, and must agree); its quantized leaves are qwix QArrays, restored bit for bit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxinfer import params as P
from jaxinfer import quant
from jaxinfer.checkpoint.destination import check_destination
from jaxinfer.checkpoint import pending
from jaxinfer.checkpoint.hf import read_config, tokenizer_files
from jaxinfer.checkpoint.hf_config import config_to_hf
from jaxinfer.config import ModelConfig
from jaxinfer.model import Transformer
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules, make_mesh

PARAMS_DIR = "params"


def is_orbax_dir(directory: str | os.PathLike) -> bool:
  return _params_dir(Path(directory)).is_dir() and (Path(directory) / "config.json").exists()


def _params_dir(directory: Path) -> Path:
  """params/, or the params.old/ a save cut short between its two renames (see _put_in_place)
  left without it: the arrays config.json still describes."""
  path = directory / PARAMS_DIR
  old = path.with_name(PARAMS_DIR + ".old")
  return old if not path.exists() and old.is_dir() else path


def save_orbax(directory: str | os.PathLike, cfg: ModelConfig, params: Transformer,
               tokenizer_dir: str | os.PathLike | None = None,
               quant_format: quant.QuantFormat | None = None) -> Path:
  """Writes `params`; quantized params need the `quant_format` they were quantized with."""
  directory = check_destination(directory, tokenizer_dir, "orbax").absolute()
  spec = Transformer.spec(cfg)
  P.check_against_spec(params, spec, shape_of=quant.logical_shape)
  _check_format(params, spec, quant_format, directory)
  if jax.process_index() == 0:
    pending.settle(directory, lambda: weights_save(directory))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxinfer save_orbax settled {directory}")
  # Written beside the checkpoint it replaces, which is removed only once the new one is
  # whole: a save cut short leaves the old checkpoint as it was (removed first, both were lost).
  # config.json and the rest take their places with params/ (`pending`).
  staged = directory / f"{PARAMS_DIR}.new"
  save_id = pending.new_id() if jax.process_index() == 0 else None
  if jax.process_count() > 1:  # (one id, process 0's, in every process's metadata)
    save_id = multihost_utils.broadcast_one_to_all(
        np.frombuffer(bytes.fromhex(save_id or "0" * 32), np.uint8)).tobytes().hex()
  with ocp.StandardCheckpointer() as ckptr:  # (the format in params/ too: see load_orbax)
    ckptr.save(staged, params, custom_metadata={QUANT_KEY: _record(quant_format),
                                                SAVE_KEY: save_id},
               force=True)  # (orbax removes what a save cut short left there, once, for all)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    tokenizer, remove = tokenizer_files(tokenizer_dir, directory)
    files = {"config.json": (json.dumps(config_to_hf(cfg), indent=2) + "\n").encode(),
             **tokenizer}
    if quant_format is not None:
      files[quant.QUANT_FILE] = quant.metadata_text(quant_format).encode()
    else:
      remove += (quant.QUANT_FILE,)
    with pending.staged(directory, save_id, files, remove):
      _put_in_place(staged, directory / PARAMS_DIR)
  if jax.process_count() > 1:  # (every process returns with the checkpoint in place)
    multihost_utils.sync_global_devices(f"jaxinfer save_orbax {directory}")
  return directory


def _put_in_place(new: Path, path: Path) -> None:
  """`new` renamed to `path`; what was there is removed once `new` has taken its place (a
  removal that fails leaves it beside, for the next save to remove)."""
  old = path.with_name(path.name + ".old")
  if path.exists():
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
  new.rename(path)  # (without path, old is what a load reads until here: kept till now)
  shutil.rmtree(old, ignore_errors=True)


SAVE_KEY = "save"  # params/' record of the save (`pending`) that wrote them


def weights_save(directory: Path) -> str | None:
  """The id of the save that wrote the params/ a load reads (None: none there)."""
  source = _params_dir(directory)
  if not source.is_dir():
    return None
  with ocp.StandardCheckpointer() as ckptr:
    custom = getattr(ckptr.metadata(source), "custom_metadata", None)
  return custom.get(SAVE_KEY) if isinstance(custom, dict) else None


def load_orbax(directory: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None,
               rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, Transformer]:
  directory = Path(directory).absolute()
  pending.settle(directory, lambda: weights_save(directory))
  cfg = read_config(directory, dtype)
  spec = Transformer.spec(cfg)
  if mesh is None:
    mesh = make_mesh("data:1", jax.devices()[:1])
  target = P.abstract_params(spec, cfg.jnp_dtype, mesh, rules)
  fmt = quant.read_metadata(directory, cfg.tie_embeddings)
  if fmt is not None:
    try:
      target = quant.abstract_quantized(target, spec, fmt, mesh, rules)
    except ValueError as e:  # (a group size that does not divide this model's axis)
      raise ValueError(f"{directory / quant.QUANT_FILE}: {e}") from None
  described = "config.json" + (f" and {quant.QUANT_FILE} ({fmt.name})" if fmt else "")
  source = _params_dir(directory)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      meta = ckptr.metadata(source)
      stored = getattr(meta, "item_metadata", None)
      differ = None if stored is None else _first_difference(target, stored)
      if differ is None:
        differ = _format_difference(getattr(meta, "custom_metadata", None), fmt, cfg)
      if differ is None:
        params = ckptr.restore(source, target)
    except Exception as e:  # (orbax's own: a missing or damaged array file, ...)
      if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        raise
      first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
      differ = first.split(" [tensorstore_spec")[0]  # (tensorstore's specs: kilobytes of JSON)
  if differ is not None:  # (checked before restoring: a failed restore is orbax's traceback)
    raise ValueError(f"{directory}: {source.name}/ does not restore as {described} describe "
                     f"it: {differ}")
  P.check_against_spec(params, spec, str(directory), quant.logical_shape)
  return cfg, params


QUANT_KEY = "quantization"  # params/' own record of the format they were quantized with


def _record(fmt: quant.QuantFormat | None) -> dict | None:
  return None if fmt is None else {"format": fmt.name, "include": list(fmt.include)}


def _format_difference(custom: dict | None, fmt: quant.QuantFormat | None,
                       cfg: ModelConfig) -> str | None:
  """Where the format params/ were written with differs from the one QUANT_FILE names, in one
  line (None where they agree, or params/ predate the record). Formats of one storage width
  (int4 and fp4 e2m1, fp6 e2m3 and e3m2) restore alike and serve differently: a QUANT_FILE left
  from an earlier model (a save cut short between params/ and it) or edited by hand would serve
  the values wrongly without a word."""
  if not isinstance(custom, dict) or QUANT_KEY not in custom:
    return None
  written = custom[QUANT_KEY]
  if written is not None:
    written = quant.QuantFormat.parse(written["format"], written.get("include", ()))
    written = written.for_model(cfg.tie_embeddings)
  if written == fmt:
    return None
  name = lambda f: f"{f.name} (include {list(f.include)})"
  was = "in full precision" if written is None else f"quantized as {name(written)}"
  says = (f"there is no {quant.QUANT_FILE}" if fmt is None
          else f"{quant.QUANT_FILE} names {name(fmt)}")
  return f"its arrays were written {was}, but {says}"


CASTS = frozenset(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))  # (--dtype's)


def _first_difference(target, stored) -> str | None:
  """Where the stored arrays (orbax's metadata tree) differ from the target's shapes and dtypes,
  in one line; None where they agree. Float arrays restore cast to the dtype asked for
  (`--dtype`); other dtypes (packed values, integers, 8-bit floats) must be the stored ones."""
  name = lambda path: ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                               for k in path)
  want = {name(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
  have = {name(p): x for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  for key, x in want.items():
    if key not in have:
      return f"{key} is not stored"
    got = have[key]
    dtypes = {jnp.dtype(got.dtype), jnp.dtype(x.dtype)}
    if tuple(got.shape) != tuple(x.shape) or (len(dtypes) > 1 and not dtypes <= CASTS):
      return (f"{key} is stored as {jnp.dtype(got.dtype).name}{list(got.shape)}, expected "
              f"{jnp.dtype(x.dtype).name}{list(x.shape)}")
  extra = sorted(set(have) - set(want))
  return f"{extra[0]} is stored but not expected" if extra else None


def _check_format(params, spec, fmt: quant.QuantFormat | None, directory: Path) -> None:
  """The tree's quantized leaves must be exactly the ones `fmt` names, so that it restores."""
  if fmt is None:
    if any(map(quant.is_quantized, jax.tree_util.tree_leaves(params, is_leaf=quant.is_quantized))):
      raise ValueError(f"{directory}: the parameters are quantized; pass their format")
    return
  target = quant.abstract_quantized(P.abstract_params(spec, jnp.float32), spec, fmt)
  (t_leaves, t_def), (p_leaves, p_def) = map(jax.tree_util.tree_flatten, (target, params))
  if t_def != p_def or any(t.shape != p.shape for t, p in zip(t_leaves, p_leaves)):
    raise ValueError(f"{directory}: the parameters do not match quantization format "
                     f"{fmt.name} (include {list(fmt.include)})")
