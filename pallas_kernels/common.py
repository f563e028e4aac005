"""What every kernel shares: the mask value, the choice of kernel form by target platform, Triton's
params and padding, the online softmax over pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


BACKENDS = ("gpu", "tpu")  # the kernel forms: Triton-style (also what CPU interprets), Mosaic TPU


def on_target(build, *args, backend: str | None = None, interpret: bool | None = None):
  """Runs `build(form, interpret)(*args)` with the kernel form and interpret mode that the
  platform being *lowered for* needs, not the host's: TPU gets the Mosaic TPU form, CUDA/ROCm the
  Triton form, CPU interprets the Triton form. The choice is made by `lax.platform_dependent`, so
  exporting or AOT-compiling for `tpu` or `cuda` from a CPU host yields real kernels.

  backend ("gpu" | "tpu") forces the form; interpret forces interpretation (for the TPU form
  that is jax's TPU interpret mode, which models DMAs, semaphores and SMEM; pass a
  `pltpu.InterpretParams` for its options, e.g. race detection). `interpret` handed to `build`
  is False, True, or a `pltpu.InterpretParams`."""
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"kernel backend: expected one of {BACKENDS} or None, got {backend!r}")

  built = {}  # one function per (form, interpret): platform_dependent traces each only once

  def branch(platform):
    form = backend or ("tpu" if platform == "tpu" else "gpu")
    interp = (platform == "cpu") if interpret is None else interpret
    if (form, interp) not in built:
      mode = interp
      if interp is True and form == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        mode = pltpu.InterpretParams()
      built[form, interp] = build(form, mode)
    return built[form, interp]

  return jax.lax.platform_dependent(*args, cpu=branch("cpu"), cuda=branch("gpu"),
                                    rocm=branch("gpu"), tpu=branch("tpu"))


def gpu_target(device_kind: str = "NVIDIA H100"):
  """A context for lowering the Triton form for CUDA on a host without a GPU: jax >= 0.11's
  Triton lowering asks which GPU (its compute capability), and an abstract device answers.
  `with gpu_target(): jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`."""
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def triton_params(num_warps: int = 4, num_stages: int = 2):
  """Explicit Triton compiler params: they route `pallas_call` on CUDA to Triton in every jax
  version (jax 0.10 otherwise picks Mosaic GPU, which stages whole blocks in shared memory)."""
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pow2(n: int) -> int:
  """The smallest power of two >= n (Triton's in-kernel arrays are power-of-two sized)."""
  return 1 << max(0, (n - 1).bit_length())


def gpu_rows(rows: int, interpret, min_rows: int | None) -> int:
  """Rows of the GPU form's matmuls: compiled for Triton, a power of two >= 16 (its smallest
  dot); interpreted, `min_rows` (default: no padding) so the padding itself can be tested."""
  if min_rows is None:
    min_rows = 1 if interpret else 16
  rows = max(rows, min_rows)
  return rows if interpret else pow2(rows)


# Page pools with heads narrower than a TPU vector (128 lanes) hold c = width // H kv heads side
# by side in each row: (K/c, P, ps, c*H), pool row j holding kv heads j*c .. j*c + c - 1, so a
# TPU lays the pool out row-major as stored (a last axis of 64 would be padded to 128 lanes or
# transposed, and copied into the kernels' layout at every step). The kernels read such a pool
# as K/c heads of width c*H whose rows are the c heads' query rows, each head's queries in its
# own lanes (zero elsewhere), and keep each row's own lanes of the output.


def heads_per_row(pool_width: int, head_dim: int) -> int:
  """c, the kv heads a pool row holds side by side (pools (K/c, P, ps, c*H))."""
  if pool_width % head_dim:
    raise ValueError(f"pages of width {pool_width} do not hold heads of {head_dim}")
  return pool_width // head_dim


def check_heads(name: str, n: int, h: int, pool_shape: tuple[int, ...]) -> int:
  """c, the kv heads a row of pages (K/c, ..., c*H) holds; ValueError unless N query heads of H
  fit them: c*H lanes and N a multiple of K."""
  width, rows = pool_shape[-1], pool_shape[0]
  if width % h or n % (rows * (width // h)):
    raise ValueError(f"{name}: {n} query heads of {h} do not fit pages {tuple(pool_shape)} "
                     f"(K/c, ..., c*H: c kv heads a row)")
  return width // h


def unpack_heads(x: jax.Array, head_dim: int) -> jax.Array:
  """A pool or cache (K/c, ..., c*H) as (K, ..., H), kv head j*c + i from row j's lanes
  i*H .. (i+1)*H."""
  c = heads_per_row(x.shape[-1], head_dim)
  if c == 1:
    return x
  x = jnp.moveaxis(x.reshape(x.shape[:-1] + (c, head_dim)), -2, 1)
  return x.reshape((x.shape[0] * c,) + x.shape[2:])


def pack_rows(q: jax.Array, c: int) -> jax.Array:
  """Query rows (B, K, R, H) for pools of c heads a row: (B, K/c, c*R, c*H), head i of a row
  group in rows i*R .. and lanes i*H .., zeros elsewhere."""
  if c == 1:
    return q
  b, k, r, h = q.shape
  own = jnp.eye(c, dtype=bool)[:, None, :, None]  # (head, row, lane group, lane)
  q = jnp.where(own, q.reshape(b, k // c, c, r, 1, h), jnp.zeros((), q.dtype))
  return q.reshape(b, k // c, c * r, c * h)


def unpack_rows(o: jax.Array, c: int) -> jax.Array:
  """pack_rows' inverse for outputs: (B, K/c, c*R, c*H) -> (B, K, R, H), each row's own lanes."""
  if c == 1:
    return o
  b, kc, cr, ch = o.shape
  r, h = cr // c, ch // c
  o = jnp.diagonal(o.reshape(b, kc, c, r, c, h), axis1=2, axis2=4)  # (B, K/c, R, H, c)
  return jnp.moveaxis(o, -1, 2).reshape(b, kc * c, r, h)


def merge_splits(o: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
  """Combines split-K partial results o (..., C, rows, H) by their log-sum-exps lse
  (..., C, rows) along the split axis; a split that saw no key (lse = -inf) weighs 0."""
  total = jax.nn.logsumexp(lse, axis=axis, keepdims=True)
  weights = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)),
                      0.0)
  return jnp.sum(weights[..., None] * o, axis=axis)


NN = (((1,), (0,)), ((), ()))  # dot_general dimension numbers: a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
TRITON_MIN_DIM = 16


def matmul(a: jax.Array, b: jax.Array, dims=NN) -> jax.Array:
  """The Triton form's 2-d products in float32, under dimension numbers NN, NT or TN. Triton's
  dot needs every dimension >= 16, and jax's lowering does not check: a smaller one compiles and
  comes out wrong (a (16, 4) x (4, 16) product summed twice). A product with a dimension under
  16 is multiplied and summed elementwise instead, on every platform, so CPU tests at small
  shapes run the path that a GPU compiles."""
  (ca,), (cb,) = dims[0]
  m, n = a.shape[1 - ca], b.shape[1 - cb]
  if min(m, n, a.shape[ca]) >= TRITON_MIN_DIM:
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  a = a if ca == 1 else a.T  # (M, K)
  b = b if cb == 0 else b.T  # (K, N)
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


# Online softmax over key blocks (flash attention's running max / sum), shared by the kernels
# that walk pages: a carry of (o (rows, H) f32 unnormalised output, m (rows,) running max,
# l (rows,) running sum).


def softmax_init(rows: int, h: int):
  return (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def softmax_update(carry, logits: jax.Array, visible: jax.Array, v: jax.Array,
                   v_scale: jax.Array | None = None):
  """Folds one block: logits (rows, keys) f32 already scaled, visible (rows, keys), v (keys, H);
  an int8 v's per-key scales `v_scale` (1 or rows, keys) weigh the probabilities instead. Values
  no row sees are zeroed (a reused page's unwritten tail may hold NaN: 0 x NaN is NaN)."""
  o, m, l = carry
  seen = visible.astype(jnp.int32).max(axis=0) > 0  # (a max: Triton lowers no reduce_or)
  v = jnp.where(seen[:, None], v, jnp.zeros_like(v))
  logits = jnp.where(visible, logits, MASK_VALUE)
  m_new = jnp.maximum(m, logits.max(axis=-1))
  p = jnp.where(visible, jnp.exp(logits - m_new[:, None]), 0.0)
  corr = jnp.exp(m - m_new)
  l = corr * l + p.sum(axis=-1)
  weights = p if v_scale is None else jnp.where(visible, p * v_scale, 0.0)
  o = corr[:, None] * o + matmul(weights.astype(v.dtype), v)
  return o, m_new, l


def softmax_finish(carry):
  """(normalised output, log-sum-exp); rows that saw no key give 0 and -inf."""
  o, m, l = carry
  seen = l > 0
  out = jnp.where(seen[:, None], o / jnp.where(seen, l, 1.0)[:, None], 0.0)
  return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


SCALE_LANES = 128  # a TPU vector's lanes: a row of int8 pools' scales is one vector


def check_scales(name: str, k_pages, k_scales, v_scales, heads_per_row: int = 1):
  """int8 pools (K,P,ps,c*H) (c kv heads a row) need both scale arrays, float32 rows
  (c*K, ceil(P*ps/128), 128), one per kv head: the scale of kv head k at page p's position o
  at flat position n = p*ps + o, [k, n // 128, n % 128] (so the TPU form fetches a page's
  scales from one aligned row, with no copy into another layout: the page size must divide
  128). Other pools take no scales."""
  quantized = k_pages.dtype == jnp.int8
  if (k_scales is None) != (v_scales is None) or quantized != (k_scales is not None):
    raise ValueError(f"{name}: int8 pools need k_scales and v_scales (and only they take them); "
                     f"got {k_pages.dtype} pools with scales "
                     f"{None if k_scales is None else k_scales.shape}, "
                     f"{None if v_scales is None else v_scales.shape}")
  if quantized:
    kv_heads, pages, ps, _ = k_pages.shape
    want = (kv_heads * heads_per_row, -(-pages * ps // SCALE_LANES), SCALE_LANES)
    if SCALE_LANES % ps:
      raise ValueError(f"{name}: int8 pages need a page size dividing {SCALE_LANES}, got {ps}")
    for x in (k_scales, v_scales):
      if x.shape != want or x.dtype != jnp.float32:
        raise ValueError(f"{name}: scales must be float32 rows {want}, got {x.dtype} {x.shape}")


def scale_grid(rows: jax.Array, pages: int, page_size: int) -> jax.Array:
  """Scale rows (K, R, 128) as (K, P, ps): the scale of page p's position o at [k, p, o]."""
  k = rows.shape[0]
  return rows.reshape(k, -1)[:, :pages * page_size].reshape(k, pages, page_size)


def scale_kwargs(scale_refs) -> dict:
  """walk_pages' keyword arguments for a kernel's scale refs: () or (ks_ref, vs_ref)."""
  return dict(zip(("ks_ref", "vs_ref"), scale_refs))


def rows_by_head(scales: list, rows: int, head_rows: int):
  """Per-key scales of the c kv heads of a pool row, each (1, keys), as the query rows read
  them: (rows, keys), row r taking head r // head_rows's (pack_rows' order), rows past the
  heads' 0; one head: its (1, keys) as it is."""
  if len(scales) == 1:
    return scales[0]
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  out = jnp.zeros((rows, scales[0].shape[-1]), scales[0].dtype)
  for i, x in enumerate(scales):
    out = jnp.where((row >= i * head_rows) & (row < (i + 1) * head_rows), x, out)
  return out


def split_pages(end, page_size: int, max_pages: int, pages_per_split: int):
  """[first, last) of the pages this program (split = program_id 2) walks, of the pages holding
  positions < end."""
  from jax.experimental import pallas as pl
  num_pages = jnp.minimum((end + page_size - 1) // page_size, max_pages)
  first = pl.program_id(2) * pages_per_split
  return first, jnp.minimum(first + pages_per_split, num_pages)


def walk_pages(q, k_ref, v_ref, pt_ref, start, stop, visible_fn, carry, *, head, scale: float,
               page_size: int, head_rows: int, ks_ref=None, vs_ref=None):
  """Folds pages start..stop-1 of this sequence's page table into the online-softmax `carry`:
  one (rows, W) x (W, ps) matmul per page of row `head` of the whole pools (K,P,ps,W), W = c*H
  lanes of c kv heads, each head's `head_rows` query rows in its own lanes (pack_rows);
  visible_fn(pos (1, ps)) -> (rows, ps) bool. int8 pools come with their per-key scales
  `ks_ref`, `vs_ref` (c*K,P,ps): a key's scale multiplies its logits, a value's its weights."""
  def body(j, carry):
    page = jnp.minimum(pt_ref[j], k_ref.shape[1] - 1)  # past the pool: clamped, as XLA's gather
    k, v = k_ref[head, page], v_ref[head, page]
    if ks_ref is not None:
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    logits = matmul(q, k, NT) * scale
    v_scale = None
    if ks_ref is not None:
      c = ks_ref.shape[0] // k_ref.shape[0]
      heads = lambda ref: rows_by_head([ref[head * c + i, page][None, :] for i in range(c)],
                                       q.shape[0], head_rows)
      logits = logits * heads(ks_ref)
      v_scale = heads(vs_ref)
    pos = (j * page_size + jnp.arange(page_size))[None, :]
    return softmax_update(carry, logits, visible_fn(pos), v, v_scale)

  return jax.lax.fori_loop(start, jnp.maximum(start, stop), body, carry)


def walk_sinks_and_window(walk, first, last, carry, *, page_size: int, sinks: int = 0,
                          window_start=None):
  """Folds this program's pages [first, last) into `carry` through walk(start, stop, carry=...),
  reading only pages that can hold a visible key: without a window (window_start None) all of
  them; with one whose earliest visible position is `window_start`, the pages of the first
  `sinks` positions, then the pages from the window's first on."""
  if window_start is None:
    return walk(first, last, carry=carry)
  if sinks:
    sink_end = jnp.maximum(first, jnp.minimum(last, -(-sinks // page_size)))
    carry = walk(first, sink_end, carry=carry)
    first = sink_end
  return walk(jnp.maximum(first, jnp.maximum(window_start, 0) // page_size), last, carry=carry)
