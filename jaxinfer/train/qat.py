"""Quantization-aware fine-tuning: the shared training loop over the fake-quantized forward
(`lm.lm_loss_fn(cfg, qat=fmt)`), or over LLM-QAT's distillation from the starting model
(`lm.distill_loss_fn`), ending in the checkpoint a quantized model is served from.

The loop trains, and checkpoints, the full-precision weights; a resumed run restores them like
any other. Only the end result is quantized, by the same `quant.quantize_params` as PTQ, so the
served logits are the QAT forward's bit for bit.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.model import Transformer
from jaxinfer.train import lm
from jaxinfer.train.loop import TrainConfig, train


def check(cfg: ModelConfig, params: Transformer, fmt: quant.QuantFormat) -> None:
  """One-line ValueError before any step runs: a group size that does not divide a weight, or
  weights that are already quantized (QAT trains the full-precision ones)."""
  quant.selected_specs(Transformer.spec(cfg), fmt)
  if quant.holds_quantized(params):
    raise ValueError(f"QAT for {fmt.name}: the model's weights are already quantized; start from "
                     f"the full-precision model")


def finetune(cfg: ModelConfig, params: Transformer, batch_fn: Callable[[int], Any],
             tcfg: TrainConfig, workdir: str | os.PathLike, fmt: quant.QuantFormat,
             distill: bool = False, mesh: Mesh | None = None,
             description: str = "qat") -> tuple[Transformer, list[dict[str, float]]]:
  """`train` with the QAT loss; with `distill`, the KL from `params` as they are now (frozen).
  Like `train`, consumes `params` (their buffers are donated) and resumes from `workdir`."""
  check(cfg, params, fmt)
  if not distill:
    return train(lm.lm_loss_fn(cfg, qat=fmt), params, batch_fn, tcfg, workdir, mesh=mesh,
                 description=description)
  teacher = jax.tree_util.tree_map(jnp.copy, params)  # the loop donates the student's buffers
  return train(lm.distill_loss_fn(cfg, fmt), params, batch_fn, tcfg, workdir, frozen=teacher,
               mesh=mesh, description=description)


def served(cfg: ModelConfig, params: Transformer, fmt: quant.QuantFormat) -> Transformer:
  """The weights a quantized model serves: PTQ of the (QAT-trained) full-precision weights,
  for `checkpoint.save_orbax(..., quant_format=fmt)`."""
  return quant.quantize_params(params, Transformer.spec(cfg), fmt)

