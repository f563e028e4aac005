"""Hydra draft heads at serving time: the heads, Hydra++'s prefix layer, their forward and
their files (training them is `hydra`).

Head k (k = 0..K-1) drafts the token k + 1 places after the root r, from the base's hidden state
h at the token before the root *and* the embeddings of the tokens already on this tree path —
the root and the k drafts before it: x = [h; e(r); e(d_1); ...; e(d_k)] ((k + 2) D), then
y = h + W_out,k SiLU(W_in,k x + b_k) and its own vocabulary projection. Deeper heads
(`head_layers` L > 1) add L - 1 residual blocks y <- y + V_i SiLU(U_i y + c_i) per head.
Hydra++'s prefix-attention layer is one decoder layer (the base's layer type, its own KV cache
when serving) over the base's hidden states; the heads read its output in place of h.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer import params as P
from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads import files
from jaxinfer.runtime import Runtime

FORMAT = "jaxinfer-hydra-1"
CONFIG = "hydra_config.json"  # beside the weights: its format, shapes and training info


@struct.dataclass
class HydraHeads:
  w_in: tuple[jax.Array, ...]  # head k: ((k + 2) D, D)
  b_in: tuple[jax.Array, ...]  # head k: (D,)
  w_out: tuple[jax.Array, ...]  # head k: (D, D)
  proj: jax.Array  # (K, D, V)
  prefix: M.Layer | None = None  # Hydra++'s prefix-attention layer
  prefix_norm: jax.Array | None = None  # (D,)
  # head_layers - 1 more residual blocks per head (None: one block): head k (L - 1, D, D) ...
  block_in: tuple[jax.Array, ...] | None = None
  block_b: tuple[jax.Array, ...] | None = None  # head k: (L - 1, D)
  block_out: tuple[jax.Array, ...] | None = None

  @property
  def num_heads(self) -> int:
    return len(self.w_in)

  @property
  def head_layers(self) -> int:
    return 1 if self.block_in is None else 1 + self.block_in[0].shape[0]


def prefix_config(cfg: ModelConfig) -> ModelConfig:
  """The prefix-attention layer's configuration: the base's, with one layer (of its last
  layer's kind)."""
  return cfg.keep_layers([cfg.num_layers - 1])


def prefix_forward(heads: HydraHeads, base: M.Transformer, hidden: jax.Array,
                   positions: jax.Array, prefix_cfg: ModelConfig, cache=None, *,
                   kv_source: M.KVSource = "chunk", runtime: Runtime = Runtime()):
  """The base's hidden states (B, T, D) at `positions` -> what the heads read (B, T, D): the
  prefix layer's output, or the hidden states themselves without one; and the layer's cache.
  `runtime`: how the layer runs; its sparsity is the target's attention pattern (sinks_window
  at inference; dense in training)."""
  if heads.prefix is None:
    return hidden, cache
  model = M.Transformer(embed=base.embed, layers=(heads.prefix,), final_norm=heads.prefix_norm,
                        lm_head=base.lm_head)
  return M.forward(model, jnp.zeros(positions.shape, jnp.int32), positions, prefix_cfg, cache,
                   kv_source=kv_source, runtime=runtime,
                   embeddings=hidden.astype(heads.prefix_norm.dtype))


def head_logits(heads: HydraHeads, k: int, hidden: jax.Array,
                path_embeddings: jax.Array) -> jax.Array:
  """Head k: the state it reads (..., D) (the base's hidden state, or the prefix layer's
  output) and the embeddings of the root and k drafts (..., k + 1, D) -> float32 logits
  (..., V) for the next token on that path."""
  x = jnp.concatenate([hidden[..., None, :], path_embeddings], axis=-2)
  x = x.reshape(x.shape[:-2] + (-1,)).astype(heads.w_in[k].dtype)
  y = hidden + jax.nn.silu(x @ heads.w_in[k] + heads.b_in[k]) @ heads.w_out[k]
  for i in range(heads.head_layers - 1):
    y = y + jax.nn.silu(y @ heads.block_in[k][i] + heads.block_b[k][i]) @ heads.block_out[k][i]
  return jnp.einsum("...d,dv->...v", y, heads.proj[k], preferred_element_type=jnp.float32)


def save(directory: str | Path, heads: HydraHeads, info: dict[str, Any]) -> Path:
  """heads.safetensors + hydra_config.json (format, shapes, tree, accuracies, training info)."""
  tensors = {"proj": np.asarray(heads.proj, np.float32)}
  for k in range(heads.num_heads):
    tensors.update({f"w_in.{k}": np.asarray(heads.w_in[k], np.float32),
                    f"b_in.{k}": np.asarray(heads.b_in[k], np.float32),
                    f"w_out.{k}": np.asarray(heads.w_out[k], np.float32)})
    if heads.head_layers > 1:
      tensors.update({f"{name}.{k}": np.asarray(getattr(heads, name)[k], np.float32)
                      for name in _BLOCKS})
  if heads.prefix is not None:
    tensors.update({k: np.asarray(v, np.float32) for k, v in files.flatten(
        {"layer": heads.prefix, "norm": heads.prefix_norm}, "prefix").items()})
  config = dict(info, format=FORMAT, num_heads=heads.num_heads,
                hidden_size=int(heads.proj.shape[1]), vocab_size=int(heads.proj.shape[2]),
                prefix_layer=heads.prefix is not None, head_layers=heads.head_layers)
  return files.write(directory, "heads.safetensors", tensors, CONFIG, config)


_BLOCKS = ("block_in", "block_b", "block_out")


def is_hydra(directory: str | Path) -> bool:
  return (Path(directory) / CONFIG).is_file()


def load(directory: str | Path, dtype=jnp.float32,
         cfg: ModelConfig | None = None) -> tuple[HydraHeads, dict[str, Any]]:
  """The heads and their config; heads with Hydra++'s prefix layer need the base's `cfg`."""
  t, config = files.read(directory, "heads.safetensors", CONFIG, FORMAT,
                         "Hydra heads")
  prefix = norm = None
  if config.get("prefix_layer"):
    if cfg is None:
      raise ValueError(f"{directory}: heads with a prefix layer load with the model's config")
    template = jax.eval_shape(lambda: {
        "layer": P.init_params(M.Layer.spec(prefix_config(cfg)), jax.random.key(0), dtype),
        "norm": jnp.ones((cfg.embed,), dtype)})
    loaded = files.unflatten(template, t, directory, "prefix", dtype)
    prefix, norm = loaded["layer"], loaded["norm"]
  k_heads, d_model = config["num_heads"], config["hidden_size"]
  try:
    heads = HydraHeads(
        w_in=tuple(jnp.asarray(t[f"w_in.{k}"], dtype) for k in range(k_heads)),
        b_in=tuple(jnp.asarray(t[f"b_in.{k}"], dtype) for k in range(k_heads)),
        w_out=tuple(jnp.asarray(t[f"w_out.{k}"], dtype) for k in range(k_heads)),
        proj=jnp.asarray(t["proj"], dtype), prefix=prefix, prefix_norm=norm,
        **({name: tuple(jnp.asarray(t[f"{name}.{k}"], dtype) for k in range(k_heads))
            for name in _BLOCKS} if config.get("head_layers", 1) > 1 else {}))
  except KeyError as e:
    raise ValueError(f"{directory}: heads.safetensors lacks {e}") from None
  if heads.proj.shape != (k_heads, d_model, config["vocab_size"]) or any(
      w.shape != ((k + 2) * d_model, d_model) for k, w in enumerate(heads.w_in)):
    raise ValueError(f"{directory}: heads.safetensors does not match {CONFIG}")
  n = config.get("head_layers", 1) - 1
  if n and any(w.shape != (n, d_model, d_model) for w in heads.block_in + heads.block_out) or (
      n and any(b.shape != (n, d_model) for b in heads.block_b)):
    raise ValueError(f"{directory}: the heads' blocks do not match head_layers={n + 1}")
  return heads, config
