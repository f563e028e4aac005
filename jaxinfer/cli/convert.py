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
  from jaxinfer import checkpoint, quant
  from jaxinfer.checkpoint.destination import check_destination

  try:
    check_destination(FLAGS.output, None, FLAGS.format)  # (before the model is loaded)
    fmt = quant.read_metadata(checkpoint.resolve_model_dir(FLAGS.model, FLAGS.cache_dir))
    if fmt is not None and FLAGS.format == "hf":
      fail(f"--format=hf: {FLAGS.model} is quantized ({fmt.name}), and a Hugging Face directory "
           f"holds full-precision weights; convert the model it was quantized from, or use "
           f"--format=orbax")
    _, src, cfg, params, _ = load_model_from_flags(on_mesh=False)  # (copies to write out)
    if FLAGS.format == "hf":
      out = checkpoint.save_hf(FLAGS.output, cfg, params, tokenizer_dir=src)
    else:
      out = checkpoint.save_orbax(FLAGS.output, cfg, params, tokenizer_dir=src, quant_format=fmt)
  except (OSError, ValueError) as e:
    fail(str(e))
  print(f"wrote {FLAGS.format} checkpoint to {out}")
