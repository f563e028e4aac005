"""Model configuration: one frozen dataclass per concern plus named presets.

Variants are made with `dataclasses.replace`; nothing deep inside the model reads flags.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax.numpy as jnp

Family = Literal["llama", "qwen2", "qwen3", "mistral"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face configs spell it ("linear" or "llama3")."""

  rope_type: Literal["linear", "llama3"]
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama family (Llama 2/3, Qwen2/2.5/3, Mistral)."""

  vocab_size: int
  embed: int  # D
  num_layers: int
  q_heads: int  # N
  kv_heads: int  # K
  head_dim: int  # H
  mlp: int  # F
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2
  o_bias: bool = False  # Llama `attention_bias=True` also biases o_proj
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  tie_embeddings: bool = False
  sliding_window: int | None = None  # attend to keys with q_pos - window < k_pos <= q_pos
  # Per-layer attention kind, as transformers-5 configs spell it; None means all "full_attention"
  # unless sliding_window is set, in which case all layers slide (Mistral).
  layer_types: tuple[str, ...] | None = None
  dtype: str = "float32"  # parameter and activation dtype; softmax and norms run in float32
  family: Family = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    errors = []
    for name in ("vocab_size", "embed", "num_layers", "q_heads", "kv_heads", "head_dim", "mlp",
                 "max_seq_len"):
      if getattr(self, name) <= 0:
        errors.append(f"{name} must be positive, got {getattr(self, name)}")
    if self.kv_heads > 0 and self.q_heads % self.kv_heads:
      errors.append(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
    if self.head_dim % 2:
      errors.append(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in DTYPES:
      errors.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        errors.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
      if bad:
        errors.append(f"unsupported layer_types {sorted(bad)}")
    if errors:
      raise ValueError("ModelConfig: " + "; ".join(errors))

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  def keep_layers(self, layers: Sequence[int]) -> "ModelConfig":
    """This configuration with only `layers` (indices, in order), each keeping its attention
    kind."""
    kinds = None if self.layer_types is None else tuple(self.layer_types[i] for i in layers)
    return dataclasses.replace(self, num_layers=len(layers), layer_types=kinds)

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of `layer`, or None for full attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
      return self.sliding_window
    return None

  def min_window(self) -> int | None:
    """The smallest sliding window of any layer (None: every layer attends fully)."""
    windows = (self.layer_window(i) for i in range(self.num_layers))
    return min((w for w in windows if w is not None), default=None)

  def num_params(self) -> int:
    d, h = self.embed, self.head_dim
    attn = d * h * (2 * self.q_heads + 2 * self.kv_heads)
    per_layer = attn + 3 * d * self.mlp + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + head + self.num_layers * per_layer + d


PRESETS: dict[str, ModelConfig] = {
    # Shapes for tests: GQA 2:1, tiny vocabulary.
    "tiny": ModelConfig(vocab_size=256, embed=64, num_layers=2, q_heads=4, kv_heads=2, head_dim=16,
                        mlp=128, max_seq_len=512),
    # The embedded default model trained locally on the Python standard library (see embedded.py).
    # Sized so it trains in ~5 minutes on 2 CPU cores; a larger model loses at that budget.
    "embedded": ModelConfig(vocab_size=4096, embed=128, num_layers=4, q_heads=4, kv_heads=2,
                            head_dim=32, mlp=384, max_seq_len=2048, rope_theta=10000.0,
                            norm_eps=1e-5, tie_embeddings=True),
    # The embedded model's vocabulary at 126M parameters, for benchmarks with random weights:
    # too large for a CPU's caches, so a decode step there is bound by memory, as on accelerators.
    "wide": ModelConfig(vocab_size=4096, embed=1024, num_layers=8, q_heads=16, kv_heads=4,
                        head_dim=64, mlp=4096, max_seq_len=2048, rope_theta=10000.0,
                        norm_eps=1e-5, tie_embeddings=True),
    # Llama-3.1-8B shapes, for benchmarks with random weights.
    "llama3-8b": ModelConfig(vocab_size=128256, embed=4096, num_layers=32, q_heads=32, kv_heads=8,
                             head_dim=128, mlp=14336, max_seq_len=8192, rope_theta=500000.0,
                             rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                             dtype="bfloat16"),
}
