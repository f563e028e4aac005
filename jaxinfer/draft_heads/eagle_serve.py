"""The EAGLE draft layer at serving time: the layer, its forward, the heads serving reads
(its draft vocabulary) and its files (training it is `eagle`).

f_t is the base's final hidden state at position t (the feature its output projection reads to
predict token t + 1). The draft reads the pair (f_t, x_{t+1}) at position t — the feature and the
token that feature produced — as fc([f_t; embed(x_{t+1})]) (2D -> D), runs one decoder layer
(the base's own layer type, causal over earlier pairs, its own KV cache when serving) and a norm,
and predicts f_{t+1}; the base's frozen output projection (or its columns of the draft
vocabulary) turns that into a distribution over x_{t+2}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.draft_heads import files
from jaxinfer.quant import take_rows, weight
from jaxinfer.runtime import Runtime

FORMAT = "jaxinfer-eagle-1"
CONFIG = "eagle_config.json"  # beside the weights: its format, shapes and training info


@struct.dataclass
class EagleDraft:
  fc: jax.Array  # (2D, D): [feature; token embedding] -> layer input
  layer: M.Layer
  norm: jax.Array  # (D,)


@struct.dataclass
class EagleHeads:
  """What serving needs: the layer, and the output projection restricted to the draft
  vocabulary (proj (D, Vd) and its token ids (Vd,)); both None for the full vocabulary."""

  draft: EagleDraft
  proj: jax.Array | None = None
  vocab: jax.Array | None = None

  def logits(self, base: M.Transformer, feat: jax.Array, runtime: Runtime | None = None):
    """feat (..., D) -> float32 logits over the draft vocabulary (..., Vd); over the whole
    vocabulary, through the base's output projection, taken as `M.logits` takes the target's on
    `runtime` (the vocabulary split as the rules split it: `proposers.common.filtered` then
    filters them whole on each device)."""
    if self.proj is None:
      return M.logits(base, feat, runtime)
    return jnp.einsum("...d,dv->...v", feat, self.proj, preferred_element_type=jnp.float32)

  def token_ids(self, index: jax.Array) -> jax.Array:
    return index if self.vocab is None else self.vocab[index]

  def full(self, q: jax.Array, vocab_size: int) -> jax.Array:
    """A distribution over the draft vocabulary (..., Vd) as one over the whole (..., V)."""
    if self.vocab is None:
      return q
    return jnp.zeros(q.shape[:-1] + (vocab_size,), q.dtype).at[..., self.vocab].set(q)


def serving_heads(draft: EagleDraft, base: M.Transformer,
                  vocab: np.ndarray | None) -> EagleHeads:
  if vocab is None:
    return EagleHeads(draft)
  ids = jnp.asarray(vocab, jnp.int32)
  return EagleHeads(draft, jnp.take(M.output_projection(base), ids, axis=1), ids)


def draft_config(cfg: ModelConfig) -> ModelConfig:
  """The draft layer's configuration: the base's, with one layer (of its last layer's kind)."""
  return cfg.keep_layers([cfg.num_layers - 1])


def init_draft(cfg: ModelConfig, key: jax.Array, dtype=None) -> EagleDraft:
  dtype = dtype or cfg.jnp_dtype
  d = cfg.embed
  layer = M.init_residual_layer(cfg, key, dtype)
  fc = jnp.concatenate([jnp.eye(d, dtype=dtype), jnp.zeros((d, d), dtype)], axis=0)
  return EagleDraft(fc=fc, layer=layer, norm=jnp.ones((d,), dtype))


def as_transformer(draft: EagleDraft, base: M.Transformer) -> M.Transformer:
  """The draft as a one-layer model sharing the base's embedding and output projection."""
  return M.Transformer(embed=base.embed, layers=(draft.layer,), final_norm=draft.norm,
                       lm_head=base.lm_head)


def draft_forward(draft: EagleDraft, base: M.Transformer, features: jax.Array,
                  tokens: jax.Array, positions: jax.Array, dcfg: ModelConfig, cache=None, *,
                  kv_source: M.KVSource = "chunk", runtime: Runtime = Runtime()):
  """features (B,T,D) and the tokens they produced (B,T) at `positions` -> predicted next
  features (B,T,D) and the updated draft cache. `runtime`: how the layer runs; its sparsity is
  the target's attention pattern (sinks_window at inference; dense in training)."""
  emb = take_rows(base.embed, tokens).astype(features.dtype)
  x = jnp.concatenate([features, emb], axis=-1) @ draft.fc
  return M.forward(as_transformer(draft, base), tokens, positions, dcfg, cache,
                   kv_source=kv_source, runtime=runtime, embeddings=x)


def save(directory: str | Path, draft: EagleDraft, info: dict[str, Any],
         vocab: np.ndarray | None = None) -> Path:
  """draft.safetensors (+ the draft vocabulary's ids) + eagle_config.json (format, shapes,
  training info)."""
  tensors = {k: np.asarray(v, np.float32) for k, v in files.flatten(draft).items()}
  if vocab is not None:
    tensors["draft_vocab"] = np.asarray(vocab, np.int32)
  config = dict(info, format=FORMAT, hidden_size=int(draft.norm.shape[0]),
                draft_vocab_size=None if vocab is None else int(len(vocab)))
  return files.write(directory, "draft.safetensors", tensors, CONFIG, config)


def is_eagle(directory: str | Path) -> bool:
  return (Path(directory) / CONFIG).is_file()


def load(directory: str | Path, cfg: ModelConfig,
         dtype=None) -> tuple[EagleDraft, np.ndarray | None, dict]:
  """The draft layer for base config `cfg` (shapes checked against it), its draft vocabulary
  (None: the full vocabulary) and its config."""
  tensors, config = files.read(directory, "draft.safetensors", CONFIG, FORMAT,
                               "an EAGLE draft")
  template = jax.eval_shape(lambda: init_draft(draft_config(cfg), jax.random.key(0), dtype))
  vocab = tensors.pop("draft_vocab", None)
  if vocab is not None and (vocab.ndim != 1 or not len(vocab) or vocab.min() < 0
                            or vocab.max() >= cfg.vocab_size):
    raise ValueError(f"{directory}: its draft vocabulary does not fit this model's "
                     f"{cfg.vocab_size} tokens")
  if vocab is not None and len(np.unique(vocab)) != len(vocab):
    # (a token drawn through two draft ids would be verified at one id's probability: lossy)
    raise ValueError(f"{directory}: its draft vocabulary repeats token ids")
  flat = files.flatten(template)
  if set(tensors) != set(flat):
    raise ValueError(f"{directory}: draft.safetensors holds {sorted(tensors)}, expected "
                     f"{sorted(flat)} for this model")
  return files.unflatten(template, tensors, directory), vocab, config
