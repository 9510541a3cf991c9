"""The fused Pallas attention (pixrec_jax.models.flash) against the einsum attention it replaces.

On CPU the kernels run in Pallas's interpreter, which executes the kernel bodies as
written (block loads, the running max and sum, the recomputed backward); the GPU
build of the same kernels is checked by lowering them to Triton for CUDA here, and
timed by bench/gpu_suite.sh where a GPU is at hand.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixrec_jax.models import flash, layers
from pixrec_jax.models.config import Runtime


def _inputs(rng, b, t, s, n, kv, h, dtype):
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
  return q, k, v


def _mask(kind, b, t, s):
  if kind == "none":
    return None
  lengths = np.asarray([s, s * 2 // 3, s // 2][:b])
  mask = np.tril(np.ones((t, s), bool))[None, None] & (np.arange(s) < lengths[:, None, None, None])
  if kind == "prefix":  # PaliGemma's bidirectional prefix over the first 10 tokens
    mask |= ((np.arange(t)[:, None] < 10) & (np.arange(s)[None, :] < 10))[None, None]
  if kind == "window":  # a sliding window of 8, shared by the batch
    mask = mask[:1] & (np.arange(s)[None, :] > np.arange(t)[:, None] - 8)[None, None]
  return jnp.asarray(mask)


def _compare(q, k, v, mask, softcap, tol, causal=False, ref_mask=None):
  b, t = q.shape[:2]
  scale = q.shape[-1]**-0.5
  ref_mask = mask if ref_mask is None else ref_mask
  ref = lambda q, k, v: layers.attention(q, k, v, ref_mask, scale, softcap=softcap)
  ours = lambda q, k, v: flash.flash_attention(q, k, v, mask, scale, softcap, causal=causal)
  rows = np.ones((b, t), bool)
  if ref_mask is not None:  # query rows with an allowed key; the others are never read
    rows = np.asarray(jnp.broadcast_to(ref_mask, (b, 1, t, ref_mask.shape[-1])).any(-1))[:, 0]
  dout = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), q.dtype) * rows[:, :, None, None]
  out_ref, vjp_ref = jax.vjp(ref, q, k, v)
  out, vjp = jax.vjp(ours, q, k, v)
  f32 = lambda x: np.asarray(x, np.float32)
  assert np.isfinite(f32(out)).all()
  np.testing.assert_allclose(f32(out)[rows], f32(out_ref)[rows], atol=tol, rtol=tol, err_msg="output")
  for name, got, want in zip(("dq", "dk", "dv"), vjp(dout), vjp_ref(dout)):
    np.testing.assert_allclose(f32(got), f32(want), atol=tol * np.abs(f32(want)).max(), err_msg=name)


@pytest.mark.parametrize("mask_kind,softcap,shape", [
    ("causal_padding", None, (2, 40, 40, 4, 2, 24)),  # GQA; head dim 24 padded to 32, 40 tokens to a 64 block
    ("prefix", 2.0, (2, 40, 40, 4, 2, 24)),  # a small cap, so tanh bends the logits and its derivative matters
    ("window", 2.0, (3, 72, 72, 2, 1, 16)),  # several key blocks, a mask broadcast over the batch, MQA
    ("none", None, (2, 20, 70, 4, 4, 32)),  # cross-shaped: queries and keys of different lengths, no mask
])
def test_flash_matches_einsum_attention(mask_kind, softcap, shape):
  b, t, s, n, kv, h = shape
  q, k, v = _inputs(np.random.default_rng(0), b, t, s, n, kv, h, jnp.float32)
  _compare(q, k, v, _mask(mask_kind, b, t, s), softcap, 1e-5)


@pytest.mark.parametrize("mask_kind", ["causal_padding", "window", "none"])
def test_causal_flash_skips_only_masked_blocks(mask_kind):
  """causal=True: each query block reads key blocks up to its own end (3 blocks of 64 here, the last
  partly padding) and masks by position, so even without a mask it equals causal attention."""
  b, t, n, kv, h = 3, 150, 2, 1, 16
  q, k, v = _inputs(np.random.default_rng(5), b, t, t, n, kv, h, jnp.float32)
  mask = _mask(mask_kind, b, t, t)
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  _compare(q, k, v, mask, 3.0, 1e-5, causal=True, ref_mask=causal if mask is None else mask)


def test_unequal_tiles_keep_causal_skipping_exact():
  """Query and key tiles of different sizes (as a block-size sweep tries): the causal loop bounds and the
  first query tile of each key tile still cover every allowed pair."""
  b, t = 2, 100
  q, k, v = _inputs(np.random.default_rng(7), b, t, t, 2, 1, 16, jnp.float32)
  mask = _mask("causal_padding", b, t, t)
  scale = 0.25
  want_out, want_vjp = jax.vjp(lambda q, k, v: layers.attention(q, k, v, mask, scale, softcap=4.0), q, k, v)
  dout = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape), jnp.float32)
  for block_q, block_k in ((16, 32), (32, 16)):
    out, vjp = jax.vjp(lambda q, k, v, bq=block_q, bk=block_k: flash.flash_attention(
        q, k, v, mask, scale, 4.0, causal=True, block_q=bq, block_k=bk), q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5, err_msg=f"{block_q}x{block_k}")
    for name, got, want in zip(("dq", "dk", "dv"), vjp(dout), want_vjp(dout)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=f"{name} {block_q}x{block_k}")


def test_causal_needs_square_attention():
  q, k, v = _inputs(np.random.default_rng(6), 1, 8, 16, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="causal needs as many queries as keys, got 8 and 16"):
    flash.flash_attention(q, k, v, None, 0.25, causal=True)


def test_flash_bfloat16_matches_einsum_attention():
  q, k, v = _inputs(np.random.default_rng(2), 2, 40, 40, 4, 2, 32, jnp.bfloat16)
  _compare(q, k, v, _mask("causal_padding", 2, 40, 40), 2.0, 3e-2)


def test_rows_without_keys_stay_finite():
  q, k, v = _inputs(np.random.default_rng(3), 1, 16, 16, 2, 2, 16, jnp.float32)
  mask = jnp.zeros((1, 1, 16, 16), bool).at[..., 4:, :4].set(True)  # the first 4 queries see nothing
  out, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(q, k, v, mask, 0.25, 5.0), q, k, v)
  grads = vjp(jnp.ones_like(out).at[:, :4].set(0))
  assert all(np.isfinite(np.asarray(x)).all() for x in (out,) + grads)
  want = layers.attention(q, k, v, mask, 0.25, softcap=5.0)
  np.testing.assert_allclose(np.asarray(out[:, 4:]), np.asarray(want[:, 4:]), atol=1e-5)


def test_bad_shapes_and_names_are_refused():
  with pytest.raises(ValueError, match=r"model.attention must be one of \('xla', 'cudnn', 'pallas'\), got 'flash'"):
    Runtime(attention="flash")
  q, k, v = _inputs(np.random.default_rng(4), 1, 8, 8, 3, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
    flash.flash_attention(q, k, v, None, 0.25)
  q, k, v = _inputs(np.random.default_rng(4), 1, 8, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"mask must be \(B or 1, 1, T or 1, S\)"):
    flash.flash_attention(q, k, v, jnp.ones((1, 8, 8), bool), 0.25)
  with pytest.raises(ValueError, match="block_k=48 must be a power of 2, at least 16"):
    flash.flash_attention(q, k, v, None, 0.25, block_k=48)


@pytest.mark.parametrize("head_dim,kv_heads,causal", [(256, 4, True), (64, 3, False)])  # PaliGemma 2's; SmolVLM's
def test_kernels_lower_to_triton_for_cuda(head_dim, kv_heads, causal):
  """The forward and both backward kernels lower through Pallas's Triton path (compiling the Triton IR
  to GPU code needs a GPU; this catches what Pallas refuses before that)."""
  q = jax.ShapeDtypeStruct((2, 200, kv_heads * 2, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 200, kv_heads, head_dim), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 1, 200, 200), jnp.bool_)

  def loss(q, k, v, mask):
    out = flash.flash_attention(q, k, v, mask, head_dim**-0.5, 50.0, causal=causal, interpret=False)
    return jnp.sum(out.astype(jnp.float32)**2)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, mask).lower(lowering_platforms=("cuda",))
  calls = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", lowered.as_text())
  assert len(calls) == 3, f"expected the forward, dK/dV and dQ Triton kernels, found {len(calls)}"
