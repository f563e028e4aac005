"""Hugging Face `config.json` <-> ModelConfig, for transformers-4 (`rope_theta`, `rope_scaling`)
and transformers-5 (`rope_parameters`, `layer_types`) styles."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.config import ModelConfig, RopeScaling

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """As transformers reads them: rope_scaling, where given, over rope_parameters (a config
  transformers 5 saved holds rope_parameters of type default, and a model card's rope_scaling
  added to it is what the model runs with)."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
    raise ValueError("config.json: per-layer-type rope_parameters are not supported")
  scaling = hf.get("rope_scaling") or params or {}
  theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type in (None, "default"):
    return float(theta), None
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", float(scaling["factor"]))
  if rope_type == "llama3":
    return float(theta), RopeScaling(
        "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        # (a top-level original_max_position_embeddings wins, as in transformers' models)
        int(hf.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings"))))
  raise ValueError(f"config.json: rope type {rope_type!r} is not supported (supported: default, "
                   f"linear, llama3)")


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
  """Builds a ModelConfig; `dtype` None takes the checkpoint's own (`torch_dtype` / `dtype`)."""
  if not isinstance(hf, dict):
    raise ValueError(f"config.json: expected a JSON object, got {type(hf).__name__}")
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"config.json: model_type {family!r} is not supported (supported: "
                     f"{', '.join(FAMILIES)})")
  if hf.get("mlp_bias") and family == "llama":  # (the other families' MLPs have none)
    raise ValueError("config.json: mlp_bias=true is not supported")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):  # (one function: transformers maps both to SiLU)
    raise ValueError(f"config.json: hidden_act {act!r} is not supported (only silu)")
  try:
    heads = int(hf["num_attention_heads"])
    embed = int(hf["hidden_size"])
    theta, scaling = _rope(hf)
    num_layers = int(hf["num_hidden_layers"])
    # as transformers reads them: Llama has no window; Mistral's is 4,096 unless the file says
    # (null: none); Qwen's only with use_sliding_window, in layers from max_window_layers on
    window = hf.get("sliding_window", 4096) if family != "llama" else None
    layer_types = hf.get("layer_types")
    if family in ("qwen2", "qwen3"):
      if not hf.get("use_sliding_window", False):
        window, layer_types = None, None
      elif layer_types is None:
        start = int(hf.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= start else "full_attention"
                       for i in range(num_layers)]
    # attention_bias: q, k, v and o in Llama and Qwen3; Mistral's attention has no biases and
    # Qwen2's biases q, k and v whatever it says
    bias = bool(hf.get("attention_bias", False)) and family in ("llama", "qwen3")
    if window is None:
      layer_types = None
    if dtype is None:
      dtype = _TORCH_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
                                "float32")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        embed=embed,
        num_layers=num_layers,
        q_heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        # (Qwen3's default is 128, not hidden / heads; heads > 0: checked)
        head_dim=int(hf.get("head_dim") or (128 if family == "qwen3" else embed // max(heads, 1))),
        mlp=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2" or bias,
        o_bias=bias,
        qk_norm=family == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=None if window is None else int(window),
        layer_types=None if layer_types is None else tuple(layer_types),
        dtype=dtype,
        family=family,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
    )
  except KeyError as e:
    raise ValueError(f"config.json: missing required field {e.args[0]!r}") from None
  except (TypeError, AttributeError) as e:  # e.g. "hidden_size": null, "rope_scaling": 2
    raise ValueError(f"config.json: a field of the wrong type ({e})") from None
  except ValueError as e:  # e.g. "hidden_size": "x" (int()'s words do not name the file)
    if str(e).startswith(("config.json", "ModelConfig")):
      raise
    raise ValueError(f"config.json: a field's value is not a number ({e})") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A config.json both transformers 4 and 5 read (v4 keys, plus `rope_parameters`)."""
  if cfg.family == "qwen2" and not cfg.qkv_bias:
    raise ValueError("export: a qwen2 model must have qkv biases")
  if cfg.family == "qwen3" and not cfg.qk_norm or cfg.family != "qwen3" and cfg.qk_norm:
    raise ValueError("export: q/k norms exist exactly in the qwen3 family")
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rope_scaling = {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items()}
    if cfg.rope_scaling.rope_type == "linear":
      rope_scaling = {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
  rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if rope_scaling:
    rope_parameters.update(rope_scaling)
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
  eos = list(cfg.eos_token_ids)
  out = {
      "architectures": [arch],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed,
      "intermediate_size": cfg.mlp,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.q_heads,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": cfg.o_bias,
      "sliding_window": cfg.sliding_window,
      "torch_dtype": cfg.dtype,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
  }
  if cfg.family in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
    raise ValueError(f"export: {cfg.family} checkpoints bias q, k, v and o together or not at "
                     f"all")
  if cfg.family == "mistral" and (cfg.qkv_bias or cfg.o_bias):
    raise ValueError("export: mistral checkpoints have no attention biases")
  if cfg.family == "qwen2" and cfg.o_bias:
    raise ValueError("export: qwen2 checkpoints bias q, k and v, never o")
  if cfg.family == "llama" and cfg.sliding_window is not None:
    raise ValueError("export: llama checkpoints have no sliding window (transformers ignores "
                     "one there); give the model family mistral")
  if cfg.family in ("qwen2", "qwen3"):
    out["use_sliding_window"] = cfg.sliding_window is not None
    if cfg.layer_types is not None:
      out["layer_types"] = list(cfg.layer_types)
    out["max_window_layers"] = next(  # (no layer types: every layer slides)
        (i for i, t in enumerate(cfg.layer_types or ()) if t == "sliding_attention"),
        cfg.num_layers if cfg.layer_types else 0)
  elif cfg.layer_types is not None and set(cfg.layer_types) != {"sliding_attention"}:
    raise ValueError(f"export: the {cfg.family} format cannot express per-layer attention types")
  return out
