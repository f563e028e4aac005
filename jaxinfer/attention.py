"""Attention for the model, behind one registry chosen by `implementation=`.

B batch, T query len, S kv len (cache slots), N q heads, K kv heads, G = N // K, H head dim.

Each implementation provides two entry points:
  chunk(q, k, v, positions, ...)  queries attend causally within their own chunk (training, fresh
                                  prefill): q (B,T,N,H), k/v (B,T,K,H), consecutive positions;
                                  `lengths` (B,), if given, each row's real tokens (padding
                                  after them: dynamic patterns are estimated from the real ones)
  cache(q, kv, positions, ...)    queries attend to cached positions <= their own (decode,
                                  continued prefill); kv is a kv_cache.LayerKV, contiguous
                                  (K,B,S,H) or a page pool (K/c,P,ps,c*H) with a page table

"xla" is the plain-jnp reference. "pallas" runs the block-sparse flash kernel for chunks, the
paged decode kernel for single-token cache reads (a contiguous cache is viewed as pages with an
identity page table) and the tree kernel for a chunk over its pages (blocks of it as chains);
shapes it does not cover fall back to "xla". "splash" runs jax's own TPU
splash kernel for chunks (interpreted on CPU) and "pallas" for everything else. On a mesh the
kernels run under shard_map (batch over data/fsdp, heads over model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxinfer.kv_cache import SCALE_AXES, gather_rows
from jaxinfer.kv_quant import QuantizedKV, kv_arrays, kv_read
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules, rows_split
from jaxinfer.sparsity import Sparsity

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row cannot NaN


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None,
                   q_segment: jax.Array | None = None, k_segment: jax.Array | None = None,
                   sinks: int = 0) -> jax.Array:
  """(B, T, S) bool: key j is visible to query i when k_pos[j] <= q_pos[i], within the window
  (k_pos > q_pos - window) or among the first `sinks` positions, and in the same segment."""
  mask = k_pos[:, None, :] <= q_pos[:, :, None]
  if window is not None:
    recent = k_pos[:, None, :] > q_pos[:, :, None] - window
    mask &= (recent | (k_pos[:, None, :] < sinks)) if sinks else recent
  if q_segment is not None:
    mask &= q_segment[:, :, None] == k_segment[:, None, :]
  return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                        k_pos: jax.Array, *, window: int | None = None,
                        q_segment: jax.Array | None = None, k_segment: jax.Array | None = None,
                        scale: float | None = None, sinks: int = 0,
                        mask: jax.Array | None = None) -> jax.Array:
  """q (B,T,N,H), k/v (B,S,K,H), q_pos (B,T), k_pos (B,S) -> (B,T,N,H). Softmax in float32.
  `mask` (B or 1, T, S), when given, is the visibility itself (positions are then unused)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if n % kv_heads:
    raise ValueError(f"attention: {n} query heads is not a multiple of {kv_heads} kv heads")
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if mask is None:
    mask = attention_mask(q_pos, k_pos, window, q_segment, k_segment, sinks)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def cache_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                              positions: jax.Array, *, window: int | None = None,
                              sinks: int = 0, k_scale: jax.Array | None = None,
                              v_scale: jax.Array | None = None) -> jax.Array:
  """q (B,T,N,H) at `positions` (B,T) over caches (K,B,S,H) whose slot s holds position s;
  an int8 cache's values come widened, with their scales (K,B,S) (`kv_quant.kv_read`)."""
  b, t, n, h = q.shape
  kv_heads, _, s, _ = k_cache.shape
  # (K, B) lead both operands, as in the cache's own layout: no transpose of the cache.
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(2, 0, 3, 1, 4)  # (K,B,G,T,H)
  scores = jnp.einsum("kbgth,kbsh->kbgts", qg, k_cache, preferred_element_type=jnp.float32)
  k_pos = jnp.broadcast_to(jnp.arange(s, dtype=positions.dtype), (b, s))
  mask = attention_mask(positions, k_pos, window, sinks=sinks)
  return _softmax_values(scores, mask[None, :, None], v_cache, h, k_scale, v_scale).transpose(
      1, 3, 0, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _softmax_values(scores, visible, v, h: int, k_scale, v_scale):
  """Heads-major attention's rest: scores (K,B,G,T,S) f32 -> out (K,B,G,T,H) f32 over v
  (K,B,S,H); an int8 cache's per-key scales (K,B,S) multiply the logits and the probabilities
  (as the kernels apply them). Values and scales no query sees are zeroed: a reused page's
  unwritten tail may hold NaN, and 0 x NaN is NaN."""
  scale = lambda x: x[:, :, None, None, :]
  if k_scale is not None:
    scores = scores * scale(k_scale)
  scores = jnp.where(visible, scores * h**-0.5, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  seen = visible.any(axis=(2, 3))  # (1 or K, B, S)
  if v_scale is not None:
    probs = probs * scale(jnp.where(seen, v_scale, 0.0))
  v = jnp.where(seen[..., None], v, jnp.zeros_like(v))
  return jnp.einsum("kbgts,kbsh->kbgth", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)


def _dynamic_info(q, k, sparsity: Sparsity, lengths=None):
  """MInference metadata from q (B,N,T,H), k (B,K,T,H), or None when the prompt is too short
  (under two blocks, or not a whole number of blocks) for block sparsity to apply; lengths (B,)
  (None: T): each row's real tokens, padding after them (the estimate reads real ones only)."""
  from pallas_kernels.block_sparse_attention import dynamic
  t, block = q.shape[2], sparsity.block
  if t % block or t < 2 * block:
    return None
  if sparsity.kind == "block_topk":
    return dynamic.block_topk_mask_info(q, k, block, sparsity.top_k, lengths=lengths)
  return dynamic.vertical_slash_mask_info(q, k, block, sparsity.num_vertical, sparsity.num_slash,
                                          sparsity.last_q, lengths=lengths)


def _heads_major(*xs):
  return tuple(None if x is None else x.transpose(0, 2, 1, 3) for x in xs)


def _xla_chunk(q, k, v, positions, *, window, sinks, sparsity, segment_ids, mesh, rules,
               lengths=None):
  del mesh, rules
  if sparsity.dynamic:
    from pallas_kernels.block_sparse_attention import block_sparse_attention_reference
    qh, kh, vh = _heads_major(q, k, v)
    info = _dynamic_info(qh, kh, sparsity, lengths)
    if info is not None:
      out = block_sparse_attention_reference(qh, kh, vh, info, q_segment_ids=segment_ids,
                                             kv_segment_ids=segment_ids)
      return out.transpose(0, 2, 1, 3)
  return attention_reference(q, k, v, positions, positions, window=window, q_segment=segment_ids,
                             k_segment=segment_ids, sinks=sinks)


def _xla_cache(q, kv, positions, *, window, sinks, mesh, rules):
  del mesh, rules
  if kv.page_table is not None:  # gather each row's pages into (K, B, M*ps, H)
    (k, ks), (v, vs) = (gather_rows(x, kv.page_table, q.dtype, q.shape[-1])
                        for x in (kv.k, kv.v))
  else:
    (k, ks), (v, vs) = (kv_read(x, (), q.dtype) for x in (kv.k, kv.v))
  return cache_attention_reference(q, k, v, positions, window=window, sinks=sinks, k_scale=ks,
                                   v_scale=vs)


# --- Pallas ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _static_mask_info(t: int, window: int | None, sinks: int, block: int):
  from pallas_kernels.block_sparse_attention import masks
  if window is not None and sinks:
    mask = masks.sinks_and_window((t, t), sinks, window)
  else:
    mask = masks.causal_window((t, t), window)
  return masks.mask_info(mask, block, block)


def _shard(fn, mesh: Mesh | None, rules: ShardingRules, in_axes, out_axes, args):
  """Runs `fn(*args)` per shard when on a mesh; `*_axes` are logical axes per argument (the
  output has the first argument's shape, so it is split where that argument is: a batch that
  does not divide over the batch axes stays whole in both)."""
  if mesh is None or mesh.size == 1:
    return fn(*args)
  spec = lambda axes, x: (None if x is None else
                          rules.partition_spec(axes, x.shape, mesh))
  in_specs = tuple(spec(a, x) for a, x in zip(in_axes, args))
  out_spec = rules.partition_spec(out_axes, args[0].shape, mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*args)


def _heads_split_evenly(n: int, k: int, mesh: Mesh | None, rules: ShardingRules) -> bool:
  """Under shard_map each shard's q heads must map onto its own kv heads."""
  if mesh is None:
    return True
  size = math.prod(mesh.shape[a] for a in rules.mesh_axes("act_kv_heads"))
  return n % size == 0 and k % size == 0


def _pallas_chunk(q, k, v, positions, *, window, sinks, sparsity, segment_ids, mesh, rules,
                  lengths=None):
  from pallas_kernels.block_sparse_attention import block_sparse_attention
  b, t, n, h = q.shape
  if not _heads_split_evenly(n, k.shape[2], mesh, rules):
    return _xla_chunk(q, k, v, positions, window=window, sinks=sinks, sparsity=sparsity,
                      segment_ids=segment_ids, mesh=mesh, rules=rules, lengths=lengths)
  block = min(128, max(8, 1 << (t - 1).bit_length()))
  static_info = _static_mask_info(t, window, sinks, block)

  def local(q, k, v, seg, lengths):
    qh, kh, vh = _heads_major(q, k, v)
    info = (_dynamic_info(qh, kh, sparsity, lengths) if sparsity.dynamic else None) or static_info
    out = block_sparse_attention(qh, kh, vh, info, q_segment_ids=seg, kv_segment_ids=seg)
    return out.transpose(0, 2, 1, 3)

  qa = ("batch", "seq", "act_heads", "head_dim")
  ka = ("batch", "seq", "act_kv_heads", "head_dim")
  return _shard(local, mesh, rules, (qa, ka, ka, ("batch", "seq"), ("batch",)), qa,
                (q, k, v, segment_ids, lengths))


def _page_size(s: int) -> int:
  return math.gcd(s, 64)


def _chain_block(t: int, rows: int) -> int:
  """Tokens of a chunk per tree-kernel sequence: the largest power of two dividing T with at
  most 128 kernel rows (tokens x `rows` query rows a token) in a program."""
  block = 1
  while block * 2 * rows <= 128 and t % (block * 2) == 0:
    block *= 2
  return block


def _pallas_chunk_pages(q, kv, positions, *, window, sinks, mesh, rules):
  """A chunk of T tokens at consecutive positions (padding, out of range, before or after them)
  over its row's pages, already written there: blocks of `_chain_block` tokens, each a chain
  verified by the tree kernel over the pages before it and itself, so no row's pages are
  gathered and no (T, M*ps) score array is made. A block of padding reads from position 0."""
  from pallas_kernels.tree_attention import pack_ancestors, tree_attention
  b, t, n, h = q.shape
  block = _chain_block(t, n // kv.k.shape[0])  # G query rows a token, times c heads a pool row
  if window is not None and window < block:
    return _xla_cache(q, kv, positions, window=window, sinks=sinks, mesh=mesh, rules=rules)
  chain = pack_ancestors(jnp.arange(block) - 1)  # (block, W)

  def kernel(q, positions, table, k, v, *scales):
    blocks = q.shape[1] // block
    rows = q.shape[0] * blocks
    pos = positions.reshape(rows, block)
    real = (pos >= 0) & (pos < table.shape[1] * k.shape[2])
    # a block's chain starts where its real tokens say (padding may lead, as a draft's feed of
    # (nothing pending, root) has, or trail): keys before its first real token are then prefix
    start = jnp.min(jnp.where(real, pos - jnp.arange(block), jnp.iinfo(jnp.int32).max), -1)
    start = jnp.where(real.any(-1), start, 0)
    out = tree_attention(q.reshape((rows, block) + q.shape[2:]), k, v, start,
                         jnp.repeat(table, blocks, axis=0),
                         jnp.broadcast_to(chain, (rows,) + chain.shape), *scales, window=window,
                         sinks=sinks)
    return out.reshape(q.shape)

  qa = ("batch", "seq", "act_heads", "head_dim")
  args, axes = _pool_args(kv, ("act_kv_heads", None, None, "head_dim"))
  return _shard(kernel, mesh, rules, (qa, ("batch", "seq"), ("batch", None)) + axes, qa,
                (q, positions, kv.page_table) + args)


def _pallas_cache(q, kv, positions, *, window, sinks, mesh, rules):
  from pallas_kernels.paged_attention import paged_attention
  b, t, n, h = q.shape
  if not _heads_split_evenly(n, kv.k.shape[0], mesh, rules) or (
      t != 1 and kv.page_table is None):
    return _xla_cache(q, kv, positions, window=window, sinks=sinks, mesh=mesh, rules=rules)
  if t != 1:
    return _pallas_chunk_pages(q, kv, positions, window=window, sinks=sinks, mesh=mesh,
                               rules=rules)
  qa = ("batch", "seq", "act_heads", "head_dim")

  if kv.page_table is not None:
    def paged(q, positions, table, k_pages, v_pages, *scales):
      lengths = jnp.minimum(positions[:, 0] + 1, table.shape[1] * k_pages.shape[2])
      out = paged_attention(q[:, 0], k_pages, v_pages, lengths, table, *scales, window=window,
                            sinks=sinks)
      return out[:, None]

    pa = ("act_kv_heads", None, None, "head_dim")
    args, axes = _pool_args(kv, pa)
    return _shard(paged, mesh, rules, (qa, ("batch", "seq"), ("batch", None)) + axes, qa,
                  (q, positions, kv.page_table) + args)

  if isinstance(kv.k, QuantizedKV) and rows_split(b, mesh, rules):
    # scale rows are whole on every shard, the rows' pages are not: read them through XLA
    return _xla_cache(q, kv, positions, window=window, sinks=sinks, mesh=mesh, rules=rules)

  def contiguous(q, positions, k_cache, v_cache, *scales):
    kv_heads, bl, s, hd = k_cache.shape
    ps = _page_size(s)
    pages_per_seq = s // ps
    # The contiguous cache is a page pool whose sequence b owns pages [b*M, (b+1)*M).
    k_pages = k_cache.reshape(kv_heads, bl * pages_per_seq, ps, hd)
    v_pages = v_cache.reshape(kv_heads, bl * pages_per_seq, ps, hd)
    table = jnp.arange(bl * pages_per_seq, dtype=jnp.int32).reshape(bl, pages_per_seq)
    lengths = jnp.minimum(positions[:, 0] + 1, s)
    out = paged_attention(q[:, 0], k_pages, v_pages, lengths, table, *scales, window=window,
                          sinks=sinks)
    return out[:, None]

  args, axes = _pool_args(kv, ("act_kv_heads", "batch", "cache_seq", "head_dim"))
  return _shard(contiguous, mesh, rules, (qa, ("batch", "seq")) + axes, qa, (q, positions) + args)


def _pool_args(kv, axes):
  """The kernels' K/V arguments, (k, v) or (k, v, k scale rows, v scale rows), and their logical
  axes."""
  k, v = kv_arrays(kv.k), kv_arrays(kv.v)
  args = (k[0], v[0]) + k[1:] + v[1:]
  return args, (axes, axes) + (SCALE_AXES,) * (len(args) - 2)


def _xla_tree(q, kv, positions, *, window, sinks, mesh, rules):
  del positions, mesh, rules
  from pallas_kernels.tree_attention import tree_visibility
  b, t, n, h = q.shape
  # each row's pages gathered heads-major, as the decode path gathers them
  (k, ks), (v, vs) = (gather_rows(x, kv.page_table, q.dtype, h) for x in (kv.k, kv.v))
  kv_heads = k.shape[0]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(2, 0, 3, 1, 4)  # (K,B,G,T,H)
  scores = jnp.einsum("kbgth,kbsh->kbgts", qg, k, preferred_element_type=jnp.float32)
  visible = tree_visibility(kv.prefix_len, kv.tree_mask, k.shape[2], window, sinks)
  out = _softmax_values(scores, visible[None, :, None], v, h, ks, vs)
  return out.transpose(1, 3, 0, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _pallas_tree(q, kv, positions, *, window, sinks, mesh, rules):
  if not _heads_split_evenly(q.shape[2], kv.k.shape[0], mesh, rules):
    return _xla_tree(q, kv, positions, window=window, sinks=sinks, mesh=mesh, rules=rules)
  from pallas_kernels.tree_attention import tree_attention
  qa = ("batch", "seq", "act_heads", "head_dim")
  pa = ("act_kv_heads", None, None, "head_dim")

  def kernel(q, prefix_len, table, mask, k, v, *scales):
    return tree_attention(q, k, v, prefix_len, table, mask, *scales, window=window, sinks=sinks)

  args, axes = _pool_args(kv, pa)
  return _shard(kernel, mesh, rules,
                (qa, ("batch",), ("batch", None), ("batch", None, None)) + axes, qa,
                (q, kv.prefix_len, kv.page_table, kv.tree_mask) + args)


# --- Splash (jax's TPU block-sparse flash attention) ----------------------------------------


@functools.lru_cache(maxsize=None)
def _splash_sinks_window_mask():
  """A splash mask class for causal sinks + window, computed inside the kernel (splash's own
  LocalMask has no sinks); built on first use so splash is imported only when chosen."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class SinksAndWindow(sm._ComputableMask):
    def __init__(self, t: int, window: int, sinks: int):
      self.key = (t, window, sinks)
      super().__init__((t, t), lambda q, k: (k <= q) & ((k > q - window) | (k < sinks)))

    def __eq__(self, other):
      return type(other) is type(self) and other.key == self.key

    def __hash__(self):
      return hash((type(self), self.key))

  return SinksAndWindow


def _splash_kernel(n: int, t: int, window: int | None, sinks: int, block: int, interpret: bool):
  """Splash over (N,T,H) q, (K,T,H) k/v for one chunk length and pattern. Made per trace (it holds
  jnp arrays); splash caches the host-side mask processing per mask and block shape."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if window is None:
    mask = sa.CausalMask((t, t))
  elif not sinks:
    mask = sa.LocalMask((t, t), (window - 1, 0), 0)
  else:
    mask = _splash_sinks_window_mask()(t, window, sinks)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  return sa.make_splash_mha_single_device(sa.MultiHeadMask([mask] * n), block_sizes=sizes,
                                          interpret=interpret)


def _splash_chunk(q, k, v, positions, *, window, sinks, sparsity, segment_ids, mesh, rules,
                  lengths=None):
  """jax's splash kernel on TPU (interpreted on CPU); the "pallas" path on GPUs and for what
  splash does not cover: dynamic sparsity, chunks that are not a whole number (>= 1) of 128
  blocks, heads that do not split evenly over the mesh."""
  b, t, n, h = q.shape
  block = next((c for c in (512, 256, 128) if t % c == 0), None)
  kw = dict(window=window, sinks=sinks, sparsity=sparsity)
  if (sparsity.dynamic or block is None
      or not _heads_split_evenly(n, k.shape[2], mesh, rules)):
    return _pallas_chunk(q, k, v, positions, segment_ids=segment_ids, mesh=mesh, rules=rules,
                         lengths=lengths, **kw)

  def local(q, k, v, seg):
    def splash(interpret):
      def run(q, k, v, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
        kernel = _splash_kernel(q.shape[2], t, window, sinks, block, interpret)
        qh, kh, vh = _heads_major(q * jnp.asarray(h**-0.5, q.dtype), k, v)
        if seg is None:
          out = jax.vmap(kernel)(qh, kh, vh)
        else:
          out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(s, s)))(qh, kh, vh, seg)
        return out.transpose(0, 2, 1, 3)
      return run

    def pallas(q, k, v, seg):
      return _pallas_chunk(q, k, v, None, segment_ids=seg, mesh=None, rules=rules, **kw)

    return jax.lax.platform_dependent(q, k, v, seg, tpu=splash(False), cpu=splash(True),
                                      default=pallas)

  qa = ("batch", "seq", "act_heads", "head_dim")
  ka = ("batch", "seq", "act_kv_heads", "head_dim")
  return _shard(local, mesh, rules, (qa, ka, ka, ("batch", "seq")), qa, (q, k, v, segment_ids))


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  chunk: Callable[..., jax.Array]  # a chunk attending to itself
  cache: Callable[..., jax.Array]  # queries over a (paged) KV cache
  tree: Callable[..., jax.Array]  # draft-tree tokens over a paged prefix plus their ancestors


IMPLEMENTATIONS: dict[str, AttentionImpl] = {
    "xla": AttentionImpl(_xla_chunk, _xla_cache, _xla_tree),
    "pallas": AttentionImpl(_pallas_chunk, _pallas_cache, _pallas_tree),
    "splash": AttentionImpl(_splash_chunk, _pallas_cache, _pallas_tree),
}


def unsupported(sparsity: Sparsity, implementation: str, platform: str) -> str | None:
  """Why `implementation` cannot run `sparsity`'s chunks on `platform` (None: it can)."""
  if platform == "tpu" and implementation != "xla" and sparsity.dynamic and sparsity.block % 8:
    return (f"{sparsity}: on a TPU the block-sparse kernel takes blocks of a multiple of 8 (a "
            f"block's rows fill whole sublanes), got {sparsity.block}; use a BLOCK of 8, 16, ... "
            f"or --implementation=xla")
  return None


def get(implementation: str) -> AttentionImpl:
  try:
    return IMPLEMENTATIONS[implementation]
  except KeyError:
    raise ValueError(f"attention implementation: expected one of {sorted(IMPLEMENTATIONS)}, "
                     f"got {implementation!r}") from None
