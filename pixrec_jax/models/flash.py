"""Fused (flash) attention with Gemma2's logit soft-capping, as a Pallas kernel for GPUs.

cuDNN's fused attention (`attention="cudnn"`) has no soft-capping, so Gemma2
decoders (PaliGemma 2) fall back to XLA's unfused einsum attention, which writes
the float32 logits, their tanh, the mask and the softmax of every head to memory
and reads them back for the backward pass. This kernel computes the same thing
block by block in on-chip memory, the way FlashAttention-2 does (Dao, 2023):

  forward   for each block of queries, a running max and sum over blocks of keys,
            so the (T, S) logits never leave the chip; it saves only the row-wise
            log-sum-exp for the backward pass;
  backward  two kernels that recompute the probabilities from that log-sum-exp:
            one per block of keys (dK, dV) and one per block of queries (dQ).

Soft-capping is `cap * tanh(s / cap)` on the scaled logits `s` before the mask, as
`layers.softcapped` and Hugging Face's Gemma2 apply it; its derivative
`1 - tanh^2` is applied in the backward kernels. The mask is any boolean mask
(B or 1, 1, T or 1, S) the models build (causal, padding, PaliGemma's bidirectional
prefix, sliding windows), read block by block as int8. Grouped-query attention
reads each query head's key/value head in place; dK and dV are computed per query
head and summed over the group. Inputs of any float dtype are multiplied in their
dtype and accumulated in float32 (the probabilities and dS are rounded to the
value dtype before their matmuls, as flash kernels and `layers.einsum_f32` do).

With `causal=True` (the models pass it under `causal_blocks > 1`, their promise
that the mask is causal) each query block reads only the key blocks up to its own
end, and each key block's backward starts at its first query block: about half the
work. A query row with no allowed key returns finite values (a uniform average of
the values, as the XLA path) instead of NaN; callers never read those rows.

The kernels target Triton through Pallas (GPU). Elsewhere they run in Pallas's
interpreter, exact but slow, which the tests use to check them against
`layers.attention` on CPU: the models run `attention="pallas"` that way on a CPU
(with a warning) and refuse it on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

# A finite "minus infinity": exp(MASKED - m) is 0 for any real row max m, and a row whose every key is masked
# stays finite (exp(0) = 1 for each key: a uniform average) instead of inf - inf = NaN.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def block_sizes(head_dim: int) -> tuple[int, int]:
  """(block_q, block_k): tiles that fit a GPU's shared memory with the head dimension padded to a power of 2.

  Above 128, 32 queries x 64 keys: on an H200 at PaliGemma 2 3B's decoder shape (batch 16, 1680 tokens,
  8 heads of 256) one layer's forward + backward took 6.74 ms, against 11.11 with 32 x 32 and 6.80 / 9.06
  with 64 x 64 / 64 x 32 (`bench/attention.py --batch 16 --pallas-blocks 64x32,32x64,64x64`, BENCHMARKS.md).
  """
  return (64, 64) if head_dim <= 128 else (32, 64)


def _compiler_params(head_dim: int, num_warps: int | None):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(num_warps=num_warps or (4 if head_dim <= 64 else 8), num_stages=2)


def _logits(q, k, mask_block, allowed, scale, softcap):
  """(block_q, block_k) float32 logits after scale, soft-cap and mask; and tanh for the soft-cap's derivative."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  t = None
  if softcap is not None:
    t = jnp.tanh(s / softcap)
    s = t * softcap
  if mask_block is not None:
    allowed = jnp.logical_and(mask_block != 0, allowed)
  return jnp.where(allowed, s, MASKED), t


def _probs_and_dlogits(q, k, v, do, lse, delta, mask_block, allowed, scale, softcap):
  """The softmax probabilities recomputed from the log-sum-exp, and the loss's gradient in the scaled
  logits `s` (before soft-cap): dP = dO V^T, dL = P (dP - delta) with delta = rowsum(dO * O), times the
  soft-cap's derivative 1 - tanh^2."""
  s, t = _logits(q, k, mask_block, allowed, scale, softcap)
  p = jnp.exp(s - lse[:, None])
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta[:, None])
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _allowed(q_start, k_start, block_q, block_k, kv_len, causal):
  """(block_q, block_k) or (1, block_k): keys inside the unpadded sequence, and with `causal` not after the query."""
  keys = (k_start + jnp.arange(block_k))[None, :]
  ok = keys < kv_len
  if causal:
    ok = jnp.logical_and(ok, (q_start + jnp.arange(block_q))[:, None] >= keys)
  return ok


def _key_blocks(q_block, block_q, block_k, num_k, causal):
  """How many key blocks query block `q_block` reads: all, or with `causal` those up to its last row."""
  if not causal:
    return num_k
  return jnp.minimum(num_k, jax.lax.div((q_block + 1) * block_q + block_k - 1, block_k))


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, softcap, block_k, kv_len, has_mask, causal):
  mask_ref, o_ref, lse_ref = refs if has_mask else (None,) + tuple(refs)
  q = q_ref[...]
  block_q, head_dim = q.shape
  q_block = pl.program_id(0)
  num_k = _key_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    mask = None if mask_ref is None else mask_ref[:, pl.ds(start, block_k)]
    s, _ = _logits(q, k, mask, _allowed(q_block * block_q, start, block_q, block_k, kv_len, causal), scale, softcap)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * correction + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc * correction[:, None] + pv, m_new, l

  init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), MASKED, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_k, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, softcap, block_q, kv_len,
                 has_mask, causal):
  mask_ref, dk_ref, dv_ref = refs if has_mask else (None,) + tuple(refs)
  k = k_ref[...]
  v = v_ref[...]
  block_k, head_dim = k.shape
  start_k = pl.program_id(0) * block_k
  num_q = q_ref.shape[0] // block_q
  first_q = jax.lax.div(start_k, block_q) if causal else 0  # with `causal`, earlier queries see none of these keys

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    mask = None if mask_ref is None else mask_ref[rows, :]
    allowed = _allowed(i * block_q, start_k, block_q, block_k, kv_len, causal)
    p, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask, allowed, scale, softcap)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = jax.lax.fori_loop(first_q, num_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, softcap, block_k, kv_len, has_mask,
               causal):
  mask_ref, dq_ref = refs if has_mask else (None,) + tuple(refs)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  block_q = q.shape[0]
  q_block = pl.program_id(0)
  num_k = _key_blocks(q_block, block_q, block_k, k_ref.shape[0] // block_k, causal)

  def body(j, dq):
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    mask = None if mask_ref is None else mask_ref[:, pl.ds(start, block_k)]
    allowed = _allowed(q_block * block_q, start, block_q, block_k, kv_len, causal)
    _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask, allowed, scale, softcap)
    return dq + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


class _Plan:
  """Static shapes of one call: padded lengths, blocks, grouping, and the BlockSpecs they give."""

  def __init__(self, q_shape, k_shape, mask_shape, interpret, causal, blocks=(None, None), num_warps=None):
    b, t, n, h = q_shape
    s, kv = k_shape[1], k_shape[2]
    if n % kv:
      raise ValueError(f"flash attention: {n} query heads are not a multiple of {kv} key/value heads")
    self.b, self.t, self.n, self.h, self.s, self.kv = b, t, n, h, s, kv
    if causal and t != s:
      raise ValueError(f"flash attention: causal needs as many queries as keys, got {t} and {s}")
    self.groups = n // kv
    self.causal = causal
    self.hp = max(16, pl.next_power_of_2(h))
    default = block_sizes(self.hp)
    self.block_q, self.block_k = (given or d for given, d in zip(blocks, default))
    for name, size in (("block_q", self.block_q), ("block_k", self.block_k)):
      if size < 16 or size & (size - 1):
        raise ValueError(f"flash attention: {name}={size} must be a power of 2, at least 16 (Triton's tiles)")
    self.num_warps = num_warps
    self.tp = -(-t // self.block_q) * self.block_q
    self.sp = -(-s // self.block_k) * self.block_k
    self.mask_shape = mask_shape  # the caller's mask's shape (None: no mask), for its (zero) cotangent
    self.mask_batch = 1 if mask_shape is None else mask_shape[0]
    self.interpret = interpret

  def call(self, kernel, grid, in_specs, out_specs, out_shape, name):
    kwargs = {} if self.interpret else dict(compiler_params=_compiler_params(self.hp, self.num_warps))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=self.interpret, name=name, **kwargs)

  def query_blocks(self):
    """(block_q, Hp) of one query head for grid point (query block, b, n): q, dO, out, dQ."""
    return pl.BlockSpec((None, self.block_q, None, self.hp), lambda i, b, n: (b, i, n, 0))

  def all_keys(self):
    """(Sp, Hp) of query head n's key/value head for grid point (query block, b, n)."""
    g = self.groups
    return pl.BlockSpec((None, self.sp, None, self.hp), lambda i, b, n: (b, 0, n // g, 0))

  def mask_spec(self, rows: int, by_query_block: bool):
    """The mask's (rows, Sp) or (Tp, block_k) block for grid point (block, b, n)."""
    one = self.mask_batch == 1
    if by_query_block:
      return pl.BlockSpec((None, rows, self.sp), lambda i, b, n: (0 if one else b, i, 0))
    return pl.BlockSpec((None, self.tp, rows), lambda j, b, n: (0 if one else b, 0, j))


def _prepare(q, k, v, mask, plan: _Plan):
  """Pads sequences to whole blocks and heads to a power of 2; the mask to int8 (Bm, Tp, Sp) or None."""
  q = _pad_to(_pad_to(q, 1, plan.tp), 3, plan.hp)
  k = _pad_to(_pad_to(k, 1, plan.sp), 3, plan.hp)
  v = _pad_to(_pad_to(v, 1, plan.sp), 3, plan.hp)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (plan.mask_batch, 1, plan.t, plan.s))[:, 0].astype(jnp.int8)
    mask = _pad_to(_pad_to(mask, 1, plan.tp), 2, plan.sp)
  return q, k, v, mask


def _forward(q, k, v, mask, plan: _Plan, scale, softcap):
  """(out (B, Tp, N, Hp), lse (B, N, Tp)) on padded inputs."""
  bq = plan.block_q
  q_spec, kv_spec = plan.query_blocks(), plan.all_keys()
  in_specs = [q_spec, kv_spec, kv_spec] + ([plan.mask_spec(bq, True)] if mask is not None else [])
  kernel = functools.partial(_fwd_kernel, scale=scale, softcap=softcap, block_k=plan.block_k, kv_len=plan.s,
                             has_mask=mask is not None, causal=plan.causal)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((plan.b, plan.n, plan.tp), jnp.float32)]
  out_specs = [q_spec, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))]
  args = (q, k, v) + ((mask,) if mask is not None else ())
  return plan.call(kernel, (plan.tp // bq, plan.b, plan.n), in_specs, out_specs, out_shape, "flash_forward")(*args)


def _backward(q, k, v, mask, out, lse, dout, plan: _Plan, scale, softcap):
  """dq, dk, dv on padded inputs (dk, dv summed over each key/value head's query heads)."""
  bq, bk, g = plan.block_q, plan.block_k, plan.groups
  delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
  has_mask = mask is not None
  extra = (mask,) if has_mask else ()
  common = dict(scale=scale, softcap=softcap, kv_len=plan.s, has_mask=has_mask, causal=plan.causal)

  # dK, dV: one program per (key block, batch, query head), looping over all query blocks.
  q_all = pl.BlockSpec((None, plan.tp, None, plan.hp), lambda j, b, n: (b, 0, n, 0))
  kv_block = pl.BlockSpec((None, bk, None, plan.hp), lambda j, b, n: (b, j, n // g, 0))
  row_all = pl.BlockSpec((None, None, plan.tp), lambda j, b, n: (b, n, 0))
  in_specs = [q_all, kv_block, kv_block, q_all, row_all, row_all] + ([plan.mask_spec(bk, False)] if has_mask else [])
  per_head = pl.BlockSpec((None, bk, None, plan.hp), lambda j, b, n: (b, j, n, 0))
  shape = jax.ShapeDtypeStruct((plan.b, plan.sp, plan.n, plan.hp), jnp.float32)
  dk, dv = plan.call(functools.partial(_dkdv_kernel, block_q=bq, **common), (plan.sp // bk, plan.b, plan.n),
                     in_specs, [per_head, per_head], [shape, shape], "flash_dkdv")(q, k, v, dout, lse, delta, *extra)
  dk = dk.reshape(plan.b, plan.sp, plan.kv, g, plan.hp).sum(3).astype(k.dtype)
  dv = dv.reshape(plan.b, plan.sp, plan.kv, g, plan.hp).sum(3).astype(v.dtype)

  # dQ: one program per (query block, batch, query head), looping over all key blocks.
  q_block, kv_all = plan.query_blocks(), plan.all_keys()
  row_block = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  in_specs = [q_block, kv_all, kv_all, q_block, row_block, row_block] + ([plan.mask_spec(bq, True)] if has_mask else [])
  dq = plan.call(functools.partial(_dq_kernel, block_k=bk, **common), (plan.tp // bq, plan.b, plan.n), in_specs,
                 q_block, jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_dq")(q, k, v, dout, lse, delta, *extra)
  return dq, dk, dv


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                    softcap: float | None = None, *, causal: bool = False, interpret: bool | None = None,
                    block_q: int | None = None, block_k: int | None = None, num_warps: int | None = None) -> jax.Array:
  """`layers.attention`'s computation (q: (B, T, N, H); k, v: (B, S, K, H); boolean mask broadcastable to
  (B, 1, T, S), True where a query may attend) as fused Pallas kernels; differentiable in q, k and v.

  causal: no query sees a later key (T == S). The kernels then skip the key blocks wholly after a query
    block (about half the work) and mask the rest by position, on top of `mask`.
  interpret: run in Pallas's interpreter (default: on any backend but GPU).
  block_q, block_k, num_warps: the tiles and Triton warps (default: `block_sizes` of the padded head
    dimension; 4 warps up to head dimension 64, else 8); bench/attention.py --pallas-blocks sweeps them."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if mask is not None:
    if mask.ndim != 4 or mask.shape[1] != 1:
      raise ValueError(f"flash attention: mask must be (B or 1, 1, T or 1, S), got {mask.shape}")
    mask = mask.astype(bool)
  plan = _Plan(q.shape, k.shape, None if mask is None else mask.shape, interpret, causal, (block_q, block_k),
               num_warps)
  return _flash(q, k, v, mask, plan, float(scale), None if softcap is None else float(softcap))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, plan, scale, softcap):
  return _flash_fwd(q, k, v, mask, plan, scale, softcap)[0]


def _flash_fwd(q, k, v, mask, plan, scale, softcap):
  qp, kp, vp, mp = _prepare(q, k, v, mask, plan)
  out, lse = _forward(qp, kp, vp, mp, plan, scale, softcap)
  return out[:, :plan.t, :, :plan.h], (qp, kp, vp, mp, out, lse)  # the padded int8 mask, not the caller's too


def _flash_bwd(plan, scale, softcap, residuals, dout):
  qp, kp, vp, mp, out, lse = residuals
  doutp = _pad_to(_pad_to(dout, 1, plan.tp), 3, plan.hp)
  dq, dk, dv = _backward(qp, kp, vp, mp, out, lse, doutp, plan, scale, softcap)
  dmask = None if plan.mask_shape is None else np.zeros(plan.mask_shape, jax.dtypes.float0)
  return dq[:, :plan.t, :, :plan.h], dk[:, :plan.s, :, :plan.h], dv[:, :plan.s, :, :plan.h], dmask


_flash.defvjp(_flash_fwd, _flash_bwd)
