"""Logits and greedy generation against Hugging Face transformers on tiny random models."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import COMMON, FAMILIES, VOCAB, make_hf_model, to_transformers4_style
from jaxinfer import model as M
from jaxinfer.checkpoint import load_hf, save_hf
from jaxinfer.requests import Defaults
from jaxinfer.runner import GenerateJob, run


def _relative_error(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  model = make_hf_model(request.param, d)
  return request.param, d, model


def test_logits_match_transformers(hf_dir):
  name, d, model = hf_dir
  cfg, params = load_hf(d)
  tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 40))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
  hidden, _ = M.forward(params, jnp.asarray(tokens), positions, cfg)
  ours = np.asarray(M.logits(params, hidden))
  assert _relative_error(ours, ref) < 1e-4, name


def test_transformers4_config_style_loads_identically(hf_dir, tmp_path):
  name, d, _ = hf_dir
  cfg5, _ = load_hf(d)
  for f in d.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  to_transformers4_style(tmp_path)
  assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())
  cfg4, _ = load_hf(tmp_path)
  assert cfg4 == cfg5, name
  save_hf(tmp_path / "again", *load_hf(d))  # (what jaxinfer writes reads back the same)
  assert load_hf(tmp_path / "again")[0] == cfg5, name


def test_config_fields_read_as_transformers_models_read_them():
  """Llama's attention never reads a sliding_window (transformers' LlamaAttention); Mistral's
  is 4,096 where config.json has no key (null: none); Qwen's slides only with use_sliding_window,
  from max_window_layers (28 unless given) on; Qwen3's attention_bias biases o too, Mistral's
  attention has no biases whatever it says."""
  from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

  from jaxinfer.checkpoint.hf_config import config_from_hf
  common = dict(COMMON, num_hidden_layers=30)
  read = lambda config_cls, **kw: config_from_hf({**config_cls(**common).to_dict(), **kw})
  assert read(LlamaConfig, sliding_window=8).sliding_window is None
  mistral = {**MistralConfig(**common).to_dict()}
  del mistral["sliding_window"]
  assert config_from_hf(mistral).sliding_window == 4096
  assert read(MistralConfig, sliding_window=None).sliding_window is None
  qwen = {k: v for k, v in Qwen2Config(**common).to_dict().items()
          if k not in ("max_window_layers", "layer_types")}
  qwen.update(use_sliding_window=True, sliding_window=64)
  assert config_from_hf(qwen).layer_types == ("full_attention",) * 28 + ("sliding_attention",) * 2
  assert (read(Qwen3Config, attention_bias=True).o_bias, read(Qwen2Config).o_bias) == (True, False)
  assert not read(MistralConfig, attention_bias=True).qkv_bias


def test_generate_greedy_matches_transformers(hf_dir, tmp_path):
  name, d, model = hf_dir
  rng = np.random.RandomState(1)
  prompts = [rng.randint(3, VOCAB, size=n).tolist() for n in (5, 17, 9)]
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps({"id": i, "prompt_ids": p}) + "\n"
                                  for i, p in enumerate(prompts)))
  out = tmp_path / "out.jsonl"
  run(GenerateJob(prompts=str(prompts_file), output=str(out), model=str(d),
                  defaults=Defaults(max_new_tokens=24), batch_size=2, decode_steps=5,
                  mesh="data:1", progress=False))
  records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
    assert records[i]["completion_ids"] == ref, (name, i)
    assert records[i]["finish_reason"] == ("stop" if ref[-1] == 2 else "length")
