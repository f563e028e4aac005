"""Mesh parsing, the logical-axis rules, and sharded generation equal to single-device."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxinfer import model as M
from jaxinfer.config import PRESETS
from jaxinfer.generation import Generator, RowRequest
from jaxinfer.sampling import request_key
from jaxinfer.runtime import Runtime
from jaxinfer.sharding import (DEFAULT_RULES, ShardingRules, device_bytes, make_mesh, mesh_flag,
                               parse_mesh)


def test_parse_mesh():
  assert parse_mesh("data:4,model:2") == {"data": 4, "fsdp": 1, "model": 2}
  assert parse_mesh("") == {"data": 1, "fsdp": 1, "model": 1}
  for bad in ("data:0", "data:x", "rows:2", "data:2,data:2", "data"):
    with pytest.raises(ValueError, match="mesh"):
      parse_mesh(bad)


def test_make_mesh_device_counts(devices):
  assert make_mesh("").shape == {"data": 8, "fsdp": 1, "model": 1}
  assert make_mesh("data:2,model:2").size == 4
  with pytest.raises(ValueError, match="needs 16 devices"):
    make_mesh("data:4,model:4")
  # as `jaxinfer train`/`convert`/`train-draft` read --mesh: the error names the flag
  with pytest.raises(ValueError, match="^--mesh: data:4,fsdp:1,model:4 needs 16 devices"):
    mesh_flag("data:4,model:4")
  with pytest.raises(ValueError, match="^--mesh: expected"):
    mesh_flag("rows:2")
  assert mesh_flag("").shape == {"data": 8, "fsdp": 1, "model": 1}


def test_rules_map_and_refuse_collisions(devices):
  mesh = make_mesh("data:2,fsdp:2,model:2")
  spec = DEFAULT_RULES.partition_spec(("batch", "cache_seq", "kv_heads", "head_dim"),
                                      (8, 16, 4, 8), mesh)
  assert spec == PartitionSpec(("data", "fsdp"), None, "model", None)
  assert DEFAULT_RULES.partition_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh) == \
      PartitionSpec("fsdp", "model", None)
  # a dimension the mesh axis does not divide is replicated (2 kv heads on model:4)
  mesh4 = make_mesh("data:2,model:4")
  assert DEFAULT_RULES.partition_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh4) == \
      PartitionSpec(None, None, None)
  with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
    DEFAULT_RULES.partition_spec(("batch", "embed"), (8, 64), mesh)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    ShardingRules((("batch", ("rows",)),))


MESHES = ["data:8", "data:2,model:4", "fsdp:2,model:2,data:2", "model:8", "fsdp:4,data:2"]


@pytest.fixture(scope="module")
def reference_outputs():
  cfg = dataclasses.replace(PRESETS["tiny"], q_heads=8, kv_heads=2, head_dim=8, eos_token_ids=(7,))
  params = M.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  rows = [RowRequest(rng.randint(0, cfg.vocab_size, size=n).tolist(), m, request_key(0, i))
          for i, (n, m) in enumerate([(3, 9), (11, 16), (6, 5), (20, 12), (1, 8)])]
  sampled = [dataclasses.replace(r, temperature=0.9, top_p=0.9) for r in rows]
  single = Generator(cfg, params)
  return cfg, params, rows, sampled, single.generate(rows), single.generate(sampled)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_generation_equals_single_device(mesh_spec, reference_outputs, devices):
  cfg, params, rows, sampled, greedy_ref, sampled_ref = reference_outputs
  mesh = make_mesh(mesh_spec)
  sharded_params = jax.device_put(params, jax.tree_util.tree_map(
      lambda s: DEFAULT_RULES.sharding(mesh, s.axes, s.shape), M.Transformer.spec(cfg),
      is_leaf=lambda x: hasattr(x, "axes")))
  gen = Generator(cfg, sharded_params, Runtime(mesh), steps_per_sync=4)
  out = gen.generate(rows)
  assert [r.tokens for r in out] == [r.tokens for r in greedy_ref]
  # sampling uses per-request keys, so it matches too (up to float rounding near ties)
  out_s = gen.generate(sampled)
  same = sum(a.tokens == b.tokens for a, b in zip(out_s, sampled_ref))
  assert same >= len(rows) - 1


@pytest.mark.parametrize("mesh_spec", ["data:2,model:4", "fsdp:2,model:2,data:2"])
def test_sharded_pallas_generation_equals_single_device(mesh_spec, reference_outputs, devices):
  """The kernels run per shard under shard_map; the result must not change."""
  _, _, rows, _, _, _ = reference_outputs
  cfg = dataclasses.replace(PRESETS["tiny"], q_heads=8, kv_heads=4, head_dim=8,
                            eos_token_ids=(7,))  # kv heads split over model:4 too
  ref = Generator(cfg, M.init_params(cfg, jax.random.key(0))).generate(rows)
  mesh = make_mesh(mesh_spec)
  sharded = M.init_params(cfg, jax.random.key(0), mesh)
  out = Generator(cfg, sharded, Runtime(mesh, implementation="pallas"),
                  steps_per_sync=8).generate(rows)
  assert [r.tokens for r in out] == [r.tokens for r in ref]


def test_sharded_logits_close(devices):
  cfg = dataclasses.replace(PRESETS["tiny"], q_heads=8, kv_heads=4, head_dim=8)
  params = M.init_params(cfg, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab_size)
  pos = np.broadcast_to(np.arange(16), (8, 16))
  ref = M.logits(params, M.forward(params, tokens, pos, cfg)[0])
  mesh = make_mesh("data:2,fsdp:2,model:2")
  sharded = M.init_params(cfg, jax.random.key(1), mesh)
  fwd = jax.jit(lambda p, t, q: M.logits(p, M.forward(p, t, q, cfg, runtime=Runtime(mesh))[0]))
  out = fwd(sharded, tokens, pos)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_device_bytes_counts_a_buffer_once_and_every_shape():
  """A buffer a tree holds twice (layer skip's draft weights are the target's) is one device's
  memory once; shapes are not buffers: a pool shape repeated per layer counts per layer."""
  a, shape = jnp.zeros((4,), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32)
  assert device_bytes((a, a)) == 16 and device_bytes((a, jnp.ones((4,)))) == 32
  assert device_bytes((shape,) * 3) == 48
