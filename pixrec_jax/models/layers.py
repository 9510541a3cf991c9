"""Building blocks shared by every backbone.

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp",
"heads"); `pixrec_jax.sharding` maps them to mesh axes through one rules table.
Parameters are stored in `param_dtype` and cast to the compute `dtype` at use;
norms, softmax and logits run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixrec_jax import sharding
from pixrec_jax.models import flash

Axes = tuple[str | None, ...]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, a, b)` accumulated and returned in float32, differentiated in the inputs' dtype.

  The forward matmul reads half-precision inputs and writes float32 (logits that feed a
  float32 softmax or loss). Differentiating `preferred_element_type=float32` directly would
  make both backward matmuls mixed float32 x bfloat16, which XLA runs as float32 matmuls
  (the bfloat16 operand upcast; on GPU at TF32 speed at best). Here the float32 cotangent
  is rounded to the inputs' dtype first, as flash-attention kernels round dS before their
  dQ and dK matmuls and as a bfloat16 PyTorch model's logits carry bfloat16 gradients;
  float32 inputs give exactly the plain einsum's gradients.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, g):
  a, b = residuals
  out, vjp = jax.vjp(functools.partial(jnp.einsum, spec), a, b)  # the einsum in the inputs' dtype
  return vjp(g.astype(out.dtype))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def residual_barrier(x: jax.Array) -> jax.Array:
  """x unchanged; on CPU its gradient is written out here, once, in the backward pass.

  Each layer's residual-stream gradient is the next layer's plus that layer's branches (LayerNorm
  backward and all). XLA's CPU backend fused the whole chain of those sums, from the top layer down,
  into the transposes that feed each layer's weight-gradient matmuls, recomputing it for every layer,
  column by column: a cost that grows with depth (SmolVLM's 12-layer SigLIP at 3 tiles: BENCHMARKS.md,
  "The vision tower's residual gradients"). An `optimization_barrier` does not stop it (XLA:CPU removes barriers before fusing); a
  conditional does, since nothing fuses across one. So the gradient passes through a `lax.cond` whose two
  branches both return it (the predicate reads one element, which XLA cannot fold away), one array per
  layer. Called by the SigLIP vision tower (the decoders showed no such chain). On other platforms: the
  identity.
  """
  return _residual_barrier(x) if jax.default_backend() == "cpu" else x


@jax.custom_vjp
def _residual_barrier(x: jax.Array) -> jax.Array:
  return x


def _residual_barrier_fwd(x):
  return x, None


def _residual_barrier_bwd(_, g):
  first = g.reshape(-1)[0]
  return (jax.lax.cond(first == first, lambda g: g, lambda g: g * 1, g),)  # g either way (NaN * 1 is NaN)


_residual_barrier.defvjp(_residual_barrier_fwd, _residual_barrier_bwd)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel stored (in, out). A LoRA adapter, when attached, adds its update."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      axes: tuple[str | None, str | None],
      use_bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      init_std: float = 0.02,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(init_std), (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[1],)) if use_bias else None
    self.lora = nnx.data(None)  # a LoRA adapter, attached by pixrec_jax.models.lora.apply

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.lora is not None:
      y = y + self.lora(x, self.dtype)
    if self.bias is not None:
      y = add_bias(y, self.bias[...].astype(self.dtype))
    return y


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias (bias over the last axis); on one CPU device the bias's gradient, a sum over every token,
  runs as `token_sum`'s halves instead of XLA:CPU's windowed reduction (`halved_sums`)."""
  return _add_bias(y, bias) if halved_sums() else y + bias


@jax.custom_vjp
def _add_bias(y, bias):
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  return g, token_sum(g).astype(g.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def fold_halves(x: jax.Array, axis: int, keep: int, combine: Callable) -> jax.Array:
  """x with `axis` folded onto itself: combine(first half, second half), elementwise, while more than
  `keep` remain and the length is even. XLA:CPU runs the folds as elementwise fusions where it splits a
  long reduction into slow windowed ones (`_row_max`, `_row_sum`, `token_sum`, optim.global_norm)."""
  axis = axis % x.ndim
  n = x.shape[axis]
  while n > keep and n % 2 == 0:
    n //= 2
    x = combine(jax.lax.slice_in_dim(x, 0, n, axis=axis), jax.lax.slice_in_dim(x, n, 2 * n, axis=axis))
  return x


def token_sum(x: jax.Array) -> jax.Array:
  """The float32 sum of x over every axis but the last, as halves of the tokens added elementwise until
  at most 8 rows remain, then one short sum (the same value to rounding as jnp.sum)."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.sum(fold_halves(x, 0, 8, jnp.add), axis=0)


def _row_sum(x: jax.Array) -> jax.Array:
  """sum over the last axis (kept, size 1), as elementwise sums of its halves until at most 16 remain
  (`_row_max`'s form for a sum: the same value to rounding)."""
  return jnp.sum(fold_halves(x, -1, 16, jnp.add), axis=-1, keepdims=True)


def halved_sums() -> bool:
  """Whether norms and biases take their sums over features and over tokens as halves (`token_sum`,
  `_row_sum`): on CPU, where XLA splits such reductions into windows of 32 that run far below memory
  speed (BENCHMARKS.md, "Sums in halves on the CPU"), and on one device: a mesh shards the tokens, which
  halves would slice across devices. GPUs keep plain reductions."""
  if jax.default_backend() != "cpu":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel; on CPU a (B, T, D) x as (B x T, D), so the weight gradient contracts one axis, not two
  (`_flat_matmuls`)."""
  if x.ndim > 2 and _flat_matmuls():
    return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + kernel.shape[1:])
  return jnp.dot(x, kernel)


def side_by_side(x: jax.Array, linears: Sequence[Linear]) -> list[jax.Array]:
  """`[linear(x) for linear in linears]`; on CPU one matmul against their kernels side by side.

  XLA:CPU runs one (B x T, D) x (D, F1 + F2 + ...) matmul, with its input and weight gradients, faster
  than the same work as separate matmuls that each read x (the q/k/v and gate/up projections: the demo's
  step 130.0 / 133.9 -> 127.3 / 128.7 ms, smolvlm_256m's 11.24 / 11.03 -> 10.76 / 10.94 s; BENCHMARKS.md,
  "Projections side by side"). The same outputs: each column block of the product is its own kernel's.
  Taken only where the linears can share a matmul: no LoRA adapter, one compute dtype, a bias on all or
  none, and no tensor-parallel mesh (whose head axes shard the kernels' columns apart). GPUs keep the
  separate matmuls their timings were measured with.
  """
  dtypes, biased = {l.dtype for l in linears}, {l.bias is not None for l in linears}
  if (not _flat_matmuls() or _tensor_parallel() or len(dtypes) > 1 or len(biased) > 1
      or any(l.lora is not None for l in linears)):
    return [l(x) for l in linears]
  dtype = dtypes.pop()
  y = _matmul(x.astype(dtype), jnp.concatenate([l.kernel[...].astype(dtype) for l in linears], axis=1))
  if biased.pop():
    y = add_bias(y, jnp.concatenate([l.bias[...].astype(dtype) for l in linears]))
  widths = [l.kernel.shape[1] for l in linears]
  edges = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
  return jnp.split(y, edges, axis=-1)


class Embed(nnx.Module):
  """Token embedding table; `attend` reuses it as a tied output head.

  `scale` multiplies looked-up rows (Gemma's sqrt(hidden)), not the table, so a
  tied head still reads the unscaled table. Like Hugging Face it is rounded to the
  table's dtype first (sqrt(2304) becomes 48.0 in bfloat16).
  """

  def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"), dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02, scale: float | None = None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.scale = scale
    self.embedding = param(rngs, nnx.initializers.normal(init_std), (num_embeddings, features), param_dtype, axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # The table whole on every device for the lookup, as FSDP gathers any weight at use: the looked-up rows
    # then come out sharded like the ids (by batch). With the table's features sharded (fsdp), GSPMD would
    # instead reshard the (batch, length, features) result by replicating it.
    table = sharding.constrain(self.embedding[...], (None, None))
    x = jnp.take(table, ids, axis=0)
    if self.scale is not None:
      x = x * jnp.asarray(self.scale, jnp.float32).astype(table.dtype)
    return x.astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits against the table, accumulated in float32."""
    return einsum_f32("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """Llama RMSNorm: normalise in float32, cast back, then scale (the order HF uses)."""

  def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dtype) * x32.astype(dtype)


class GemmaRMSNorm(nnx.Module):
  """Gemma's RMSNorm: the weight is stored as an offset from 1 (zeros at init) and,
  unlike Llama's, applied in float32 before the cast back (HF transformers#29402)."""

  def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32, returned in the input dtype."""

  def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    weight, bias = self.weight[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
    if halved_sums():
      return _layer_norm(x32, weight, bias, self.eps).astype(dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * weight + bias).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, weight, bias, eps):
  """LayerNorm of float32 x with its backward pass written out, every sum as halves (`_row_sum` over the
  features, `token_sum` over the tokens for the weight's and the bias's gradients): the CPU form
  (`halved_sums`). The values and gradients of the plain form, to rounding."""
  return _layer_norm_fwd(x, weight, bias, eps)[0]


def _layer_norm_fwd(x, weight, bias, eps):
  d = x.shape[-1]
  centred = x - _row_sum(x) / d
  rstd = jax.lax.rsqrt(_row_sum(centred * centred) / d + eps)
  y = centred * rstd
  return y * weight + bias, (y, rstd, weight)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  y, rstd, weight = residuals
  d = y.shape[-1]
  gy = g * weight
  dx = rstd * (gy - _row_sum(gy) / d - y * (_row_sum(gy * y) / d))
  return dx, token_sum(g * y), token_sum(g)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def causal_block_edges(length: int, blocks: int) -> list[int]:
  """Where `attention` splits `length` causal queries into about `blocks` blocks: the end of each.

  Ends fall on multiples of 64 when the blocks are long enough (whole GPU matmul tiles); the
  last block ends at `length`.
  """
  align = 64 if length >= 64 * blocks else 1
  ends = {min(length, -(-(length * i // blocks) // align) * align) for i in range(1, blocks + 1)}
  return sorted(e for e in ends if e > 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
              implementation: str = "xla", softcap: float | None = None, causal_blocks: int = 1) -> jax.Array:
  """Grouped-query attention.

  q: (B, T, N, H); k, v: (B, S, K, H) with N a multiple of K; mask: boolean,
  broadcastable to (B, 1, T, S), True where a query may attend. Logits and
  softmax are float32. A query row with no allowed key (padding) returns an
  average of the values instead of NaN; callers never read those rows.
  `softcap` (Gemma2) bounds the scaled logits to (-softcap, softcap) with a tanh
  before masking.

  implementation "xla" is this einsum form (on CPU the softmax's row sums come out of the values
  matmul, a column of ones beside the values: `_late_sum`; vision towers' large attention runs a head at a
  time with its backward pass written out: `_head_by_head`); "cudnn" hands the same computation
  to `jax.nn.dot_product_attention` (fused kernels on GPU, half precision only,
  no soft-capping); "pallas" to `flash.flash_attention`, fused Pallas kernels for
  GPUs that also soft-cap (Gemma2, PaliGemma 2).

  causal_blocks > 1 is the caller's promise that the mask is causal (query i sees
  no key after position i; T == S): XLA attention then takes the queries in that
  many blocks, each against the keys up to its own end only. The skipped logits are
  ones the mask zeroes, so the result is the same; the work is about (n + 1) / 2n
  of the full square (0.625 for 4 blocks), and so is the memory traffic of XLA's
  unfused softmax (PaliGemma 2 3B on an H200: 12.56 -> 13.16 examples/s). cuDNN's
  fused kernel runs the full square faster than blocks of it (SmolVLM: 97.3 vs
  92.3 examples/s), so it ignores causal_blocks; "pallas" takes it as its `causal`
  promise and skips the key blocks after each query block inside its kernels.
  """
  t, s = q.shape[1], k.shape[1]
  if implementation == "pallas":  # the kernels skip the key blocks after each query block themselves
    causal = causal_blocks > 1 and t == s
    return flash.flash_attention(q, k, v, mask, scale, softcap, causal=causal, interpret=_pallas_interpret())
  if causal_blocks > 1 and implementation == "xla" and t == s and t > 1:
    outs, start = [], 0
    for end in causal_block_edges(t, causal_blocks):
      block_mask = None
      if mask is not None:  # (.., T or 1, S): this block's query rows (when it has rows) and keys up to `end`
        block_mask = mask[..., start:end, :end] if mask.shape[-2] != 1 else mask[..., :end]
      outs.append(_attention(q[:, start:end], k[:, :end], v[:, :end], block_mask, scale, implementation, softcap))
      start = end
    return jnp.concatenate(outs, axis=1)
  return _attention(q, k, v, mask, scale, implementation, softcap)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
               implementation: str, softcap: float | None) -> jax.Array:
  if implementation == "cudnn":
    if softcap is not None:
      raise ValueError("attention='cudnn' has no logit soft-capping, which this model (Gemma2) needs; "
                       "use attention='xla'")
    if mask is not None:  # cuDNN takes a mask with every query row, not one broadcast over queries
      mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"attention implementation must be 'xla', 'cudnn' or 'pallas', got {implementation!r}")
  b, t, n, h = q.shape
  kv_heads, s = k.shape[2], k.shape[1]
  groups = n // kv_heads
  # Queries as (B, K, G x T, H), keys and values as (B, K, S, H): both matmuls are plain (B, K)-batched
  # matmuls, and the (B, K, G x T, S) logits come out in the order the softmax and the second matmul read
  # them. With the queries in (B, T, K, G, H) order the matmul writes (B, K, T, G, S), and XLA transposes
  # the largest tensor of the layer (and its gradient) to reorder it. Folding G into T (a reshape of
  # adjacent axes) leaves the data where it was; XLA's CPU backend runs the folded matmuls faster than
  # ones with a separate G axis (BENCHMARKS.md, "XLA attention on the CPU").
  q = q.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * t, h)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, 1) + mask.shape[-2:])  # a mask of keys only stays one row
  late_sum = _late_sum()

  def attend(q, k, v, mask):  # (.., G x T, H), (.., S, H), (.., S, H), mask (.., T or 1, S) or None
    logits = einsum_f32("...th,...sh->...ts", q, k) * scale
    if softcap is not None:
      logits = softcapped(logits, softcap)
    if mask is not None and groups == 1:  # the mask broadcasts against the logits as they are
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    elif mask is not None:  # each query group's rows of the logits against the one mask
      shape = logits.shape
      logits = logits.reshape(shape[:-2] + (groups, t, s))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min).reshape(shape)
    if not late_sum:
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      return jnp.einsum("...ts,...sh->...th", probs, v)
    # exp(logits - max) times [values | 1]: one matmul gives both the weighted values and each row's sum,
    # and the division happens on (T, H + 1) instead of (T, S). Its gradient is the softmax's, as matmuls
    # and elementwise passes with no (T, S) reduction; the max only shifts (no gradient: softmax does not
    # depend on it).
    top = jax.lax.stop_gradient(_row_max(logits))
    weights = jnp.exp(logits - top).astype(v.dtype)
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    out = einsum_f32("...ts,...sh->...th", weights, jnp.concatenate([v, ones], axis=-1))
    return (out[..., :-1] / out[..., -1:]).astype(v.dtype)

  if _map_heads(groups, t, s):
    # One head at a time, in blocks of queries, with the backward pass written out (`_head_by_head`).
    head_mask = None if mask is None else mask[:, 0]  # (B, T or 1, S) against one head's (B, T, S)
    out = _head_by_head(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), head_mask, scale, softcap)
    out = out.swapaxes(0, 1)
  else:
    out = attend(q, k, v, mask if mask is None or groups == 1 else mask[:, :, None])
  return out.reshape(b, kv_heads, groups, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


HEAD_QUERY_BLOCK = 512  # queries a block in `_head_by_head`, about, at most (the blocks split T evenly)
HEAD_BLOCK_ROWS = 1536  # and (tiles x queries) a block, about: more tiles, shorter blocks


def _query_edges(batch: int, t: int) -> list[int]:
  """The query blocks of `_head_by_head` for `batch` examples (tiles) of `t` queries: blocks of about
  HEAD_QUERY_BLOCK queries, shorter where the batch would make a block's logits more than about
  HEAD_BLOCK_ROWS rows. SigLIP at 512 px, forward and backward (`bench/cpu_ops.py --vision B,1024,12,64
  --vision-mask none --only vision`): 1 tile 15% faster in 2 blocks than in the 4 of 256 queries before, 3
  tiles (smolvlm_256m's CPU rows) level in 2, 6 tiles kept at 4 (BENCHMARKS.md, "Vision attention in
  blocks of 512 queries")."""
  n = max(1, round(t / HEAD_QUERY_BLOCK), round(batch * t / HEAD_BLOCK_ROWS))
  return [t * i // n for i in range(n + 1)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_by_head(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                  softcap: float | None) -> jax.Array:
  """Attention without grouped queries, one head at a time (a `lax.map`), each head's queries in blocks of
  about HEAD_QUERY_BLOCK (`_query_edges`): the CPU form of large vision-tower attention (`_map_heads`).

  q: (N, B, T, H); k, v: (N, B, S, H); mask: (B, T or 1, S) or None. The result is `attend`'s (the
  softmax over float32 logits, an average of the values for a query row with no key). XLA:CPU writes each
  op's whole output before the next reads it, so a head's (B, T, S) logits make every softmax pass a trip
  to memory (SigLIP at 512 px: 12 MB a head for 3 tiles); a block of queries keeps them a fraction of that.
  The backward pass is flash attention's: it recomputes a block's probabilities from the logits and the
  forward's row maxima and sums (nothing (T, S) is stored), then one matmul each for the values', the
  probabilities', the queries' and the keys' gradients. Autodiff of the forward would run its values
  matmul and row maxima again and transpose the probabilities for two of its gradient matmuls; the
  backward here computes the logits keys-first, (B, S, T), so that only the queries' gradient reads a
  transposed operand (BENCHMARKS.md, "Vision attention with its backward pass written out").
  """
  return _head_by_head_fwd(q, k, v, mask, scale, softcap)[0]


def _head_logits(q, k, mask, scale, softcap, keys_first=False):
  """One head's float32 logits for a block of queries, scaled, soft-capped and masked: (B, T, S), or with
  keys_first (B, S, T). Also the soft-capped logits before the mask (None without soft-cap)."""
  q = q * jnp.asarray(scale, q.dtype)  # scaled before the matmul: a (T, S) product would be one more pass
  spec, operands = ("bsh,bth->bst", (k, q)) if keys_first else ("bth,bsh->bts", (q, k))
  logits = jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)
  capped = None
  if softcap is not None:
    logits = capped = softcapped(logits, softcap)
  if mask is not None:
    logits = jnp.where(mask.swapaxes(-1, -2) if keys_first else mask, logits, jnp.finfo(jnp.float32).min)
  return logits, capped


def _block_mask(mask, start, end):
  return mask if mask is None or mask.shape[-2] == 1 else mask[:, start:end]


def _head_forward(q, k, v, mask, scale, softcap):
  """One head: the output (B, T, H) and each query's row maximum and row sum of exp(logits - max), (B, T, 1)."""
  values = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)  # [values | 1], as `attend`
  outs, tops, sums = [], [], []
  edges = _query_edges(*q.shape[:2])
  for start, end in zip(edges[:-1], edges[1:]):
    logits, _ = _head_logits(q[:, start:end], k, _block_mask(mask, start, end), scale, softcap)
    top = _row_max(logits)
    out = jnp.einsum("bts,bsh->bth", jnp.exp(logits - top).astype(v.dtype), values,
                     preferred_element_type=jnp.float32)
    outs.append((out[..., :-1] / out[..., -1:]).astype(v.dtype))
    tops.append(top)
    sums.append(out[..., -1:])
  return tuple(jnp.concatenate(x, axis=1) for x in (outs, tops, sums))


def _head_backward(q, k, v, mask, out, top, total, dout, scale, softcap):
  """One head's (dq as (B, H, T), dk, dv) from its inputs, output, row maxima and sums, and the output's
  cotangent."""
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  edges = _query_edges(*q.shape[:2])
  for start, end in zip(edges[:-1], edges[1:]):
    qb, dob = q[:, start:end], dout[:, start:end]
    block_mask = _block_mask(mask, start, end)
    logits, capped = _head_logits(qb, k, block_mask, scale, softcap, keys_first=True)  # (B, S, Tb)
    rows = lambda x: x[:, start:end].swapaxes(1, 2)  # (B, Tb, 1) -> (B, 1, Tb)
    probs = jnp.exp(logits - rows(top)) / rows(total)
    dv = dv + jnp.einsum("bst,bth->bsh", probs.astype(v.dtype), dob, preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("bsh,bth->bst", v, dob, preferred_element_type=jnp.float32)
    # The softmax's gradient: probs * (dprobs - sum over keys of probs * dprobs), that sum being out . dout.
    rowdot = jnp.sum(out[:, start:end].astype(jnp.float32) * dob.astype(jnp.float32), axis=-1)[:, None, :]
    dlogits = probs * (dprobs - rowdot)
    if softcap is not None:
      dlogits = dlogits * (1.0 - jnp.square(capped / softcap))
    if block_mask is not None:  # masked logits get no gradient (a query row with no key has probs 1 / S)
      dlogits = jnp.where(block_mask.swapaxes(-1, -2), dlogits, 0.0)
    dlogits = dlogits.astype(q.dtype)
    # dq as (B, H, Tb): XLA:CPU runs the (B, Tb, H) form, whose operands both contract their middle axis, as
    # a plain dot at half the speed. It stays (B, H, T) to the map's (N, B, H, T) result, whose transpose
    # back joins the one to (B, T, N, H) after it: one copy, not also a transpose a block (`bench/cpu_ops.py
    # --vision 3,1024,12,64 --vision-mask none --only "vision attention"`, five pairs: 223-235 -> 215-226 ms).
    dq.append(jnp.einsum("bst,bsh->bht", dlogits, k, preferred_element_type=jnp.float32) * scale)
    dk = dk + jnp.einsum("bst,bth->bsh", dlogits, qb * jnp.asarray(scale, q.dtype),
                         preferred_element_type=jnp.float32)
  return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _head_by_head_fwd(q, k, v, mask, scale, softcap):
  out, top, total = jax.lax.map(lambda qkv: _head_forward(*qkv, mask, scale, softcap), (q, k, v))
  return out, (q, k, v, mask, out, top, total)


def _head_by_head_bwd(scale, softcap, residuals, dout):
  q, k, v, mask, out, top, total = residuals
  dq, dk, dv = jax.lax.map(lambda x: _head_backward(*x[:3], mask, *x[3:], scale, softcap),
                           (q, k, v, out, top, total, dout))
  return dq.swapaxes(-1, -2), dk, dv, None


_head_by_head.defvjp(_head_by_head_fwd, _head_by_head_bwd)


MAP_HEADS_MIN_LOGITS = 512 * 512


def _map_heads(groups: int, queries: int, keys: int) -> bool:
  """Whether XLA attention maps over KV heads: on CPU, for attention without grouped queries (each query
  head its own KV head, as vision towers have) of at least 512 x 512 logits a head, where the map measured
  faster (`bench/cpu_ops.py --vision`: SigLIP's 576-1024 patches); grouped-query decoders and smaller
  attention ran slower mapped. Never under a mesh that shards heads (tensor parallelism), where the map
  would walk a sharded axis."""
  if groups != 1 or queries * keys < MAP_HEADS_MIN_LOGITS or jax.default_backend() != "cpu":
    return False
  return not _tensor_parallel()


def _tensor_parallel() -> bool:
  """Whether the current mesh shards heads (a "tensor" axis of more than one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1


def _flat_matmuls() -> bool:
  """Whether Linear flattens its input's leading axes into one before the matmul: on CPU, where XLA runs
  the (B, T, D) x (D, F) form, and above all its weight gradient (a contraction over B and T), slower
  than the same matmuls on (B x T, D) (smolvlm_256m's step 15.6 -> 14.6 s: BENCHMARKS.md, "Linear layers
  on flattened tokens"). GPUs canonicalise both to one GEMM; their timings were measured with the
  unflattened form, which they keep."""
  return jax.default_backend() == "cpu"


def _row_max(x: jax.Array) -> jax.Array:
  """max over the last axis (kept, size 1), as elementwise maxima of its two halves until at most 16
  remain: the softmax's row maxima in the CPU attention paths (`attend` under `_late_sum`, `_head_forward`).

  XLA:CPU splits a reduction over a long minor axis into windowed reductions of 32 (its tree reduction
  rewriter) and runs those at a fraction of memory speed; the halves are one elementwise fusion. The same
  values (max is exact in any order); the demo's step 129.5 / 133.2 -> 125.7 / 126.8 ms (BENCHMARKS.md,
  "The softmax's row maxima on the CPU")."""
  return jnp.max(fold_halves(x, -1, 16, jnp.maximum), axis=-1, keepdims=True)


def _late_sum() -> bool:
  """Whether XLA attention sums each softmax row in the values matmul (`attend`): on CPU, where XLA runs
  the (T, S) row sums (forward and backward) as slow windowed reductions and the division as another
  pass, and the extra matmul column costs less (`bench/cpu_ops.py`: BENCHMARKS.md). GPUs keep the
  softmax form their H200 timings were measured with."""
  return jax.default_backend() == "cpu"


@functools.cache
def _pallas_interpret() -> bool:
  """attention="pallas" compiles its kernels for GPUs; on CPU it runs them in Pallas's interpreter."""
  backend = jax.default_backend()
  if backend == "gpu":
    return False
  if backend != "cpu":
    raise ValueError(f"attention='pallas' is a GPU kernel (Triton); on {backend} use attention='xla'")
  logging.warning("attention='pallas' on CPU runs its GPU kernels in Pallas's interpreter: exact, and far slower "
                  "than attention='xla' (meant for tests)")
  return True


def segment_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, 1, T, T) boolean from a (B, T) attention mask: which keys each query may read (before the causal
  or prefix structure). 0 is padding. With 0/1 values every query may read every real key (as Hugging
  Face's masks); with segment ids 1, 2, .. (several prompts packed in a row) a real query reads the keys
  of its own segment only. A padding query reads every real key, as unpacked, so its row stays finite."""
  seg = attention_mask.astype(jnp.int32)
  same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
  return (same & (seg[:, None, :] > 0))[:, None]


def softcapped(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap), in float32: a smooth clip of logits to (-cap, cap)."""
  return jnp.tanh(x.astype(jnp.float32) / cap) * cap


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout Llama checkpoints use. x: (B, T, N, H)."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(emb)[:, :, None, :].astype(x.dtype)
  return _rotary(x, cos, sin)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@jax.custom_vjp
def _rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  return x * cos + _rotate_half(x) * sin


def _rotary_fwd(x, cos, sin):
  return _rotary(x, cos, sin), (cos, sin)


def _rotary_bwd(res, g):
  # The rotation's transpose is the rotation by -angle (cos and sin repeat across the two halves, so
  # rotate_half commutes with them): one fused pass like the forward, where differentiating the slices and
  # the concatenation gives a pad and an add per half. cos and sin come from integer positions: no gradient.
  cos, sin = res
  return _rotary(g, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rotary.defvjp(_rotary_fwd, _rotary_bwd)
