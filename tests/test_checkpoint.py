"""Hugging Face import/export, orbax round trips onto a mesh, and clear errors on bad files."""

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_models import COMMON, VOCAB, make_hf_model
from jaxinfer import model as M
from jaxinfer.checkpoint import load_hf, load_model, load_orbax, save_hf, save_orbax
from jaxinfer.sharding import DEFAULT_RULES, make_mesh


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3", "mistral"])
def test_export_round_trip_and_transformers_reads_it(tmp_path, family):
  import transformers
  src = tmp_path / "src"
  model = make_hf_model(family, src)
  cfg, params = load_hf(src)
  out = save_hf(tmp_path / "exported", cfg, params, max_shard_bytes=200_000)
  assert (out / "model.safetensors.index.json").exists()  # forced to shard
  assert len(list(out.glob("*.safetensors"))) > 1
  cfg2, params2 = load_hf(out)
  assert cfg2 == cfg
  _assert_trees_equal(params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = torch.tensor(np.random.RandomState(0).randint(0, VOCAB, (1, 20)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_orbax_round_trip_restores_onto_a_mesh(tmp_path, devices):
  make_hf_model("llama3", tmp_path / "hf")
  cfg, params = load_hf(tmp_path / "hf")
  save_orbax(tmp_path / "ckpt", cfg, params, tokenizer_dir=tmp_path / "hf")
  mesh = make_mesh("data:2,model:4")
  cfg2, restored = load_orbax(tmp_path / "ckpt", mesh=mesh)
  assert cfg2 == cfg
  _assert_trees_equal(params, restored)
  q = restored.layers[0].attn.q  # (D, N=4, H): heads on the model axis
  assert q.sharding.spec == DEFAULT_RULES.partition_spec(("embed", "q_heads", "head_dim"),
                                                        q.shape, mesh)
  assert q.sharding.spec[1] == "model" and len(q.sharding.device_set) == 8
  # load_model dispatches on the directory's contents
  cfg3, restored3, _ = load_model(str(tmp_path / "ckpt"))
  _assert_trees_equal(params, restored3)
  # one checkpoint per directory: the other format beside it is refused, the same replaced
  with pytest.raises(ValueError, match="holds a jaxinfer \\(orbax\\) checkpoint"):
    save_hf(tmp_path / "ckpt", cfg, params)
  with pytest.raises(ValueError, match="holds Hugging Face weights"):
    save_orbax(tmp_path / "hf", cfg, params)
  save_orbax(tmp_path / "ckpt", cfg, params)
  _assert_trees_equal(params, load_orbax(tmp_path / "ckpt")[1])


def _raise(e):
  raise e


def test_a_save_cut_short_leaves_the_checkpoint_it_was_replacing(tmp_path, monkeypatch):
  """A save killed as orbax starts writing, after it wrote the new arrays but before they took
  the old ones' place, or between the two renames of that swap: the old checkpoint loads as it
  was, and the next save replaces it, leaving nothing else behind. The same for Hugging Face
  weights, whose old and new shards never load mixed. config.json and the rest are replaced
  with the weights: a model of another shape saved over, killed just after its weights took
  their place, loads whole (finished by the load), and killed just before, loads as it was."""
  import orbax.checkpoint as ocp
  make_hf_model("llama3", tmp_path / "hf")
  cfg, params = load_hf(tmp_path / "hf")
  save_orbax(tmp_path / "ckpt", cfg, params)
  doubled = jax.tree_util.tree_map(lambda x: x * 2, params)
  write = ocp.StandardCheckpointer.save

  for written in (False, True):
    def killed(self, *args, written=written, **kw):
      if written:
        write(self, *args, **kw)
        self.wait_until_finished()
      raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
      save_orbax(tmp_path / "ckpt", cfg, doubled)
    monkeypatch.undo()
    _assert_trees_equal(params, load_orbax(tmp_path / "ckpt")[1])
  (tmp_path / "ckpt" / "params.old").mkdir()  # (as a removal that failed leaves it)
  save_orbax(tmp_path / "ckpt", cfg, doubled)
  _assert_trees_equal(doubled, load_orbax(tmp_path / "ckpt")[1])
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "params"]
  # killed between the swap's two renames: params.old/ (what config.json describes) is read,
  # and kept by a next save until its params/ are in place
  (tmp_path / "ckpt" / "params").rename(tmp_path / "ckpt" / "params.old")
  _assert_trees_equal(doubled, load_model(str(tmp_path / "ckpt"))[1])
  rename = Path.rename
  monkeypatch.setattr(Path, "rename", lambda self, target: (
      _raise(KeyboardInterrupt()) if Path(target).name == "params" else rename(self, target)))
  with pytest.raises(KeyboardInterrupt):
    save_orbax(tmp_path / "ckpt", cfg, params)
  monkeypatch.undo()
  _assert_trees_equal(doubled, load_model(str(tmp_path / "ckpt"))[1])
  save_orbax(tmp_path / "ckpt", cfg, params)
  _assert_trees_equal(params, load_orbax(tmp_path / "ckpt")[1])
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "params"]

  # Hugging Face weights: one file replaced by shards, killed while writing the second; shards
  # replaced by as many shards, killed as the second takes its place (it had the first's name)
  from jaxinfer.checkpoint import hf
  out = tmp_path / "exported"
  save_hf(out, cfg, params)
  write_shard, replace, calls = hf.save_file, os.replace, []

  def killed_on_the_second(real):
    def call(*args, **kw):
      if real is replace and not str(args[0]).endswith(".safetensors.new"):
        return real(*args, **kw)  # (the shards' renames are counted)
      calls.append(args)
      if len(calls) == 2:
        raise KeyboardInterrupt
      return real(*args, **kw)
    return call

  for module, name, real, old, new in ((hf, "save_file", write_shard, params, doubled),
                                       (os, "replace", replace, doubled, params)):
    calls.clear()
    monkeypatch.setattr(module, name, killed_on_the_second(real))
    with pytest.raises(KeyboardInterrupt):
      save_hf(out, cfg, new, max_shard_bytes=200_000)
    monkeypatch.undo()
    _assert_trees_equal(old, load_hf(out)[1])
    save_hf(out, cfg, doubled, max_shard_bytes=200_000)
  save_hf(out, cfg, params)  # (one file again: the shards and what the kills left are removed)
  _assert_trees_equal(params, load_hf(out)[1])
  assert sorted(p.name for p in out.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors"]

  # Another model (a layer more) saved over each, killed once its weights are in place but
  # before config.json and the rest are: the next load finishes the save (it read the new
  # weights with the old config.json, silently dropping a layer, or failed)
  from jaxinfer.checkpoint import pending
  deeper = dataclasses.replace(cfg, num_layers=3)
  deeper_params = M.init_params(deeper, jax.random.key(1))
  for save, directory in ((save_hf, out), (save_orbax, tmp_path / "ckpt")):
    monkeypatch.setattr(pending, "_commit", lambda *a: _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
      save(directory, deeper, deeper_params)
    monkeypatch.undo()
    assert (directory / pending.NOTE).exists()
    got_cfg, got, _ = load_model(str(directory))
    assert got_cfg.num_layers == 3
    _assert_trees_equal(deeper_params, got)
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".new")
                or p.name == pending.NOTE]
  # ... or staged, before its weights took the old ones' place: the old model, as it was
  from jaxinfer.checkpoint import orbax_io
  monkeypatch.setattr(orbax_io, "_put_in_place", lambda *a: _raise(KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):
    save_orbax(tmp_path / "ckpt", cfg, params)
  monkeypatch.undo()
  assert (tmp_path / "ckpt" / "config.json.new").exists()
  got_cfg, got, _ = load_model(str(tmp_path / "ckpt"))
  assert got_cfg.num_layers == 3
  _assert_trees_equal(deeper_params, got)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
      "config.json", "params", "params.new"]  # (its arrays: the next save removes them)


def test_a_load_waits_for_a_save_in_progress(tmp_path):
  """A load while a save stages its files (its weights not yet in place) waits for it, rather
  than taking it for a save cut short and dropping its files."""
  import threading

  from jaxinfer.checkpoint import pending
  (tmp_path / "config.json").write_text("old")
  seen = []
  load = lambda: (pending.settle(tmp_path, lambda: "before"),
                  seen.append((tmp_path / "config.json").read_text()))
  with pending.staged(tmp_path, "this save", {"config.json": b"new"}):
    reader = threading.Thread(target=load)
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not seen
  reader.join(10)
  assert seen == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_hf_load_onto_mesh_matches_unsharded(tmp_path, devices):
  make_hf_model("qwen2", tmp_path)
  _, plain = load_hf(tmp_path)
  mesh = make_mesh("fsdp:2,model:4")
  _, sharded = load_hf(tmp_path, mesh=mesh)
  _assert_trees_equal(plain, sharded)
  assert sharded.embed.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")


def test_dtype_auto_and_override(tmp_path):
  make_hf_model("llama3", tmp_path, dtype="bfloat16")
  cfg, params = load_hf(tmp_path)
  assert cfg.dtype == "bfloat16" and params.embed.dtype == jnp.bfloat16
  cfg32, params32 = load_hf(tmp_path, dtype="float32")
  assert cfg32.dtype == "float32" and params32.layers[1].mlp.down.dtype == jnp.float32
  # a config.json naming no dtype: the weights' own (they were widened to float32, and a
  # converted copy twice their size)
  hf = json.loads((tmp_path / "config.json").read_text())
  hf.pop("torch_dtype", None), hf.pop("dtype", None)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg, params = load_hf(tmp_path)
  assert cfg.dtype == "bfloat16" and params.layers[1].mlp.down.dtype == jnp.bfloat16


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  make_hf_model("llama3", tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = load_file(str(path))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)
  save_file(tensors, str(path))
  with pytest.raises(ValueError) as e:
    load_hf(tmp_path)
  msg = str(e.value)
  assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in msg and "(96, 64)" in msg
  assert "'model.layers.0.self_attn.k_proj.weight' has shape (7, 64), expected (32, 64)" in msg
  # weights of more layers than config.json describes: another model's (never read in part)
  tensors = load_file(str(path))
  tensors.update({k.replace("layers.1.", "layers.2."): v for k, v in tensors.items()
                  if k.startswith("model.layers.1.")})
  save_file(tensors, str(path))
  with pytest.raises(ValueError, match="holds weights of layer 2, but config.json describes 2 "):
    load_hf(tmp_path)


def test_damaged_weight_and_tokenizer_files_are_named(tmp_path):
  """A truncated model.safetensors, or a tokenizer file its library cannot read, was a traceback
  of the library's own exception in every command."""
  from jaxinfer.tokenizer import Tokenizer
  make_hf_model("llama3", tmp_path)
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(ValueError, match=f"^{path}: not a readable safetensors file"):
    load_hf(tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"x": 1}')
  with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer the tokenizers library"):
    Tokenizer.from_dir(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  assert Tokenizer.from_dir(tmp_path) is None


def test_configs_are_read_as_transformers_reads_them(tmp_path):
  """rope_scaling, where given, over the rope_parameters of a config transformers 5 saved (the
  scaling was dropped, and yarn served unrefused); a top-level original_max_position_embeddings
  over the scaling's; Qwen3's head_dim default of 128; "swish" as silu, and mlp_bias ignored
  where the family's MLP has no biases. A malformed index or generation_config, and a tied
  model whose lm_head.weight is not its embedding table, are one line each (two tracebacks
  and a silently other output head)."""
  from jaxinfer.checkpoint.hf_config import config_from_hf
  from jaxinfer.config import RopeScaling
  base = {**COMMON, "model_type": "llama", "rope_theta": 5e5,
          "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
  llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  read = lambda **kw: config_from_hf({**base, **kw})
  assert read(rope_scaling={"type": "linear", "factor": 4.0}).rope_scaling == RopeScaling(
      "linear", 4.0)
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    read(rope_scaling={"rope_type": "yarn", "factor": 4.0})
  assert read(rope_scaling=llama3).rope_scaling.original_max_position_embeddings == 32
  assert read(rope_scaling=llama3, original_max_position_embeddings=8
              ).rope_scaling.original_max_position_embeddings == 8
  assert read(model_type="qwen3", head_dim=None).head_dim == 128
  assert read(model_type="qwen2", mlp_bias=True, hidden_act="swish").family == "qwen2"
  with pytest.raises(ValueError, match="mlp_bias=true is not supported"):
    read(mlp_bias=True)
  make_hf_model("llama3", tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
  with pytest.raises(ValueError, match='index.json: no "weight_map" object'):
    load_hf(tmp_path)
  (tmp_path / "model.safetensors.index.json").unlink()
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2.0}')
  with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
    load_hf(tmp_path)
  (tmp_path / "generation_config.json").unlink()
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
  with pytest.raises(ValueError, match="tie_word_embeddings, but lm_head.weight is not the "):
    load_hf(tmp_path)


def test_unsupported_configs_are_refused(tmp_path):
  make_hf_model("llama3", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  for patch, needle in (({"model_type": "gpt2"}, "model_type"),
                        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                              "rope_theta": 1e4}}, "yarn"),
                        ({"hidden_act": "gelu"}, "hidden_act")):
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **patch}))
    with pytest.raises(ValueError, match=needle):
      load_hf(tmp_path)
  # malformed files: one line naming config.json or the field (they were AttributeError,
  # ZeroDivisionError, TypeError)
  plain = {k: v for k, v in cfg.items() if k != "rope_parameters"}
  for text, needle in (("[]", "config.json: expected a JSON object, got list"),
                       (json.dumps({**cfg, "num_attention_heads": 0}), "q_heads must be positive"),
                       (json.dumps({**cfg, "hidden_size": None}), "config.json: a field of the "),
                       (json.dumps({**plain, "rope_scaling": 2}), "config.json: a field of the "),
                       (json.dumps({**cfg, "vocab_size": "x"}), "config.json: .* not a number")):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=needle):
      load_hf(tmp_path)


def test_generation_config_eos_ids_are_merged(tmp_path):
  make_hf_model("llama3", tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
  cfg, params = load_hf(tmp_path)
  assert cfg.eos_token_ids == (2, 9)
  # saved over a directory whose generation_config.json is another model's: its settings kept,
  # the ids this model's (the old EOS ids would stop it early)
  out = tmp_path / "out"
  save_hf(out, cfg, params)
  (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [7], "top_k": 5}))
  save_hf(out, dataclasses.replace(cfg, eos_token_ids=(2,)), params)
  assert load_hf(out)[0].eos_token_ids == (2,)
  assert json.loads((out / "generation_config.json").read_text())["top_k"] == 5
  for text in ("[7]", "{7: 1}"):  # (a list was an AttributeError)
    (out / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"generation_config.json: (expected a JSON object, got "
                                         r"list|not valid JSON \(Expecting property name)"):
      load_hf(out)


def test_random_init_export_is_loadable_by_transformers(tmp_path):
  import dataclasses
  import transformers
  from jaxinfer.config import PRESETS
  cfg = dataclasses.replace(PRESETS["tiny"], qkv_bias=True, family="qwen2", tie_embeddings=True)
  params = M.init_params(cfg, jax.random.key(3))
  save_hf(tmp_path, cfg, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens = np.arange(12)[None] % cfg.vocab_size
  hidden, _ = M.forward(params, jnp.asarray(tokens), jnp.arange(12)[None], cfg)
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(M.logits(params, hidden)), ref, rtol=1e-4, atol=1e-5)
