"""Post-training quantization of a checkpoint: `jaxinfer.quantize(model, output, "int4:g128")`,
what `jaxinfer quantize` runs. The result is an orbax checkpoint that records its format and
that `jaxinfer.LLM(output)` (or `jaxinfer generate --model=output`) serves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jaxinfer.checkpoint.destination import check_destination
from jaxinfer.errors import UserError


def quantize(model: str, output: str, format: str, *, include: Sequence[str] = (),
             dtype: str = "auto", cache_dir: str | None = None) -> tuple[Path, int, int]:
  """Writes `model` (embedded, a Hugging Face or orbax directory) quantized to `format` (e.g.
  int8, int4:g128, fp8_e4m3; `include`: embed, lm_head, norm besides the attention and MLP
  weights); returns (the checkpoint, parameter bytes before, after)."""
  import jax

  from jaxinfer import checkpoint, quant
  from jaxinfer.model import Transformer
  if isinstance(include, str):  # (as the flag spells it)
    include = [part.strip() for part in include.split(",") if part.strip()]
  try:
    fmt = quant.QuantFormat.parse(format, tuple(include))
  except ValueError as e:
    flag = "--include" if isinstance(e, quant.IncludeError) else "--format"
    raise UserError(f"{flag}: {e}") from None
  try:
    src = checkpoint.resolve_model_dir(model, cache_dir)
    check_destination(output, src, "orbax")  # (before the model is loaded)
    cfg, params, _ = checkpoint.load_model(str(src), None if dtype == "auto" else dtype)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  try:
    fmt = fmt.for_model(cfg.tie_embeddings)
  except ValueError as e:
    raise UserError(f"--include: {model}: {e}") from None
  try:
    quantized = quant.quantize_params(params, Transformer.spec(cfg), fmt)
  except ValueError as e:  # (a group size that does not divide a weight's axis)
    raise UserError(f"--format: {e}") from None
  # (a training run's report, stale once the weights are replaced)
  (Path(output).expanduser() / "report.json").unlink(missing_ok=True)
  try:
    out = checkpoint.save_orbax(output, cfg, quantized, tokenizer_dir=src, quant_format=fmt)
  except (OSError, ValueError) as e:
    raise UserError(str(e)) from None
  size = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  return Path(out), size(params), size(quantized)
