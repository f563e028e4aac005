"""jaxinfer quantize: post-training weight quantization into a jaxinfer (orbax) checkpoint that
`jaxinfer generate --model=OUTPUT` serves."""

from __future__ import annotations

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import apply_platform_flags, define_model_flags, load_model_from_flags

define_model_flags()
flags.DEFINE_string("output", None, "Destination directory (a jaxinfer checkpoint).")
flags.DEFINE_string("format", None, "int8, int4, int2, ternary (BitNet b1.58 absmean), fp8_e4m3, "
                    "fp8_e5m2 or fp4_e2m1 (fp6_e2m3 / fp6_e3m2 need a jax whose XLA has 6-bit "
                    "types); :gN scales groups of N along each weight's declared group axis "
                    "(e.g. int4:g128), otherwise one scale per output channel.")
flags.DEFINE_list("include", [], "Also quantize these (attention and MLP weights always are): "
                  "embed, lm_head, norm.")
flags.mark_flags_as_required(["output", "format"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  apply_platform_flags()
  import jax

  from jaxinfer import checkpoint, quant
  from jaxinfer.model import Transformer

  try:
    fmt = quant.QuantFormat.parse(FLAGS.format, FLAGS.include)
  except ValueError as e:
    fail(str(e))
  try:
    _, src, cfg, params, _ = load_model_from_flags()
    quantized = quant.quantize_params(params, Transformer.spec(cfg), fmt)
    out = checkpoint.save_orbax(FLAGS.output, cfg, quantized, tokenizer_dir=src,
                                quant_format=fmt)
  except (FileNotFoundError, ValueError) as e:
    fail(str(e))
  size = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  print(f"wrote {fmt.name} checkpoint to {out} (parameters in memory: {size(params):,} -> "
        f"{size(quantized):,} bytes)")
