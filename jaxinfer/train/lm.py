"""Causal language modelling on a token stream: windows sampled as a pure function of the step,
and the next-token loss over `model.forward` (optionally quantization-aware: the forward sees the
weights a quantized model serves), or the KL from a frozen teacher's logits. B batch, T window
len, V vocab."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as M
from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.runtime import Runtime


@dataclasses.dataclass
class TokenWindows:
  """Random (B, T+1) windows of a 1-D token array; batch `step` is fixed by (seed, step)."""

  tokens: np.ndarray
  batch_size: int
  seq_len: int
  seed: int = 0

  def __post_init__(self):
    if len(self.tokens) <= self.seq_len + 1:
      raise ValueError(f"TokenWindows: {len(self.tokens)} tokens cannot fill windows of "
                       f"{self.seq_len + 1}")

  def __call__(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)

  def sequential(self, max_batches: int | None = None):
    """Non-overlapping windows in order (for held-out evaluation)."""
    n = (len(self.tokens) - 1) // self.seq_len
    windows = [self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in range(n)]
    for b in range(0, len(windows) - self.batch_size + 1, self.batch_size):
      if max_batches is not None and b // self.batch_size >= max_batches:
        return
      yield np.stack(windows[b:b + self.batch_size]).astype(np.int32)


def next_token_logits(params: M.Transformer, tokens: jax.Array, cfg: ModelConfig,
                      runtime: Runtime = Runtime()) -> jax.Array:
  """tokens (B, T+1) -> float32 logits (B, T, V) predicting tokens[:, 1:]."""
  inputs = tokens[:, :-1]
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
  hidden, _ = M.forward(params, inputs, positions, cfg, runtime=runtime)
  return M.logits(params, hidden)


def token_losses(params: M.Transformer, tokens: jax.Array, cfg: ModelConfig,
                 runtime: Runtime = Runtime()) -> jax.Array:
  """tokens (B, T+1) -> per-position next-token cross entropy (B, T), float32."""
  logits = next_token_logits(params, tokens, cfg, runtime)
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return logz - gold


def lm_loss_fn(cfg: ModelConfig, qat: quant.QuantFormat | None = None):
  """The mean next-token loss; with `qat`, of the fake-quantized weights (straight-through
  gradients to the full-precision ones)."""
  spec = M.Transformer.spec(cfg)

  def loss_fn(params, frozen, batch, rng) -> tuple[jax.Array, dict[str, Any]]:
    del frozen, rng
    loss = jnp.mean(token_losses(quant.qat_params(params, spec, qat), batch, cfg))
    return loss, {}

  return loss_fn


def distill_loss_fn(cfg: ModelConfig, qat: quant.QuantFormat | None):
  """LLM-QAT's logit distillation: the mean per-position KL(teacher || student) on the batch.
  The student is the trained params (with `qat`, their fake-quantized view); the teacher is the
  loop's `frozen` params (the full-precision starting weights, never updated). The student's
  next-token loss is logged beside it."""
  spec = M.Transformer.spec(cfg)

  def loss_fn(params, teacher, batch, rng) -> tuple[jax.Array, dict[str, Any]]:
    del rng
    log_q = jax.nn.log_softmax(next_token_logits(quant.qat_params(params, spec, qat), batch, cfg))
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(next_token_logits(teacher, batch, cfg)))
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # (B, T)
    nll = -jnp.take_along_axis(log_q, batch[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(kl), {"next_token_loss": jnp.mean(nll)}

  return loss_fn


@partial(jax.jit, static_argnames="cfg")
def _summed_loss(params, batch, cfg):
  """Compiled once per model config and batch shape, for every evaluation of a run."""
  return jnp.sum(token_losses(params, batch, cfg))


def evaluate(params: M.Transformer, cfg: ModelConfig, windows: TokenWindows,
             max_batches: int | None = None) -> float:
  """Mean next-token loss (nats) over sequential windows."""
  total, count = 0.0, 0
  for batch in windows.sequential(max_batches):
    total += float(_summed_loss(params, batch, cfg))
    count += batch.shape[0] * (batch.shape[1] - 1)
  if not count:
    raise ValueError("evaluate: no complete evaluation batch")
  return total / count
