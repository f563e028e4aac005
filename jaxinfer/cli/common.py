"""Flags shared by several commands."""

from __future__ import annotations

from absl import flags

from jaxinfer.config import DTYPES
# (the training commands')
from jaxinfer.train.workdir import check_data, check_workdir, record_settings  # noqa: F401


def define_model_flags(devices: bool = True, cache_dir: bool = True) -> None:
  """--model, --dtype and (cache_dir: a command that may build the embedded model) --cache_dir;
  with `devices` (a command that computes on a mesh), --mesh, --cpu_devices and
  --compilation_cache too."""
  flags.DEFINE_string("model", "embedded", "Hugging Face model directory, jaxinfer checkpoint "
                      "directory, or 'embedded' (the default model, built locally if missing).")
  flags.DEFINE_enum("dtype", "auto", ["auto"] + sorted(DTYPES),
                    "Parameter/activation dtype; auto uses the checkpoint's own.")
  if cache_dir:
    flags.DEFINE_string("cache_dir", None, "Where the embedded model is cached (default "
                        "$JAXINFER_CACHE, else $XDG_CACHE_HOME/jaxinfer or "
                        "~/.cache/jaxinfer).")
  if not devices:
    return
  define_mesh_flag()
  flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices (testing meshes "
                       "without accelerators).", lower_bound=1)
  define_compilation_cache_flag()


def define_mesh_flag() -> None:
  flags.DEFINE_string("mesh", "", "Device mesh, e.g. data:4,model:2 (axes data, fsdp, model; "
                      "absent axes are 1). Empty: all devices on the data axis.")


def define_implementation_flag() -> None:
  from jaxinfer.attention import IMPLEMENTATIONS
  flags.DEFINE_enum("implementation", "xla", sorted(IMPLEMENTATIONS),
                    "Attention: xla (plain jnp, the reference), pallas (jaxinfer's kernels: "
                    "block-sparse prefill, paged decode, tree verification; interpreted on CPU) or "
                    "splash (jax's TPU splash kernel where a chunk attends only to itself, as "
                    "in the static generator and training; the engine prefills over its KV "
                    "pages, which splash does not read, so serving with it runs pallas).")


def define_compilation_cache_flag() -> None:
  flags.DEFINE_string("compilation_cache", None, "Directory of compiled XLA executables kept "
                      "across runs, so a repeated run skips compilation (default: "
                      "$JAX_COMPILATION_CACHE_DIR, else xla/ in the cache directory; 'none' "
                      "turns it off).")


def apply_compilation_cache() -> None:
  from jaxinfer import compilation_cache
  from jaxinfer.cli import fail
  from jaxinfer.errors import UserError
  try:
    compilation_cache.apply(flags.FLAGS.compilation_cache, flags.FLAGS.cache_dir)
  except UserError as e:  # (a --cache_dir that is not a directory)
    fail(str(e))


def apply_platform_flags() -> None:
  """Must run before the first JAX computation."""
  FLAGS = flags.FLAGS
  if FLAGS.cpu_devices:
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  apply_compilation_cache()


def load_model_from_flags(on_mesh: bool = True):
  """(mesh, model directory, config, params, tokenizer) from the model flags; on_mesh: the
  params placed on --mesh (empty: every device on `data`), else on --mesh only where given.

  Raises FileNotFoundError / ValueError with user-facing messages."""
  from jaxinfer import checkpoint
  from jaxinfer.sharding import mesh_flag

  FLAGS = flags.FLAGS
  mesh = mesh_flag(FLAGS.mesh) if on_mesh or FLAGS.mesh else None
  src = checkpoint.resolve_model_dir(FLAGS.model, FLAGS.cache_dir)
  cfg, params, tokenizer = checkpoint.load_model(
      str(src), None if FLAGS.dtype == "auto" else FLAGS.dtype, mesh)
  return mesh, src, cfg, params, tokenizer


def data_tokens(tokenizer, src, cfg, data: str | None = None):
  """The --data text (or `data`'s) as one token array (documents separated by EOS), for
  training commands.

  Raises FileNotFoundError / ValueError with user-facing messages."""
  from jaxinfer.chat import ChatTemplate
  from jaxinfer.train.data import load_text_tokens
  if tokenizer is None:
    raise ValueError(f"--model: {src} has no tokenizer.json; training on text needs one")
  return load_text_tokens(data or flags.FLAGS.data, tokenizer,
                          cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
                          ChatTemplate.from_dir(src), cfg.vocab_size)


def define_resume_flag() -> None:
  flags.DEFINE_bool("resume", False, "Continue the run in the workdir (after a crash, a kill or "
                    "a preemption) from its last checkpoint, with the same data order. Without "
                    "it, a workdir that already holds a run is an error, not silently reused.")
