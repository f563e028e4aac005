"""jaxinfer convert: Hugging Face directory <-> jaxinfer orbax checkpoint."""

from __future__ import annotations

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import apply_platform_flags, define_model_flags, load_model_from_flags

define_model_flags()
flags.DEFINE_string("output", None, "Destination directory.")
flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "hf: config.json + safetensors (+ tokenizer); "
                  "orbax: a jaxinfer checkpoint that restores straight onto a mesh.")
flags.mark_flags_as_required(["output"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  apply_platform_flags()
  from jaxinfer import checkpoint
  from jaxinfer.checkpoint.destination import check_destination

  try:
    check_destination(FLAGS.output, None, FLAGS.format)  # (before the model is loaded)
    _, src, cfg, params, _ = load_model_from_flags()
    save = checkpoint.save_hf if FLAGS.format == "hf" else checkpoint.save_orbax
    out = save(FLAGS.output, cfg, params, tokenizer_dir=src)
  except (FileNotFoundError, ValueError) as e:
    fail(str(e))
  print(f"wrote {FLAGS.format} checkpoint to {out}")
