"""The engine's steps as programs of shapes, for `jaxinfer compile` (aot.py): jitted as the engine
jits them, each with abstract arguments (`jax.ShapeDtypeStruct`s
laid out on the replica's mesh) in place of weights, KV pools, plans and sampling settings.
`job` is the command's `aot.CompileJob`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import model as M
from jaxinfer.config import ModelConfig
from jaxinfer.engine.engine import (EngineConfig, engine_decode, engine_step, pool_pages_for,
                                     whole_lanes)
from jaxinfer.engine.scheduler import lane_length
from jaxinfer.kv_cache import PagedKVCache
from jaxinfer.kv_quant import SCALE_DTYPE, QuantizedKV, scales_shape
from jaxinfer.params import abstract_params
from jaxinfer.runtime import Runtime
from jaxinfer.sharding import device_bytes


class CompileError(ValueError):
  """A problem with the flags, or a configuration that does not fit: one line, no traceback."""


def whole_on(mesh: Mesh):
  """Shapes of host arrays a step takes (plans, sampling settings): whole on every device."""
  where = NamedSharding(mesh, PartitionSpec())
  return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where)


def _engine_pools(cfg: ModelConfig, ecfg: EngineConfig, tokens: int, runtime: Runtime,
                  tree_size: int = 0):
  """(every layer's KV pool (K/c, P, ps, c*H), laid out as the engine lays it out, for sequences of
  up to `tokens` tokens; M, their pages per sequence). tree_size: a proposer's, whose trees the
  engine's one pool also holds beyond each sequence (the default page count counts them)."""
  ps = ecfg.page_size
  m = max(1, -(-tokens // ps))
  pages = pool_pages_for(ecfg, max(1, -(-(tokens + tree_size) // ps)))
  shape = PagedKVCache.pool_shape(cfg, pages, ps, runtime.mesh, runtime.rules)
  values, scales = PagedKVCache.pool_shardings(cfg, pages, ps, runtime.mesh, runtime.rules)
  if ecfg.kv_cache_dtype is None:
    pool = jax.ShapeDtypeStruct(shape, cfg.jnp_dtype, sharding=values)
  else:
    pool = QuantizedKV(jax.ShapeDtypeStruct(shape, jnp.int8, sharding=values),
                       jax.ShapeDtypeStruct(scales_shape(shape, cfg.kv_heads // shape[0]),
                                            SCALE_DTYPE, sharding=scales))
  return (pool,) * cfg.num_layers, m


def engine_steps(cfg: ModelConfig, job, params, runtime: Runtime, tree_size: int = 0):
  """{name: (jitted step, abstract arguments)}: the engine's mixed step at its widest (G lanes of
  Q prompt tokens beside the S decode rows; under a dynamic sparsity pattern one lane of the
  longest prompt) and its decode-only dispatch, with the KV pools (K/c, P, ps, c*H) per layer laid
  out as the engine lays them out (tree_size: a proposer's, as `_engine_pools`)."""
  ecfg = job.engine_config
  s, g, q = ecfg.num_slots, ecfg.chunk_lanes, ecfg.chunk_size
  if whole_lanes(runtime):
    g, q = 1, lane_length(max(1, cfg.max_seq_len - 2), None)  # (a prompt leaves room for one)
  pools, m = _engine_pools(cfg, ecfg, cfg.max_seq_len, runtime, tree_size)
  whole = whole_on(runtime.mesh)
  i32, f32 = jnp.int32, jnp.float32
  sampling = (whole((s,), f32), whole((s,), i32), whole((s,), f32), whole((s,), f32))
  per_slot = (whole((s,), i32), whole((s,), bool), whole((s, 2), jnp.uint32))
  n = s + g * q  # a mixed step's tokens
  mixed = (params, pools, pools, whole((s,), i32), whole((n,), i32), whole((n,), bool),
           whole((n,), i32), whole((s, m), i32), whole((g, m), i32)) + per_slot + sampling
  decode = (params, pools, pools, whole((s,), i32), whole((s,), i32), whole((s,), bool),
            whole((s,), i32), whole((s, m), i32)) + per_slot + sampling + (whole((), i32),)
  step = jax.jit(partial(engine_step, cfg=cfg, runtime=runtime), donate_argnums=(1, 2, 3))
  dispatch = jax.jit(partial(engine_decode, max_steps=ecfg.decode_steps, cfg=cfg,
                             runtime=runtime), donate_argnums=(1, 2, 3))
  return {"prefill": (step, mixed), "decode": (dispatch, decode)}


def params_shapes(cfg: ModelConfig, job, mesh: Mesh, runtime: Runtime):
  """The weights' shapes as the engine holds them on the mesh: --quantize's QArrays (values and
  scales laid out as the weight) in place of the weights it selects."""
  spec = M.Transformer.spec(cfg)
  params = abstract_params(spec, cfg.jnp_dtype, mesh, runtime.rules)
  if not job.quantize:
    return params
  from jaxinfer import quant
  try:
    fmt = quant.QuantFormat.parse(job.quantize, job.quantize_include)
    return quant.abstract_quantized(params, spec, fmt, mesh, runtime.rules)
  except ValueError as e:  # (a group size that does not divide a weight's axis, ...)
    raise CompileError(f"--quantize: {e}") from None


# compile's EAGLE drafts with a layer of trained weights' shapes: no --draft_heads is read
EAGLE_SHAPES = "(the draft layer's shapes)"


def speculative_options(job):
  """The job's speculative options as `registry.check` and `registry.build` read them."""
  from types import SimpleNamespace
  heads = EAGLE_SHAPES if job.speculative == "eagle" else None
  return SimpleNamespace(speculative=job.speculative, num_draft_tokens=job.num_draft_tokens,
                         tree=job.tree, draft_layers=job.draft_layers, draft_fallback=0.0,
                         draft_model=None, draft_heads=heads, scheduler="continuous")


def check_speculative(job) -> None:
  """Refuses speculative options that do not fit together, or that no step would read."""
  from jaxinfer.speculative import registry
  opts = speculative_options(job)
  if job.speculative == "none":
    given = [name for name, default in (("num_draft_tokens", registry.DEFAULT_DRAFT_TOKENS),
                                        ("tree", registry.DEFAULT_TREE), ("draft_layers", None))
             if getattr(opts, name) != default]
    if given:
      raise CompileError(f"--{given[0]}: applies to speculative decoding; pass --speculative too")
  try:
    registry.check(opts)
  except ValueError as e:  # (UserError is one)
    raise CompileError(str(e)) from None


def proposer_for(cfg: ModelConfig, job, params):
  """(proposer, draft weights or None) of --speculative; EAGLE's layer as shapes (over the whole
  vocabulary: the target's own output projection)."""
  from jaxinfer.speculative import registry
  if job.speculative == "eagle":
    from jaxinfer.draft_heads import eagle_serve as eagle
    heads = jax.eval_shape(lambda: eagle.EagleHeads(eagle.init_draft(eagle.draft_config(cfg),
                                                                      jax.random.key(0))))
    return registry.eagle_proposer(speculative_options(job), cfg), heads
  try:
    return registry.build(speculative_options(job), cfg, params, None)
  except ValueError as e:
    raise CompileError(str(e) if str(e).startswith("--") else f"--tree: {e}") from None


def engine_tree_steps(cfg: ModelConfig, job, params, runtime: Runtime, proposer,
                      draft):
  """({name: (jitted step, abstract arguments)}, bytes per device of the KV pools and the rows'
  device state (a draft model's cache in it), of the draft's weights): speculation inside the
  engine, as the engine jits it: the mixed step at its widest (every slot's draft tree beside G
  lanes of Q prompt tokens) and the decode-only dispatch of trees, over a pool whose sequences
  also hold one tree."""
  from jaxinfer.engine import speculate
  from jaxinfer.sampling import SamplingParams
  from jaxinfer.speculative.protocol import check_fits
  try:
    check_fits(proposer, cfg, runtime.sparsity)
  except ValueError as e:
    raise CompileError(f"--speculative={job.speculative}: {e}") from None
  ecfg = job.engine_config
  s, g, q = ecfg.num_slots, ecfg.chunk_lanes, ecfg.chunk_size
  pools, m = _engine_pools(cfg, ecfg, cfg.max_seq_len + proposer.tree_size, runtime)
  whole = whole_on(runtime.mesh)
  proposer = proposer.attend_as(runtime)  # as the engine gives a draft model
  rows = jax.eval_shape(lambda d: speculate.init_drafting(
      cfg, proposer, s, m * ecfg.page_size, proposer.init_shared(cfg), d,
      pages=(pools[0].shape[1], ecfg.page_size), runtime=Runtime()), draft)
  rows = jax.tree_util.tree_map(lambda x: whole(x.shape, x.dtype), rows)
  i32, f32 = jnp.int32, jnp.float32
  sampling = SamplingParams(whole((s,), f32), whole((s,), i32), whole((s,), f32),
                            whole((s,), f32))
  per_slot = (whole((s,), bool), sampling, whole((s, 2), jnp.uint32),
              whole((max(1, len(cfg.eos_token_ids)),), i32))
  mixed = (params, draft, pools, pools, rows, whole((g * q,), i32), whole((g * q,), i32),
           whole((g * q,), i32), whole((s, m), i32), whole((g, m), i32)) + per_slot
  decode = (params, draft, pools, pools, rows, whole((s, m), i32)) + per_slot + (
      whole((), i32), whole((), bool))
  kw = dict(cfg=cfg, proposer=proposer, rule="exact", runtime=runtime)
  step = jax.jit(partial(speculate.step, **kw), donate_argnums=(2, 3, 4))
  dispatch = jax.jit(partial(speculate.steps, max_steps=ecfg.decode_steps, **kw),
                     donate_argnums=(2, 3, 4))
  return ({"verify-prefill": (step, mixed), "verify": (dispatch, decode)},
          device_bytes(pools) * 2 + device_bytes(rows), device_bytes(draft))
