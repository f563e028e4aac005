"""Hugging Face checkpoint directories (config.json, *.safetensors [+ index], tokenizer.json):
read straight onto a mesh, and written back. No torch involved.

Each of our leaves maps to one HF tensor per layer through a (name, to_ours, to_hf) rule;
loading builds every shard with `jax.make_array_from_callback`, so a process only ever holds
one full tensor on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open as _safe_open
from safetensors.numpy import save_file

from jaxinfer import params as P
from jaxinfer.checkpoint import pending
from jaxinfer.checkpoint.destination import check_destination
from jaxinfer.checkpoint.hf_config import config_from_hf, config_to_hf
from jaxinfer.config import ModelConfig
from jaxinfer.files import read_json_object, write_atomically
from jaxinfer.model import MLP, Attention, Layer, Transformer
from jaxinfer.quant import is_quantized
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class TensorRule:
  name: str  # HF tensor name; "{i}" is the layer index
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: tuple[int, ...]


def _rules(cfg: ModelConfig) -> Transformer:
  """A Transformer-shaped tree of TensorRules (None where the model has no such tensor)."""
  d, n, k, h, f, v = (cfg.embed, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp,
                      cfg.vocab_size)
  same = lambda x: x
  tr = lambda x: x.T

  def proj_in(name, heads):  # HF (heads*H, D) <-> ours (D, heads, H)
    return TensorRule(name, lambda x: x.T.reshape(d, heads, h),
                      lambda x: x.reshape(d, heads * h).T, (heads * h, d))

  def bias(name, heads):
    return TensorRule(name, lambda x: x.reshape(heads, h), lambda x: x.reshape(-1), (heads * h,))

  def vec(name, size):
    return TensorRule(name, same, same, (size,))

  a = "model.layers.{i}.self_attn."
  m = "model.layers.{i}.mlp."
  attn = Attention.spec(cfg)
  layer = Layer(
      attn_norm=vec("model.layers.{i}.input_layernorm.weight", d),
      mlp_norm=vec("model.layers.{i}.post_attention_layernorm.weight", d),
      attn=Attention(
          q=proj_in(a + "q_proj.weight", n),
          k=proj_in(a + "k_proj.weight", k),
          v=proj_in(a + "v_proj.weight", k),
          o=TensorRule(a + "o_proj.weight", lambda x: x.T.reshape(n, h, d),
                       lambda x: x.reshape(n * h, d).T, (d, n * h)),
          q_bias=bias(a + "q_proj.bias", n) if attn.q_bias is not None else None,
          k_bias=bias(a + "k_proj.bias", k) if attn.k_bias is not None else None,
          v_bias=bias(a + "v_proj.bias", k) if attn.v_bias is not None else None,
          o_bias=vec(a + "o_proj.bias", d) if attn.o_bias is not None else None,
          q_norm=vec(a + "q_norm.weight", h) if attn.q_norm is not None else None,
          k_norm=vec(a + "k_norm.weight", h) if attn.k_norm is not None else None,
      ),
      mlp=MLP(
          gate=TensorRule(m + "gate_proj.weight", tr, tr, (f, d)),
          up=TensorRule(m + "up_proj.weight", tr, tr, (f, d)),
          down=TensorRule(m + "down_proj.weight", tr, tr, (d, f)),
      ),
  )
  return Transformer(
      embed=TensorRule("model.embed_tokens.weight", same, same, (v, d)),
      layers=tuple(jax.tree_util.tree_map(
          lambda r, i=i: dataclasses.replace(r, name=r.name.format(i=i)), layer,
          is_leaf=lambda x: isinstance(x, TensorRule)) for i in range(cfg.num_layers)),
      final_norm=vec("model.norm.weight", d),
      lm_head=None if cfg.tie_embeddings else TensorRule("lm_head.weight", tr, tr, (v, d)),
  )


def _is_rule(x) -> bool:
  return isinstance(x, TensorRule)


@contextlib.contextmanager
def safe_open(path: str, framework: str):
  """safetensors' reader, its errors (a truncated or damaged file) as a ValueError naming the
  file, one line (SafetensorError is neither an OSError nor a ValueError)."""
  try:
    with _safe_open(path, framework=framework) as f:
      yield f
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(directory: Path) -> dict[str, str] | list[str]:
  """What a load reads: the index's weight map (tensor -> file name) where there is one, else
  model.safetensors alone where it is there (as transformers reads it, whatever is beside),
  else every *.safetensors file (sorted)."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
      raise ValueError(f"{index}: no \"weight_map\" object of tensor names to file names")
    return weight_map
  if (directory / "model.safetensors").exists():
    return ["model.safetensors"]
  return sorted(p.name for p in directory.glob("*.safetensors"))


class SafetensorsReader:
  """Tensor name -> file, over one `model.safetensors` or an index of shards."""

  def __init__(self, directory: Path):
    self.directory = directory
    read = weight_files(directory)
    if isinstance(read, dict):
      self.files = {name: directory / f for name, f in read.items()}
    else:
      if not read:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
      self.files = {}
      for shard in read:
        with safe_open(str(directory / shard), framework="numpy") as f:
          self.files.update({name: directory / shard for name in f.keys()})

  def has(self, name: str) -> bool:
    return name in self.files

  def shape(self, name: str) -> tuple[int, ...]:
    with safe_open(str(self.files[name]), framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    with safe_open(str(self.files[name]), framework="numpy") as f:
      return f.get_tensor(name)


def read_config(directory: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
  directory = Path(directory)
  path = directory / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model directory)")
  hf = read_json_object(path)
  gen = directory / "generation_config.json"
  if dtype is None and not (hf.get("dtype") or hf.get("torch_dtype")):
    dtype = _stored_dtype(directory)  # (a config that names none: the weights' own)
  cfg = config_from_hf(hf, dtype)
  if gen.exists():  # generation_config's EOS ids (e.g. Llama 3 instruct's <|eot_id|>) also stop
    extra = read_json_object(gen).get("eos_token_id")
    extra = [extra] if isinstance(extra, int) else extra or []
    if not isinstance(extra, list) or not all(isinstance(e, int) for e in extra):
      raise ValueError(f"{gen}: eos_token_id must be a token id or a list of them, got "
                       f"{extra!r}")
    merged = tuple(dict.fromkeys(list(cfg.eos_token_ids) + extra))
    cfg = dataclasses.replace(cfg, eos_token_ids=merged)
  return cfg


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _stored_dtype(directory: Path) -> str | None:
  """The dtype the directory's floating-point weights are stored in (None: none found)."""
  files = weight_files(directory)
  files = sorted(set(files.values())) if isinstance(files, dict) else files
  if not files:
    return None
  with safe_open(str(directory / files[0]), framework="numpy") as f:
    stored = (_SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype()) for key in f.keys())
    return next((dtype for dtype in stored if dtype is not None), None)


SAVE_KEY = "jaxinfer_save"  # the save id (`pending`) in the weights' metadata


def weights_save(directory: Path) -> str | None:
  """The id of the save that wrote the weights a load reads (None: another program's)."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    return (read_json_object(index).get("metadata") or {}).get(SAVE_KEY)
  if (directory / "model.safetensors").exists():
    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
      return (f.metadata() or {}).get(SAVE_KEY)
  return None


def load_hf(directory: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None,
            rules: ShardingRules = DEFAULT_RULES) -> tuple[ModelConfig, Transformer]:
  """Reads a Hugging Face directory into (config, params), sharded over `mesh` when given."""
  directory = Path(directory)
  pending.settle(directory, lambda: weights_save(directory))
  cfg = read_config(directory, dtype)
  reader = SafetensorsReader(directory)
  rule_tree = _rules(cfg)
  spec_tree = Transformer.spec(cfg)
  np_dtype = NP_DTYPES[cfg.dtype]

  problems = []
  for rule in jax.tree_util.tree_leaves(rule_tree, is_leaf=_is_rule):
    if not reader.has(rule.name):
      problems.append(f"missing tensor {rule.name!r} (expected shape {rule.hf_shape})")
    elif reader.shape(rule.name) != rule.hf_shape:
      problems.append(f"tensor {rule.name!r} has shape {reader.shape(rule.name)}, expected "
                      f"{rule.hf_shape}")
  if cfg.tie_embeddings and reader.has("lm_head.weight") and reader.has(
      "model.embed_tokens.weight") and not np.array_equal(
          reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
    problems.append("config.json says tie_word_embeddings, but lm_head.weight is not the "
                    "embedding table (transformers 4 ties them and ignores it, transformers 5 "
                    "serves it): set tie_word_embeddings to say which")
  deeper = sorted({int(m.group(1)) for m in map(re.compile(r"model\.layers\.(\d+)\.").match,
                                                reader.files) if m} - set(range(cfg.num_layers)))
  if deeper:  # (weights of another model than config.json describes)
    problems.append(f"holds weights of layer {deeper[-1]}, but config.json describes "
                    f"{cfg.num_layers} layers")
  if problems:
    raise ValueError(f"{directory}: " + "; ".join(problems))

  def load_leaf(rule: TensorRule, spec: P.ParamSpec) -> jax.Array:
    full = np.ascontiguousarray(rule.to_ours(reader.get(rule.name)).astype(np_dtype))
    if mesh is None:
      return jax.device_put(full)
    sharding = rules.sharding(mesh, spec.axes, spec.shape)
    return jax.make_array_from_callback(spec.shape, sharding, lambda idx: full[idx])

  params = jax.tree_util.tree_map(load_leaf, rule_tree, spec_tree, is_leaf=_is_rule)
  return cfg, params


def _host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf(directory: str | os.PathLike, cfg: ModelConfig, params: Transformer,
            tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = 4 * 2**30) -> Path:
  """Writes a Hugging Face directory that transformers (and `load_hf`) read back."""
  directory = check_destination(directory, tokenizer_dir, "hf")
  P.check_against_spec(params, Transformer.spec(cfg))
  if any(map(is_quantized, jax.tree_util.tree_leaves(params, is_leaf=is_quantized))):
    raise ValueError(f"{directory}: quantized parameters are written as jaxinfer (orbax) "
                     f"checkpoints only; convert the full-precision model instead")
  tensors: dict[str, np.ndarray] = {}
  for rule, leaf in zip(jax.tree_util.tree_leaves(_rules(cfg), is_leaf=_is_rule),
                        jax.tree_util.tree_leaves(params)):
    tensors[rule.name] = np.ascontiguousarray(rule.to_hf(_host(leaf)))
  if jax.process_index() == 0:
    _write(directory, cfg, tensors, tokenizer_dir, max_shard_bytes)
  if jax.process_count() > 1:  # (every process returns with the checkpoint in place)
    multihost_utils.sync_global_devices(f"jaxinfer save_hf {directory}")
  return directory


def _write(directory: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray],
           tokenizer_dir: str | os.PathLike | None, max_shard_bytes: int) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  pending.settle(directory, lambda: weights_save(directory))
  save_id = pending.new_id()
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if size and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  # Written beside the weights they replace, and put in their place once all are whole: a save
  # killed while writing leaves the old checkpoint as it was (the old files were deleted first).
  # The file that says which weights are read is replaced last, in one rename (the index; one
  # model.safetensors without an index), so no moment reads old and new weights mixed: new shards
  # never take the names of the shards an index still lists. config.json and the rest take
  # their places with them (`pending`).
  read = weight_files(directory)
  names = _shard_names(len(shards), set(read.values() if isinstance(read, dict) else read))
  for stale in directory.glob("*.safetensors.new"):  # (a save cut short before)
    stale.unlink()
  for name, shard in zip(names, shards):
    staged = directory / f"{name}.new"
    save_file(shard, str(staged), metadata={"format": "pt", SAVE_KEY: save_id})
    with open(staged, "rb") as f:  # (on disk before it replaces anything)
      os.fsync(f.fileno())
  with pending.staged(directory, save_id, *_descriptions(directory, cfg, tokenizer_dir)):
    for name in names:
      os.replace(directory / f"{name}.new", directory / name)
    index = directory / "model.safetensors.index.json"
    if len(shards) == 1:
      index.unlink(missing_ok=True)
    else:
      weight_map = {t: name for name, shard in zip(names, shards) for t in shard}
      total = sum(t.nbytes for t in tensors.values())
      write_atomically(index, json.dumps({"metadata": {"total_size": total, SAVE_KEY: save_id},
                                          "weight_map": weight_map}, indent=2))
    for old in directory.glob("*.safetensors"):
      if old.name not in names:
        old.unlink()


def _descriptions(directory: Path, cfg: ModelConfig,
                  tokenizer_dir) -> tuple[dict[str, bytes], tuple[str, ...]]:
  """What a Hugging Face directory holds beside its weights (config.json, the tokenizer files
  and generation_config.json), and the files to remove (`tokenizer_files`)."""
  files = {"config.json": (json.dumps(config_to_hf(cfg), indent=2) + "\n").encode()}
  tokenizer, remove = tokenizer_files(tokenizer_dir, directory)
  files.update(tokenizer)
  if "generation_config.json" not in files:
    # one already here (a model saved here before) keeps its other settings, with this model's
    # ids: its old EOS ids would stop this model early
    path = directory / "generation_config.json"
    gen: dict[str, Any] = read_json_object(path, missing_ok=True)
    gen["bos_token_id"] = cfg.bos_token_id
    gen.pop("eos_token_id", None)
    if cfg.eos_token_ids:
      gen["eos_token_id"] = list(cfg.eos_token_ids)
    files["generation_config.json"] = (json.dumps(gen, indent=2) + "\n").encode()
  return files, tuple(n for n in remove if n not in files)


def tokenizer_files(tokenizer_dir: str | os.PathLike | None,
                    directory: Path) -> tuple[dict[str, bytes], tuple[str, ...]]:
  """The TOKENIZER_FILES `tokenizer_dir` has, by name, to be written into `directory`, and
  those it lacks, to be removed there (a model saved there before left them: its
  chat_template.jinja would be read before this model's template); nothing where there is no
  `tokenizer_dir`, or it is `directory`."""
  if tokenizer_dir is None or Path(tokenizer_dir).resolve() == directory.resolve():
    return {}, ()
  have = {name: (Path(tokenizer_dir) / name).read_bytes() for name in TOKENIZER_FILES
          if (Path(tokenizer_dir) / name).exists()}
  return have, tuple(name for name in TOKENIZER_FILES if name not in have)


def _shard_names(count: int, read: set[str]) -> list[str]:
  """Hugging Face's names for `count` shards (one: model.safetensors), or, where a load reads
  shards of those names now (a sharded checkpoint saved over), the same with a suffix: the old
  index names the old shards until the new index replaces it."""
  if count == 1:
    return ["model.safetensors"]
  for suffix in ("", "-b"):
    names = [f"model-{i + 1:05d}-of-{count:05d}{suffix}.safetensors" for i in range(count)]
    if not read & set(names):
      return names
  raise ValueError(f"an index naming both model-N-of-{count:05d}.safetensors and "
                   f"model-N-of-{count:05d}-b.safetensors: choose another directory")
