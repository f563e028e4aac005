"""Test session setup: 8 simulated CPU devices (set before JAX initialises its backend), and one
persistent compilation cache for the test workers and the commands they start (so a computation
compiled by one is loaded by the others; a clean checkout starts it empty).

The tests' programs are small and mostly compiled once, so XLA's CPU backend skips LLVM's
optimisation passes for them (`--xla_backend_optimization_level=0`: about a quarter less compile
time on a clean checkout) and, with jaxlib 0.10, emits fusions through its older elemental
emitters rather than the MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`: the engine's
verification steps compile in half the time; jaxlib 0.11's XLA no longer has the switch, and an
unknown XLA flag is fatal) and hands LLVM each program whole rather than split into 32 modules
compiled in parallel (`--xla_cpu_parallel_codegen_split_count=1`: on two cores, each busy with a
test worker, the split only adds work; the longest engine test took 17% less time). Every
comparison a test makes is between results computed under the same flags; benchmarks and real runs
keep XLA's default."""

import os
from importlib import metadata
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
if metadata.version("jaxlib").startswith("0.10."):
  os.environ["XLA_FLAGS"] += (" --xla_cpu_use_fusion_emitters=false"
                              " --xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's compile-only client (tests that compile for TPU topologies): no cloud metadata
# server, and both test workers may load it at once.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla"))
# Every program kept, however quickly it compiled (jaxinfer keeps those over 0.2 s): the tests
# compile many small ones again and again (the same steps for the same tiny models).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from jaxinfer import compilation_cache  # noqa: E402

compilation_cache.enable(os.environ["JAX_COMPILATION_CACHE_DIR"])

# The property tests draw the same examples on every run, so a run's result does not depend on
# the draw; HYPOTHESIS_PROFILE=explore draws new ones each time.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

if os.environ["JAX_PLATFORMS"].split(",")[0] != "cpu":
  # An accelerator's float32 matmuls default to lower precision (TF32 on a GPU): the references
  # that the kernels are compared with are computed in full float32 there, as on a CPU.
  jax.config.update("jax_default_matmul_precision", "highest")


# The longest files first: the two test workers take whole files (--dist loadfile) in collection
# order (--no-loadscope-reorder: xdist would order them by their number of tests), and a long file
# taken late ran alone while the other worker, done with its share, sat idle.
LONGEST_FILES = ("test_speculative.py", "test_engine.py", "test_engine_speculation.py",
                 "test_draft_heads.py", "test_notebooks.py", "test_kv_cache_int8.py")


def pytest_collection_modifyitems(items):
  first = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: first.get(item.path.name, len(first)))  # (stable: the rest in order)


@pytest.fixture(scope="session")
def tpu_device():
  """tpu_device(name) -> the first device of a TPU topology ("v5e:2x2", "v6e:2x2", ...) from
  libtpu's compile-only client, as JAX on that slice sees it (`jaxinfer compile`'s): programs
  compile for it here, with no TPU attached."""
  from jaxinfer import aot
  cache = {}

  def get(name: str):
    if name not in cache:
      cache[name] = aot.target_devices(aot.Target("tpu", name))[0]
    return cache[name]

  return get


@pytest.fixture
def no_persistent_cache():
  """For tests that compile for a TPU topology: its executables cannot be loaded back from the
  persistent cache here, so they are kept out of it."""
  with compilation_cache.suspended():
    yield


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"
  return jax.devices()


def own_devices_env() -> dict[str, str]:
  """The environment for a process that chooses its own number of CPU devices (one unless it
  says otherwise): the tests' XLA flags but their 8 simulated devices. A command run without
  --mesh makes a replica of each device, and each replica compiles its own steps."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


TINY_TEXT = """def add(a, b):
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return f"Point({self.x}, {self.y})"
""" * 4


def make_tiny_model_dir(directory, seed=0, **overrides):
  """A random Llama-style model with a small byte-level BPE tokenizer, saved in HF format."""
  import dataclasses
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from jaxinfer import model as M
  from jaxinfer.checkpoint import save_hf
  from jaxinfer.config import PRESETS

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TINY_TEXT], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.get_vocab_size(), eos_token_ids=(0,),
                            **overrides)
  params = M.init_params(cfg, jax.random.key(seed))
  save_hf(directory, cfg, params)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
  return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
