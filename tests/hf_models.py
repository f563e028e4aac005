"""Tiny random Hugging Face models, one per supported family, saved to a directory."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama2_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_bias_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
}


def make_hf_model(name: str, directory: Path, seed: int = 0, std: float = 0.2,
                  dtype: str = "float32"):
  """Saves a random model of family `name` (with no tokenizer) and returns it (torch, eval)."""
  import torch
  import transformers

  cfg_cls, model_cls, extra = FAMILIES[name]
  cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, std)
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  model.save_pretrained(directory)
  return model


def to_transformers4_style(directory: Path) -> None:
  """Rewrites config.json with rope_theta / rope_scaling only, as transformers 4 writes it."""
  path = Path(directory) / "config.json"
  cfg = json.loads(path.read_text())
  params = cfg.pop("rope_parameters", None) or {}
  cfg["rope_theta"] = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
  cfg["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
  path.write_text(json.dumps(cfg, indent=2))
