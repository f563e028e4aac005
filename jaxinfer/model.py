"""The decoder-only transformer: parameter declarations and one pure `forward`.

B batch, T query len, S kv len (cache slots), D embed, N q heads, K kv heads, H head dim,
F mlp, V vocab.

Parameters are flax.struct dataclasses whose `spec(cfg)` declares every weight once (shape,
logical axes, initializer, and for quantization the axes it is contracted over); see params.py
for what derives from it. Layers are a tuple and the layer loop is unrolled so each layer's KV
cache (kv_cache.py) is its own donated buffer, updated in place.

A weight may be a quantized leaf (quant/): every use reads it through `weight`, which
dequantizes it, so quantized serving and the QAT forward compute the same numbers.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxinfer import attention as attention_lib
from jaxinfer import params as P
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import (CACHE_AXES, KVCache, LayerKV, MixedPagedKVCache,  # noqa: F401
                               PagedKVCache)
from jaxinfer.quant import WeightKernel, is_qarray, linear, take_rows, weight
from jaxinfer.rope import apply_rope, rope_tables
from jaxinfer.runtime import Runtime
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules
from jaxinfer.sparsity import Sparsity

Array = Any  # jax.Array, or a ParamSpec inside a declaration tree

ACT = ("batch", "seq", "act_embed")  # logical axes of the residual stream
# logical axes of the linear layers' weights
Q_AXES, KV_AXES = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
O_AXES = ("q_heads", "head_dim", "embed")
UP_AXES, DOWN_AXES = ("embed", "mlp"), ("mlp", "embed")
LM_HEAD_AXES = ("embed", "vocab")
EMBED_AXES = ("vocab", "embed")


def norm_spec(size: int, axis: str) -> P.ParamSpec:
  """An RMSNorm weight; quantized (one scale, or groups along it) only when norms opt in."""
  return P.ParamSpec((size,), (axis,), P.constant_init(1.0), contract=(axis,), group=axis,
                     quant="norm")


@struct.dataclass
class Attention:
  q: Array  # (D, N, H)
  k: Array  # (D, K, H)
  v: Array  # (D, K, H)
  o: Array  # (N, H, D)
  q_bias: Array = None  # (N, H)
  k_bias: Array = None  # (K, H)
  v_bias: Array = None  # (K, H)
  o_bias: Array = None  # (D,)
  q_norm: Array = None  # (H,)
  k_norm: Array = None  # (H,)

  @classmethod
  def spec(cls, cfg: ModelConfig) -> "Attention":
    d, n, k, h = cfg.embed, cfg.q_heads, cfg.kv_heads, cfg.head_dim
    w = P.fan_in_init(1)
    zeros = P.constant_init(0.0)
    bias = cfg.qkv_bias
    return cls(
        q=P.linear((d, n, h), Q_AXES, w, contract=("embed",)),
        k=P.linear((d, k, h), KV_AXES, w, contract=("embed",)),
        v=P.linear((d, k, h), KV_AXES, w, contract=("embed",)),
        # contracts heads and head_dim; groups run along head_dim, one set per head
        o=P.linear((n, h, d), O_AXES, P.fan_in_init(2),
                   contract=("q_heads", "head_dim"), group="head_dim"),
        q_bias=P.ParamSpec((n, h), ("q_heads", "head_dim"), zeros) if bias else None,
        k_bias=P.ParamSpec((k, h), ("kv_heads", "head_dim"), zeros) if bias else None,
        v_bias=P.ParamSpec((k, h), ("kv_heads", "head_dim"), zeros) if bias else None,
        o_bias=P.ParamSpec((d,), ("embed",), zeros) if cfg.o_bias else None,
        q_norm=norm_spec(h, "head_dim") if cfg.qk_norm else None,
        k_norm=norm_spec(h, "head_dim") if cfg.qk_norm else None,
    )


@struct.dataclass
class MLP:
  gate: Array  # (D, F)
  up: Array  # (D, F)
  down: Array  # (F, D)

  @classmethod
  def spec(cls, cfg: ModelConfig) -> "MLP":
    d, f = cfg.embed, cfg.mlp
    w = P.fan_in_init(1)
    return cls(gate=P.linear((d, f), UP_AXES, w, contract=("embed",)),
               up=P.linear((d, f), UP_AXES, w, contract=("embed",)),
               down=P.linear((f, d), DOWN_AXES, w, contract=("mlp",)))


@struct.dataclass
class Layer:
  attn_norm: Array  # (D,)
  attn: Attention
  mlp_norm: Array  # (D,)
  mlp: MLP

  @classmethod
  def spec(cls, cfg: ModelConfig) -> "Layer":
    norm = norm_spec(cfg.embed, "embed")
    return cls(attn_norm=norm, attn=Attention.spec(cfg), mlp_norm=norm, mlp=MLP.spec(cfg))


@struct.dataclass
class Transformer:
  embed: Array  # (V, D)
  layers: tuple[Layer, ...]
  final_norm: Array  # (D,)
  lm_head: Array = None  # (D, V); None when tied to `embed`

  @classmethod
  def spec(cls, cfg: ModelConfig) -> "Transformer":
    v, d = cfg.vocab_size, cfg.embed
    return cls(
        # rows are looked up, and contracted over embed when tied to the output
        embed=P.linear((v, d), EMBED_AXES, P.normal_init(0.02), contract=("embed",),
                       quant="embed"),
        layers=tuple(Layer.spec(cfg) for _ in range(cfg.num_layers)),
        final_norm=norm_spec(d, "embed"),
        lm_head=None if cfg.tie_embeddings else P.linear(
            (d, v), LM_HEAD_AXES, P.fan_in_init(1), contract=("embed",), quant="lm_head"),
    )


def init_residual_layer(cfg: ModelConfig, key: jax.Array, dtype) -> Layer:
  """A decoder layer that starts as the identity on its residual stream (draft layers): random
  input projections, zero output projections (attention's o, the MLP's down)."""
  layer = P.init_params(Layer.spec(cfg), key, dtype)
  return layer.replace(attn=layer.attn.replace(o=jnp.zeros_like(layer.attn.o)),
                       mlp=layer.mlp.replace(down=jnp.zeros_like(layer.mlp.down)))


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh | None = None,
                rules: ShardingRules = DEFAULT_RULES) -> Transformer:
  """Random parameters, created directly in their shardings when a mesh is given."""
  spec = Transformer.spec(cfg)
  fn = lambda k: P.init_params(spec, k, cfg.jnp_dtype)
  out_shardings = None if mesh is None else P.param_shardings(spec, mesh, rules)
  return jax.jit(fn, out_shardings=out_shardings)(key)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * y.astype(x.dtype)


KVSource = Literal["chunk", "cache"]
Cache = Union[KVCache, PagedKVCache, MixedPagedKVCache]


def layer_pattern(cfg: ModelConfig, layer: int, sparsity: Sparsity) -> tuple[int | None, int]:
  """(window, sinks) of one layer: the model's own sliding window, or the run's sinks+window."""
  window = cfg.layer_window(layer)
  if sparsity.kind != "sinks_window":
    return window, 0
  if window is not None:
    raise ValueError(f"sparsity {sparsity}: the model already uses a sliding window ({window})")
  return sparsity.window, sparsity.num_sinks


def project_qkv(p: Attention, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: ModelConfig,
                runtime: Runtime = Runtime()) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalised input (B,T,D) -> q (B,T,N,H), k, v (B,T,K,H), RoPE applied."""
  q = linear("btd,dnh->btnh", x, p.q, weight_kernel(runtime, Q_AXES))
  k = linear("btd,dkh->btkh", x, p.k, weight_kernel(runtime, KV_AXES))
  v = linear("btd,dkh->btkh", x, p.v, weight_kernel(runtime, KV_AXES))
  if p.q_bias is not None:
    q, k, v = q + p.q_bias, k + p.k_bias, v + p.v_bias
  if p.q_norm is not None:
    q = rms_norm(q, weight(p.q_norm), cfg.norm_eps)
    k = rms_norm(k, weight(p.k_norm), cfg.norm_eps)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def project_out(p: Attention, out: jax.Array, runtime: Runtime = Runtime()) -> jax.Array:
  """Attention output (B,T,N,H) -> (B,T,D)."""
  out = linear("btnh,nhd->btd", out, p.o, weight_kernel(runtime, O_AXES))
  return out if p.o_bias is None else out + p.o_bias


def attention_block(p: Attention, x: jax.Array, positions: jax.Array, cos: jax.Array,
                    sin: jax.Array, cfg: ModelConfig, pattern: tuple[int | None, int], kv: Any,
                    kv_source: KVSource, segment_ids: jax.Array | None, runtime: Runtime):
  q, k, v = project_qkv(p, x, cos, sin, cfg, runtime)
  q = runtime.constrain(q, ("batch", "seq", "act_heads", "head_dim"))

  impl = attention_lib.get(runtime.implementation)
  mesh, rules = runtime.mesh, runtime.rules
  window, sinks = pattern
  if kv is not None:
    kv = kv.write(k, v, positions)
  if kv_source == "cache":
    out = kv.attend(impl, q, positions, window=window, sinks=sinks, mesh=mesh, rules=rules)
  else:
    out = impl.chunk(q, k, v, positions, window=window, sinks=sinks, sparsity=runtime.sparsity,
                     segment_ids=segment_ids, mesh=mesh, rules=rules)
  return project_out(p, out, runtime), kv


def weight_kernel(runtime: Runtime, axes: tuple[str, ...]) -> WeightKernel | None:
  """Whether grouped integer weights (of these logical axes) go through the quantized matmul
  kernel (on a TPU: `linear`): with the Pallas kernels (implementation other than "xla"), on
  each device over its shard of the weight."""
  if runtime.implementation == "xla":
    return None
  return WeightKernel(runtime.mesh, runtime.rules, axes)


def mlp_block(p: MLP, x: jax.Array, runtime: Runtime) -> jax.Array:
  kernel = weight_kernel(runtime, UP_AXES)
  gate = linear("btd,df->btf", x, p.gate, kernel)
  up = linear("btd,df->btf", x, p.up, kernel)
  h = runtime.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
  return linear("btf,fd->btd", h, p.down, weight_kernel(runtime, DOWN_AXES))


def forward(params: Transformer, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
            cache: Cache | None = None, *, kv_source: KVSource = "chunk",
            segment_ids: jax.Array | None = None, runtime: Runtime = Runtime(),
            embeddings: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
  """tokens, positions (B,T) -> final hidden states (B,T,D) and the updated cache.

  kv_source="chunk": queries attend to this chunk's own keys (training, fresh prefill);
  the chunk is still written to `cache` when one is given.
  kv_source="cache": the chunk is written at slots `positions`, then queries attend to all cache
  slots (decode, continued prefill). Slots past a query's position are masked, so stale entries
  there are harmless.
  `runtime`: the mesh and rules activations are constrained by, the attention implementation,
  and the sparsity (sparsity.py: a long-prompt attention pattern; dynamic patterns apply to
  chunks only).
  `embeddings` (B,T,D), when given, replace the token embeddings as the first layer's input
  (draft layers that read features as well as tokens).
  """
  if kv_source == "cache" and cache is None:
    raise ValueError("forward: kv_source='cache' needs a cache")
  x = take_rows(params.embed, tokens) if embeddings is None else embeddings
  x = runtime.constrain(x, ACT)
  cos, sin = rope_tables(positions, cfg)
  new_layers = []
  for i, layer in enumerate(params.layers):
    with jax.named_scope(f"layer_{i}"):
      with jax.named_scope("attention"):
        h, kv = attention_block(
            layer.attn, rms_norm(x, weight(layer.attn_norm), cfg.norm_eps), positions, cos, sin,
            cfg, layer_pattern(cfg, i, runtime.sparsity),
            None if cache is None else cache.layer(i), kv_source, segment_ids, runtime)
      x = runtime.constrain(x + h, ACT)
      with jax.named_scope("mlp"):
        x = x + mlp_block(layer.mlp, rms_norm(x, weight(layer.mlp_norm), cfg.norm_eps), runtime)
      x = runtime.constrain(x, ACT)
      new_layers.append(kv)
  x = rms_norm(x, weight(params.final_norm), cfg.norm_eps)
  return x, None if cache is None else cache.with_layers(new_layers)


def output_projection(params: Transformer) -> jax.Array:
  """(D, V): the output projection, the embedding's transpose when tied."""
  return weight(params.embed).T if params.lm_head is None else weight(params.lm_head)


def logits(params: Transformer, hidden: jax.Array, runtime: Runtime | None = None) -> jax.Array:
  """hidden (..., D) -> float32 logits (..., V).
  runtime (serving a few rows at a time): the logits' rows whole on every device and the vocabulary
  split as the rules split it, so an output projection split along `embed` (FSDP) is multiplied
  shard by shard and the partial logits summed across devices. Unconstrained, XLA may keep the
  rows split as the step's kernels split them and gather the whole weight instead (1 GiB per
  decode step for Llama-3-8B's LM head on --mesh=fsdp:4 under --implementation=pallas). A
  grouped integer LM head goes through the quantized matmul kernel as the layers' weights do
  (`weight_kernel`; with int8 activations it is dequantized, as before), a tied embedding
  table by the kernel's transposed form, as it lies."""
  tied = params.lm_head is None
  w = params.embed if tied else params.lm_head
  kernel = (weight_kernel(runtime, EMBED_AXES if tied else LM_HEAD_AXES)
            if runtime is not None and is_qarray(w) and hidden.ndim > 1 else None)
  rows = "abcefg"[:hidden.ndim - 1]
  eq = f"{rows}d,vd->{rows}v" if tied else f"{rows}d,dv->{rows}v"
  out = linear(eq, hidden, w if kernel else weight(w), kernel, out_dtype=jnp.float32)
  if runtime is None:
    return out
  return runtime.constrain(out, (None,) * (out.ndim - 1) + ("act_vocab",))
