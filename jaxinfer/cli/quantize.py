"""jaxinfer quantize: post-training weight quantization into a jaxinfer (orbax) checkpoint that
`jaxinfer generate --model=OUTPUT` serves."""

from __future__ import annotations

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import define_model_flags

define_model_flags(devices=False)  # (quantizes on the default device: no mesh to name)
flags.DEFINE_string("output", None, "Destination directory (a jaxinfer checkpoint).")
flags.DEFINE_string("format", None, "int8, int4, int2, ternary (BitNet b1.58 absmean), fp8_e4m3, "
                    "fp8_e5m2, fp6_e2m3, fp6_e3m2 or fp4_e2m1; :gN scales "
                    "groups of N along each weight's declared group axis (e.g. int4:g128), "
                    "otherwise one scale per output channel; :a8 also quantizes each linear "
                    "layer's input to int8 per token (integer weights).")
flags.DEFINE_list("include", [], "Also quantize these (attention and MLP weights always are): "
                  "embed, lm_head, norm.")
flags.mark_flags_as_required(["output", "format"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  from jaxinfer.errors import UserError
  from jaxinfer.quant.convert import quantize

  try:
    out, before, after = quantize(FLAGS.model, FLAGS.output, FLAGS.format, include=FLAGS.include,
                                  dtype=FLAGS.dtype, cache_dir=FLAGS.cache_dir)
  except UserError as e:
    fail(str(e))
  print(f"wrote {FLAGS.format} checkpoint to {out} (parameters in memory: {before:,} -> "
        f"{after:,} bytes)")
