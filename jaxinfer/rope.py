"""Rotary position embeddings in Hugging Face's half-split convention, with "linear" and
"llama3" frequency scaling. B batch, T len, H head dim."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """(H/2,) float32, computed in float32 as the reference implementations do."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return (inv_freq / np.float32(s.factor)).astype(np.float32)
  if s.rope_type == "llama3":
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope_scaling: unsupported rope_type {s.rope_type!r}")


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """positions (B,T) -> cos, sin (B,T,H) in float32."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(cfg))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B,T,heads,H); cos/sin (B,T,H)."""
  cos = cos[:, :, None].astype(x.dtype)
  sin = sin[:, :, None].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
