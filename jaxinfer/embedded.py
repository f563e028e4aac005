"""The embedded default model: a byte-level BPE tokenizer and a small Llama-style LM, both
trained here on the Python standard library's own source (present on every machine), cached
under ~/.cache/jaxinfer (or $JAXINFER_CACHE) as an ordinary Hugging Face model directory.

Every stage is cached and the training run checkpoints, so an interrupted build resumes. The
recipe's fingerprint names the cache folder: changing the recipe builds a new model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

from jaxinfer.config import PRESETS, ModelConfig
from jaxinfer.errors import UserError
from jaxinfer.files import write_atomically

EOS = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data"}  # the last two are data tables and help text, not code
TEST_DIRS = {"test", "tests", "idle_test"}


@dataclasses.dataclass(frozen=True)
class Recipe:
  model: ModelConfig = dataclasses.replace(PRESETS["embedded"], eos_token_ids=(0,))
  vocab_size: int = 4096
  tokenizer_chars: int = 6_000_000  # text the BPE merges are learned from
  heldout_percent: int = 4  # of files, chosen by a hash of their path
  include_tests: bool = False
  seq_len: int = 256
  batch_size: int = 16
  steps: int = 700
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  seed: int = 0

  def fingerprint(self) -> str:
    """Names the cache folder: any change to the recipe (or to the stdlib version) rebuilds."""
    blob = json.dumps([dataclasses.asdict(self), sys.version_info[:2], sorted(SKIP_DIRS),
                       sorted(TEST_DIRS)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


RECIPES = {
    "default": Recipe(),
    # The same pipeline in seconds, for tests: tiny tokenizer and model, a few steps.
    "smoke": Recipe(model=dataclasses.replace(PRESETS["tiny"], eos_token_ids=(0,)),
                    vocab_size=512, tokenizer_chars=300_000, seq_len=64, batch_size=8, steps=30,
                    warmup_steps=5),
}


def cache_root(override: str | os.PathLike | None = None) -> Path:
  """--cache_dir (`override`), else $JAXINFER_CACHE, else jaxinfer/ in the user's cache
  ($XDG_CACHE_HOME, else ~/.cache); UserError where it names something other than a
  directory."""
  if override:
    root, named = Path(override).expanduser(), "--cache_dir"
  elif os.environ.get("JAXINFER_CACHE"):
    root, named = Path(os.environ["JAXINFER_CACHE"]).expanduser(), "$JAXINFER_CACHE"
  else:
    # (an empty $XDG_CACHE_HOME is unset, as the XDG spec says: it once put the cache in a
    # relative ./jaxinfer)
    root, named = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() \
        / "jaxinfer", "the cache directory"
  if root.exists() and not root.is_dir():
    raise UserError(f"{named}: {str(root)!r} is not a directory")
  return root


def stdlib_root() -> Path:
  root = Path(sysconfig.get_paths()["stdlib"])
  if not (root / "os.py").exists():  # unusual layouts: derive from the base prefix
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
  if not (root / "os.py").exists():
    raise FileNotFoundError(f"cannot find the Python standard library source (looked in {root})")
  return root


def stdlib_files(recipe: Recipe) -> tuple[list[Path], list[Path]]:
  """(train files, held-out files) under the stdlib, sorted, split by a hash of the path."""
  root = stdlib_root()
  train, heldout = [], []
  for path in sorted(root.rglob("*.py")):
    parts = set(path.relative_to(root).parts[:-1])
    if parts & SKIP_DIRS or (not recipe.include_tests and parts & TEST_DIRS):
      continue
    rel = str(path.relative_to(root))
    bucket = zlib.crc32(rel.encode()) % 100
    (heldout if bucket < recipe.heldout_percent else train).append(path)
  if not train or not heldout:
    raise FileNotFoundError(f"{root}: too few Python files to build the embedded model")
  return train, heldout


def read_text(path: Path) -> str:
  return path.read_text(encoding="utf-8", errors="replace")


def heldout_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
  """n prompts of `length` tokens from the held-out files (benchmarks' prompts: the model's
  domain, text it was not trained on)."""
  out = []
  for f in stdlib_files(Recipe())[1]:
    ids = tokenizer.encode(read_text(f))
    for start in range(0, len(ids) - length, 4 * length):
      out.append(ids[start:start + length])
      if len(out) == n:
        return out
  raise RuntimeError(f"not enough held-out text for {n} prompts of {length} tokens")


def heldout_file_windows(tokenizer, n: int, length: int) -> list[list[int]]:
  """The middle `length` tokens of each of the first n held-out files (by path) longer than that:
  n prompts from n distinct files (benchmarks that must not measure one file's repetitions)."""
  out = []
  for f in stdlib_files(Recipe())[1]:
    ids = tokenizer.encode(read_text(f))
    if len(ids) > length:
      start = (len(ids) - length) // 2
      out.append(ids[start:start + length])
      if len(out) == n:
        return out
  raise ValueError(f"{n} prompts asked for, but the held-out files give {len(out)} windows of "
                   f"{length} tokens")


def train_tokenizer(files: list[Path], recipe: Recipe):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)

  def texts():
    budget = recipe.tokenizer_chars
    for f in files:
      text = read_text(f)
      yield text
      budget -= len(text)
      if budget <= 0:
        return

  tok.train_from_iterator(texts(), trainer)
  return tok


def encode_files(tok, files: list[Path]) -> np.ndarray:
  """All files as one uint16 token stream, each file followed by EOS."""
  eos = tok.token_to_id(EOS)
  out = []
  for start in range(0, len(files), 64):
    chunk = files[start:start + 64]
    for enc in tok.encode_batch([read_text(f) for f in chunk]):
      out.append(np.asarray(enc.ids, np.uint16))
      out.append(np.asarray([eos], np.uint16))
  return np.concatenate(out)


@contextlib.contextmanager
def _locked(directory: Path):
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _say(msg: str, quiet: bool) -> None:
  if not quiet:
    print(f"[embedded] {msg}", file=sys.stderr, flush=True)


def model_dir(cache: str | os.PathLike | None = None, recipe: Recipe = Recipe()) -> Path:
  return cache_root(cache) / f"embedded-{recipe.fingerprint()}" / "model"


def is_built(cache: str | os.PathLike | None = None, recipe: Recipe = Recipe()) -> bool:
  return (model_dir(cache, recipe) / "report.json").exists()


def ensure(cache: str | os.PathLike | None = None, recipe: Recipe = Recipe(),
           quiet: bool = False) -> Path:
  """The embedded model's directory, building whatever stage is missing first."""
  final = model_dir(cache, recipe)
  if (final / "report.json").exists():
    return final
  with _locked(final.parent):
    if (final / "report.json").exists():  # another process finished it meanwhile
      return final
    return _build(final.parent, recipe, quiet)


def _build(work: Path, recipe: Recipe, quiet: bool) -> Path:
  import jax
  from tokenizers import Tokenizer

  from jaxinfer import model as M
  from jaxinfer.checkpoint.hf import save_hf
  from jaxinfer.train import lm
  from jaxinfer.train.loop import TrainConfig, train

  t_start = time.perf_counter()
  train_files, heldout_files = stdlib_files(recipe)
  tok_path = work / "tokenizer.json"
  if not tok_path.exists():
    _say(f"training a {recipe.vocab_size}-token BPE tokenizer on {stdlib_root()}", quiet)
    tok = train_tokenizer(train_files, recipe)
    tok.save(str(tok_path) + ".tmp")
    os.replace(str(tok_path) + ".tmp", tok_path)
  tok = Tokenizer.from_file(str(tok_path))
  if tok.get_vocab_size() != recipe.vocab_size or tok.token_to_id(EOS) != 0:
    raise RuntimeError(f"{tok_path}: unexpected tokenizer (vocab {tok.get_vocab_size()}); "
                       f"delete {work} and rebuild")
  streams = {}
  for name, files in (("train", train_files), ("heldout", heldout_files)):
    path = work / f"{name}_tokens.npy"
    if not path.exists():
      _say(f"tokenizing {len(files)} {name} files", quiet)
      np.save(str(path) + ".tmp.npy", encode_files(tok, files))
      os.replace(str(path) + ".tmp.npy", path)
    streams[name] = np.load(path, mmap_mode="r")
  chars = sum(len(read_text(f)) for f in heldout_files)
  chars_per_token = chars / len(streams["heldout"])

  cfg = dataclasses.replace(recipe.model, vocab_size=recipe.vocab_size)
  windows = lm.TokenWindows(np.asarray(streams["train"]), recipe.batch_size, recipe.seq_len,
                            recipe.seed)
  heldout = lm.TokenWindows(np.asarray(streams["heldout"]), recipe.batch_size, recipe.seq_len)
  tcfg = TrainConfig(steps=recipe.steps, learning_rate=recipe.learning_rate,
                     warmup_steps=recipe.warmup_steps, checkpoint_every=200, log_every=20,
                     seed=recipe.seed, progress=not quiet)
  _say(f"training a {cfg.num_params() / 1e6:.1f}M-parameter model for {recipe.steps} steps on "
       f"{len(streams['train']) / 1e6:.1f}M tokens", quiet)
  params = M.init_params(cfg, jax.random.key(recipe.seed))
  t_train = time.perf_counter()
  params, _ = train(lm.lm_loss_fn(cfg), params, windows, tcfg, work / "run",
                    description="embedded model")
  train_seconds = time.perf_counter() - t_train
  heldout_loss = lm.evaluate(params, cfg, heldout, max_batches=16)
  report = {
      "heldout_loss_nats_per_token": round(heldout_loss, 4),
      "heldout_bits_per_char": round(heldout_loss / np.log(2) / chars_per_token, 4),
      "heldout_perplexity": round(float(np.exp(heldout_loss)), 2),
      "chars_per_token": round(chars_per_token, 3),
      "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
      "train_corpus_tokens": int(len(streams["train"])),
      "heldout_files": len(heldout_files),
      "parameters": cfg.num_params(),
      "train_seconds": round(train_seconds, 1),
      "build_seconds": round(time.perf_counter() - t_start, 1),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "recipe": recipe.fingerprint(),
  }
  _say(f"held-out loss {heldout_loss:.3f} nats/token ({report['heldout_bits_per_char']:.3f} "
       f"bits/char)", quiet)
  staging = work / "model.tmp"
  shutil.rmtree(staging, ignore_errors=True)
  save_hf(staging, cfg, params)
  shutil.copyfile(tok_path, staging / "tokenizer.json")
  write_atomically(staging / "tokenizer_config.json", json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
      "pad_token": EOS, "add_bos_token": False, "model_max_length": cfg.max_seq_len}, indent=2))
  write_atomically(staging / "report.json", json.dumps(report, indent=2) + "\n")
  final = work / "model"
  shutil.rmtree(final, ignore_errors=True)
  os.replace(staging, final)
  shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
  return final
