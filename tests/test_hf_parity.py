"""Logits and greedy generation against Hugging Face transformers on tiny random models."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, VOCAB, make_hf_model, to_transformers4_style
from jaxinfer import model as M
from jaxinfer.checkpoint import load_hf
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
                  progress=False))
  records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
    assert records[i]["completion_ids"] == ref, (name, i)
    assert records[i]["finish_reason"] == ("stop" if ref[-1] == 2 else "length")
