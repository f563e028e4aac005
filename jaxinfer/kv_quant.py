"""K/V buffers as the caches hold them: an array in the model's dtype, or a `QuantizedKV` (int8
values with a float32 scale per token and kv head, also where a page pool's row holds several
narrow heads side by side, kv_cache.pool_heads_per_row). The `kv_*` functions index, write and read
either kind, so the caches and the attention paths have one code path for both.

A buffer is (K, *positions, H): K rows of kv heads, the position axes (a page pool's (P, ps), a
contiguous cache's (B, S)), H the row's width (c heads of H / c side by side in a page pool of
narrow heads: c = 1 elsewhere). `index` tuples address (K, *positions).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.common import SCALE_LANES  # scales are stored in rows of 128: QuantizedKV

KV_CACHE_DTYPES = ("int8",)  # besides the model's own dtype (None)
# float32: the TPU kernel fetches a page's scales from one row of 32-bit tiles (Mosaic cannot
# slice one row of packed bfloat16), and bfloat16 would save only 2 bytes a vector.
SCALE_DTYPE = jnp.float32


def check_kv_cache_dtype(kv_cache_dtype: str | None, page_size: int | None = None) -> None:
  """ValueError "flag: ..." for a KV cache dtype, or a page size, the int8 cache cannot take."""
  if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)} (or none: "
                     f"the model's dtype), got {kv_cache_dtype!r}")
  if kv_cache_dtype is not None and page_size is not None and SCALE_LANES % page_size:
    raise ValueError(f"page_size: the int8 KV cache needs a page size dividing {SCALE_LANES} (a "
                     f"page's scales lie in one row of them), got {page_size}")


def scale_rows(num_positions: int) -> int:
  return -(-num_positions // SCALE_LANES)


@struct.dataclass
class QuantizedKV:
  """An int8 K or V buffer: `values` (K, *positions, c*H) int8 (c kv heads a row), and `scales`
  (c*K, R, 128) float32: kv head k's scale at flat position n (row-major over the position axes)
  at [k, n // 128, n % 128], R rows enough for them all. The buffer holds values * scale, per
  head vector.

  Why rows of 128: a TPU keeps an array whose last axis is short (a page's 16 positions) with
  that axis padded to 128 lanes or transposed, so a (K, P, ps) scale array would be copied into
  the kernel's layout at every step; rows of 128 are the kernel's layout as stored (a page's
  scales are one aligned row's segment when the page size divides 128). Reshaping the position
  axes (a contiguous cache viewed as pages) leaves the rows as they are."""

  values: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def heads_per_row(self) -> int:
    return self.scales.shape[0] // self.values.shape[0]

  @classmethod
  def quantize(cls, x: jax.Array, heads_per_row: int = 1) -> "QuantizedKV":
    """x (K, *positions, c*H) quantized: every head's vector along H by itself."""
    values, scales = quantize_heads(x, heads_per_row)
    k, n = scales.shape[0], math.prod(x.shape[1:-1])
    rows = jnp.pad(scales.reshape(k, n), ((0, 0), (0, scale_rows(n) * SCALE_LANES - n)))
    return cls(values, rows.reshape(k, -1, SCALE_LANES))

  def scale_grid(self) -> jax.Array:
    """The scales as (c*K, *positions): kv head by kv head."""
    k, positions = self.scales.shape[0], self.shape[1:-1]
    return self.scales.reshape(k, -1)[:, :math.prod(positions)].reshape((k,) + positions)

  def reshape(self, *lead: int) -> "QuantizedKV":
    """The same buffer with (K, *positions) reshaped to `lead`: the scale rows are unchanged."""
    return self.replace(values=self.values.reshape(lead + self.shape[-1:]))

  def flat(self, index: tuple) -> tuple:
    """(heads, rows, lanes) of the scales at `index` into (c*K, *positions) (its first entry
    indexes kv heads); an out-of-range position gives a row past the end (dropped by a write)."""
    positions = self.shape[1:-1]
    n, valid = 0, True
    for i, size in zip(index[1:], positions):
      n = n * size + i
      valid = valid & (i >= 0) & (i < size)
    n = jnp.where(valid, n, self.scales.shape[1] * SCALE_LANES)
    return index[0], n // SCALE_LANES, n % SCALE_LANES


def quantize_heads(x: jax.Array, heads_per_row: int) -> tuple[jax.Array, jax.Array]:
  """Rows x (K, *rest, c*H) quantized head by head: (values like x, scales (c*K, *rest))."""
  c = heads_per_row
  values, scales = quantize_vectors(x.reshape(x.shape[:-1] + (c, x.shape[-1] // c)))
  scales = jnp.moveaxis(scales, -1, 1)  # (K, c, *rest)
  return values.reshape(x.shape), scales.reshape((x.shape[0] * c,) + x.shape[1:-1])


def quantize_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax int8 per vector along the last axis, on [-127, 127]: (values like x,
  scales x.shape[:-1] float32; 1 for a zero vector).

  The scale is absmax / 127, so a vector's largest element is ±127 itself. (qwix's absmax / 127.5
  puts it on a rounding tie, ±127.5, which its last float bit breaks: the same K computed by a
  step of another shape, or on a mesh, was stored one step apart in a tenth of its vectors.)"""
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127, 1.0)
  values = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
  return values, scale[..., 0]


def kv_zeros(shape: tuple[int, ...], dtype, kv_cache_dtype: str | None, sharding=None,
             scale_sharding=None, heads_per_row: int = 1):
  """A zero-filled buffer of `shape` (K, *positions, c*H): `dtype`, or int8 values with scales."""
  check_kv_cache_dtype(kv_cache_dtype)
  if kv_cache_dtype is None:
    return jnp.zeros(shape, dtype, device=sharding)
  return QuantizedKV(jnp.zeros(shape, jnp.int8, device=sharding),
                     jnp.zeros(scales_shape(shape, heads_per_row), SCALE_DTYPE,
                               device=scale_sharding))


def scales_shape(shape: tuple[int, ...], heads_per_row: int = 1) -> tuple[int, int, int]:
  """The scale rows of an int8 buffer of `shape` (K, *positions, c*H): one per kv head."""
  return (shape[0] * heads_per_row, scale_rows(math.prod(shape[1:-1])), SCALE_LANES)


def kv_bytes_per_vector(head_dim: int, dtype, kv_cache_dtype: str | None) -> int:
  """Bytes one token's K (or V) takes in one kv head (scale rows' padding aside)."""
  if kv_cache_dtype is None:
    return head_dim * jnp.dtype(dtype).itemsize
  return head_dim + jnp.dtype(SCALE_DTYPE).itemsize  # int8 values and their scale


def kv_set(buf, index: tuple, new: jax.Array):
  """buf[index] := new (K, ..., c*H), quantized first (head by head) when buf is; out-of-range
  positions dropped. `index` starts with slice(None) (every row)."""
  rows = _per_head(index, buf.shape[0])
  if isinstance(buf, QuantizedKV):
    values, scales = quantize_heads(new, buf.heads_per_row)
    heads = _per_head(index, buf.scales.shape[0])
    return QuantizedKV(buf.values.at[rows].set(values, mode="drop"),
                       buf.scales.at[buf.flat(heads)].set(scales, mode="drop"))
  return buf.at[rows].set(new.astype(buf.dtype), mode="drop")


def _per_head(index: tuple, kv_heads: int) -> tuple:
  """`index` with its leading slice over the kv heads made an index array: each update is then
  one vector (H,), contiguous in the buffer's (K, *positions, H) layout. Written with the heads
  as a slice, an update is a (K, H) window, and XLA on a TPU lays the buffer out with K and H
  minor to suit it, then copies it whole into the kernels' layout at every step."""
  if not isinstance(index[0], slice):
    return index
  rest = jnp.broadcast_arrays(*index[1:])
  heads = jnp.arange(kv_heads).reshape((kv_heads,) + (1,) * rest[0].ndim)
  return (heads,) + tuple(x[None] for x in rest)


def kv_move(buf, src: tuple, dst: tuple):
  """buf[dst] := buf[src], stored values as they are (every source read before any write);
  out-of-range destinations are dropped. Both start with slice(None), as in `kv_set`."""
  if isinstance(buf, QuantizedKV):
    heads = lambda i: buf.flat(_per_head(i, buf.scales.shape[0]))
    scales = buf.scales.at[heads(dst)].set(buf.scales[heads(src)], mode="drop")
  src, dst = _per_head(src, buf.shape[0]), _per_head(dst, buf.shape[0])
  if isinstance(buf, QuantizedKV):
    return QuantizedKV(buf.values.at[dst].set(buf.values[src], mode="drop"), scales)
  return buf.at[dst].set(buf[src], mode="drop")


def kv_copy_pages(pool, src: jax.Array, dst: jax.Array):
  """A page pool (K, P, ps, c*H) with pages `dst` := pages `src` (n,), an int8 pool's scales
  with them as stored (bit for bit); a `dst` past the pool copies nothing."""
  if not isinstance(pool, QuantizedKV):
    return pool.at[:, dst].set(pool[:, src], mode="drop")
  offsets = jnp.arange(pool.shape[2])[None, :]
  _, row, lane = pool.flat((slice(None), src[:, None], offsets))
  _, to_row, to_lane = pool.flat((slice(None), dst[:, None], offsets))
  return QuantizedKV(pool.values.at[:, dst].set(pool.values[:, src], mode="drop"),
                     pool.scales.at[:, to_row, to_lane].set(pool.scales[:, row, lane],
                                                            mode="drop"))


def kv_read(buf, index: tuple, dtype) -> tuple[jax.Array, jax.Array | None]:
  """buf[index] (index=() for all of it) as (values in `dtype`, float32 scales or None): an int8
  buffer's values widened (exactly) and its scales beside them, for the attention to apply to
  its logits and probabilities as the kernels do, never materialising dequantized K/V."""
  if isinstance(buf, QuantizedKV):
    return buf.values[index].astype(dtype), buf.scale_grid()[index]
  return buf[index], None


def kv_arrays(buf) -> tuple[jax.Array, ...]:
  """(values,) or (values, scale rows): what a kernel takes for one buffer."""
  return (buf.values, buf.scales) if isinstance(buf, QuantizedKV) else (buf,)
