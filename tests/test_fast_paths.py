"""The train step's fast paths stay taken: the GPU speed in BENCHMARKS.md depends on them, and a change that
falls off one keeps every output equal, so only these checks would notice."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixrec_jax.models import layers, siglip
from pixrec_jax.models.config import Runtime, VisionConfig


def test_full_size_tiles_reach_attention_with_no_mask(monkeypatch):
  """cuDNN runs its unmasked kernel only when no mask is passed; an all-True mask took the masked one."""
  cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                     patch_size=4)
  graphdef, state = nnx.split(siglip.VisionTransformer(cfg, Runtime(), nnx.Rngs(0)))
  tower = jax.jit(lambda state, pixels, patch_mask: nnx.merge(graphdef, state)(pixels, patch_mask))
  masks = []  # what each traced call hands to attention
  real = layers.attention
  monkeypatch.setattr(layers, "attention", lambda q, k, v, mask, *a, **kw: masks.append(mask) or real(q, k, v, mask,
                                                                                                          *a, **kw))
  pixels = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  full = tower(state, pixels, None)
  assert masks == [None]
  # The same features as the masked path with every patch real (raster positions, nothing masked).
  masked = tower(state, pixels, jnp.ones((3, 4, 4), bool))
  assert masks[-1] is not None
  np.testing.assert_allclose(np.asarray(full), np.asarray(masked), rtol=1e-6, atol=1e-6)
  # A smaller image (NaViT positions) still takes the masked path.
  tower(state, pixels[:, :, :8, :8], None)
  assert len(masks) == 3 and masks[-1] is not None


def test_xla_attention_never_transposes_its_logits():
  """The (B, K, G x T, S) logits leave the matmul in the order the softmax reads them, forward and backward."""
  b, t, s, n, kv, h = 2, 24, 40, 4, 2, 8
  q = jax.random.normal(jax.random.key(0), (b, t, n, h))
  k = jax.random.normal(jax.random.key(1), (b, s, kv, h))
  v = jax.random.normal(jax.random.key(2), (b, s, kv, h))
  mask = jax.random.bernoulli(jax.random.key(3), 0.8, (b, 1, t, s))

  def loss(q, k, v):
    return jnp.sum(layers.attention(q, k, v, mask, 0.3, softcap=5.0) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  big = [e for e in jaxpr.eqns if e.primitive.name == "transpose" and  # logit-sized: b x n x t x s
         max(int(np.prod(x.aval.shape)) for x in e.invars) >= b * n * t * s]
  assert not big, [str(e) for e in big]


def _causal_inputs(b=2, t=37, n=4, kv=2, h=8):
  q = jax.random.normal(jax.random.key(0), (b, t, n, h))
  k = jax.random.normal(jax.random.key(1), (b, t, kv, h))
  v = jax.random.normal(jax.random.key(2), (b, t, kv, h))
  valid = jnp.arange(t)[None, :] < jnp.asarray([t, t - 9])[:, None]  # the second example's last 9 keys padded
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]
  return q, k, v, mask


def test_causal_blocks_give_the_same_attention_and_gradients():
  q, k, v, mask = _causal_inputs()

  def loss(q, k, v, blocks):
    out = layers.attention(q, k, v, mask, 0.3, softcap=5.0, causal_blocks=blocks)
    return jnp.sum(out * jnp.cos(out)), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, ref), ref_grads = grad(q, k, v, 1)
  for blocks in (2, 5):
    (_, got), grads = grad(q, k, v, blocks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
  # A mask broadcast over the batch slices the same way.
  causal = jnp.tril(jnp.ones((37, 37), bool))[None, None]
  blocked = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal, 0.3, causal_blocks=4))(q, k, v)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(jax.jit(layers.attention, static_argnums=4)(
      q, k, v, causal, 0.3)), rtol=1e-5, atol=1e-6)


def test_causal_blocks_skip_the_masked_logits():
  """4 blocks compute 10/16 of the (T, S) logits square (1 + 2 + 3 + 4 sixteenths), forward and backward."""
  q, k, v, mask = _causal_inputs(t=512)

  def logits_elements(blocks):
    grad = jax.grad(lambda q: jnp.sum(layers.attention(q, k, v, mask, 0.3, causal_blocks=blocks)))
    jaxpr = jax.make_jaxpr(grad)(q)
    h = q.shape[-1]  # the other matmuls have the head size (H + 1 where the values carry a ones column) as an axis
    return sum(int(np.prod(e.outvars[0].aval.shape)) for e in jaxpr.eqns  # the logits and their gradient
               if e.primitive.name == "dot_general" and min(e.outvars[0].aval.shape[-2:]) > h + 1)

  assert layers.causal_block_edges(512, 4) == [128, 256, 384, 512]
  assert logits_elements(4) == logits_elements(1) * 10 // 16


def test_vision_query_blocks_shrink_with_more_tiles():
  """Blocks of about 512 queries, shorter where the tiles would make a block more than about 1536 rows
  (tiles x queries); the blocks split the queries evenly and cover them all."""
  assert layers._query_edges(1, 1024) == [0, 512, 1024]
  assert layers._query_edges(3, 1024) == [0, 512, 1024]  # smolvlm_256m's CPU rows: 3 tiles at 512 px
  assert layers._query_edges(6, 1024) == [0, 256, 512, 768, 1024]
  assert layers._query_edges(2, 100) == [0, 100]
  for batch, t in ((1, 729), (4, 1024), (16, 576)):
    edges = layers._query_edges(batch, t)
    assert edges[0] == 0 and edges[-1] == t and all(0 < b - a < 768 for a, b in zip(edges, edges[1:]))


def test_cpu_attention_maps_over_heads_for_large_vision_logits(monkeypatch):
  """Without grouped queries and with at least 512 x 512 logits a head, CPU attention maps over the heads
  in blocks of queries with its backward pass written out (layers._head_by_head); outputs and gradients
  equal autodiff's of the unmapped form, with padded keys, a mask broadcast over queries or a full one, an
  example with no key at all (its rows the values' average), and the soft-cap."""
  b, t, n, h = 2, 512, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (b, t, n, h)) for i in range(3))
  keys = jnp.arange(t)[None, :] < jnp.asarray([t, t - 100])[:, None]
  masks = {"keys": keys[:, None, None, :], "full": jax.random.bernoulli(jax.random.key(4), 0.7, (b, 1, t, t)) |
           jnp.eye(t, dtype=bool)[None, None], "none": None,
           "no key": (keys & jnp.asarray([[True], [False]]))[:, None, None, :]}
  monkeypatch.setattr(layers, "HEAD_QUERY_BLOCK", 256)
  assert layers._query_edges(b, t) == [0, 256, 512]  # two blocks of queries

  def loss(q, k, v, mask, softcap):
    out = layers.attention(q, k, v, mask, 0.3, softcap=softcap)
    return jnp.sum(out * jnp.cos(out)), out

  # A fresh jit per setting: a jitted function's cached trace would keep the first one's form.
  fresh = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=4)
  assert layers._map_heads(1, t, t)
  assert "scan" in str(jax.make_jaxpr(fresh(), static_argnums=4)(q, k, v, masks["keys"], None))
  grad = fresh()
  results = {}
  for name, mask in masks.items():
    for softcap in (None, 5.0):
      results[name, softcap] = grad(q, k, v, mask, softcap)
  # bfloat16 inputs: gradients in bfloat16, near the float32 ones, and no matmul mixes the two dtypes.
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  hlo = fresh().lower(*half, masks["keys"], None).as_text()
  operand_dtypes = re.findall(r"stablehlo.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", hlo)
  assert len(operand_dtypes) >= 7 and all(a == b == "bf16" for a, b in operand_dtypes), operand_dtypes
  (_, _), half_grads = fresh()(*half, masks["keys"], None)
  for g, w in zip(half_grads, results["keys", None][1]):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.05 * float(jnp.max(jnp.abs(w))))
  monkeypatch.setattr(layers, "MAP_HEADS_MIN_LOGITS", t * t + 1)
  assert not layers._map_heads(1, t, t)
  assert "scan" not in str(jax.make_jaxpr(fresh(), static_argnums=4)(q, k, v, masks["keys"], None))
  grad = fresh()
  for (name, softcap), ((_, got), got_grads) in results.items():
    (_, want), want_grads = grad(q, k, v, masks[name], softcap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)


def test_decoders_block_only_causal_attention(monkeypatch):
  """Llama and Gemma2 hand their causal blocks to attention, not with a bidirectional prefix or a cache,
  and the hidden states do not change."""
  from pixrec_jax.models import gemma2, llama  # pylint: disable=import-outside-toplevel
  from pixrec_jax.models.config import TextConfig  # pylint: disable=import-outside-toplevel
  seen = []
  real = layers.attention
  monkeypatch.setattr(layers, "attention", lambda *a, **kw: seen.append(a[7] if len(a) > 7 else 1) or real(*a, **kw))
  sizes = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8)
  forward = nnx.jit(lambda model, x, mask, **kw: model(x, mask, **kw))
  x = jax.random.normal(jax.random.key(0), (2, 20, 32))
  mask = jnp.ones((2, 20), jnp.int32).at[1, 15:].set(0)
  for cls, cfg in ((llama.LlamaModel, TextConfig(**sizes)),
                   (gemma2.Gemma2Model, TextConfig(**sizes, model_type="gemma2", attn_logit_softcapping=50.0,
                                                   final_logit_softcapping=30.0, sliding_window=8,
                                                   query_pre_attn_scalar=8, hidden_act="gelu_pytorch_tanh"))):
    for scan_layers in (False, True):
      plain = cls(cfg, Runtime(scan_layers=scan_layers), nnx.Rngs(0))
      blocked = cls(cfg, Runtime(scan_layers=scan_layers, causal_blocks=4), nnx.Rngs(0))
      seen.clear()
      want = forward(plain, x, mask)
      got = forward(blocked, x, mask)
      half = len(seen) // 2  # the plain model's traced calls, then the blocked one's
      assert half and seen == [1] * half + [4] * half, seen
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if cls is gemma2.Gemma2Model:  # PaliGemma's bidirectional prefix: never blocked
      seen.clear()
      forward(blocked, x, mask, token_type_ids=jnp.zeros((2, 20), jnp.int32).at[:, 10:].set(1))
      assert seen and set(seen) == {1}, seen
  seen.clear()
  cache = blocked.init_cache(2, 24)
  forward(blocked, x, jnp.ones((2, 24), jnp.int32), cache=cache)
  assert seen and set(seen) == {1}, seen


def _largest_fusion(layers_count: int, monkeypatch, barrier: bool = True) -> int:
  """Lines in the largest fused computation of a tiny SigLIP tower's compiled gradient."""
  import re  # pylint: disable=import-outside-toplevel
  from pixrec_jax import xla_options  # pylint: disable=import-outside-toplevel
  cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers_count, num_attention_heads=2,
                     image_size=32, patch_size=8)
  graphdef, state = nnx.split(siglip.VisionTransformer(cfg, Runtime(), nnx.Rngs(0)))
  loss = lambda state, pixels: jnp.sum(nnx.merge(graphdef, state)(pixels, None) ** 2)
  with monkeypatch.context() as patch:
    if not barrier:
      patch.setattr(layers, "residual_barrier", lambda x: x)
    text = jax.jit(jax.grad(loss), compiler_options=xla_options.compiler_options()).lower(
        state, jnp.ones((2, 3, 32, 32))).compile().as_text()
  return max(len(body.splitlines()) for body in re.findall(r"\n%fused_computation\S* .*?\{\n(.*?)\n\}", text, re.S))


@pytest.mark.parametrize("halves", [True, False])
def test_vision_residual_gradients_are_written_once_a_layer_on_cpu(monkeypatch, halves):
  """Without layers.residual_barrier XLA:CPU fuses the residual-gradient chain of every layer above into each
  layer's fusions (the largest fusion grows with depth) where LayerNorm's backward is autodiff's (the plain
  sums of a mesh: `layers.halved_sums` False); with it the largest fusion is the same at any depth, with
  either LayerNorm."""
  monkeypatch.setattr(layers, "halved_sums", lambda: halves)
  assert _largest_fusion(8, monkeypatch) == _largest_fusion(2, monkeypatch)
  if not halves:
    assert _largest_fusion(8, monkeypatch, barrier=False) > 2 * _largest_fusion(2, monkeypatch, barrier=False)


def test_residual_barrier_is_the_identity_forward_and_backward():
  x = jnp.asarray([[1.0, -2.0], [3.0, 0.5]])
  f = lambda x, barrier: jnp.sum(jnp.sin(barrier(x) * x) ** 2)
  got = jax.jit(jax.value_and_grad(lambda x: f(x, layers.residual_barrier)))(x)
  want = jax.value_and_grad(lambda x: f(x, lambda y: y))(x)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  nan_first = jax.grad(lambda x: jnp.sum(layers.residual_barrier(x) * jnp.asarray([[jnp.nan, 1.0], [1.0, 1.0]])))(x)
  assert np.isnan(nan_first[0, 0]) and np.all(np.asarray(nan_first).ravel()[1:] == 1.0)


@pytest.mark.parametrize("n,kv,softcap", [(4, 2, None), (2, 2, 5.0)])
def test_late_sum_is_the_softmax(monkeypatch, n, kv, softcap):
  """On CPU the values matmul also sums each row of exp(logits - max) (layers._late_sum); outputs and
  gradients are the softmax form's (the one GPUs run), padded query rows (no key) included."""
  q, k, v, mask = _causal_inputs(n=n, kv=kv)
  mask = mask.at[1, :, -3:].set(False)  # three query rows of the second example see no key at all

  results = {}
  for late in (True, False):
    monkeypatch.setattr(layers, "_late_sum", lambda late=late: late)

    def loss(q, k, v):  # a fresh function per setting: traces are cached by function
      out = layers.attention(q, k, v, mask, 0.3, softcap=softcap)
      return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    # The values with their column of ones: head size 8 + 1.
    assert bool(re.search(r"f32\[[\d,]+,9\]", str(jax.make_jaxpr(loss)(q, k, v)))) == late
    results[late] = (out, grads)
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[True][0][1, -3:], jnp.broadcast_to(
      jnp.repeat(v[1].mean(axis=0), n // kv, axis=0), results[True][0][1, -3:].shape), rtol=1e-5, atol=1e-6)
  for a, b in zip(results[True][1], results[False][1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rope_gradient_is_the_inverse_rotation():
  """apply_rope's custom VJP (the rotation by -angle, one pass) gives autodiff's gradient of the plain form."""
  b, t, n, h = 2, 7, 3, 8
  x = jax.random.normal(jax.random.key(0), (b, t, n, h))
  co = jax.random.normal(jax.random.key(1), (b, t, n, h))
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]])  # packed segments restart at 0
  inv_freq = layers.rope_inv_freq(h, 10000.0)

  def plain(x):
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None]
    rotated = jnp.concatenate([-x[..., h // 2:], x[..., :h // 2]], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)

  out, vjp = jax.vjp(lambda x: layers.apply_rope(x, positions, inv_freq), x)
  want_out, want_vjp = jax.vjp(plain, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(vjp(co)[0]), np.asarray(want_vjp(co)[0]), rtol=1e-5, atol=1e-5)
  # The backward is one elementwise pass: no pad of the halves (autodiff's transpose of the concatenation).
  grad_hlo = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(co * f(x)))).lower(x).as_text()
  assert "stablehlo.pad" in grad_hlo(plain)
  assert "stablehlo.pad" not in grad_hlo(lambda x: layers.apply_rope(x, positions, inv_freq))


def test_linear_runs_flattened_tokens_on_cpu():
  """On CPU, Linear's matmuls see (B x T, D): no matmul of its forward or backward contracts two axes (the
  weight gradient over B and T runs slower there: BENCHMARKS.md); the outputs are the unflattened form's."""
  lin = layers.Linear(8, 6, axes=(None, None), use_bias=True, rngs=nnx.Rngs(0))
  lin.bias[...] = jnp.arange(6.0)
  x = jax.random.normal(jax.random.key(2), (3, 5, 8))
  want = jnp.einsum("btd,df->btf", x, lin.kernel[...]) + lin.bias[...]
  np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(want), rtol=1e-6, atol=1e-6)
  graphdef, state = nnx.split(lin)
  grad = jax.jit(jax.grad(lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x)**2), argnums=(0, 1)))
  hlo = grad.lower(state, x).as_text()
  contracting = re.findall(r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]", hlo)
  assert len(contracting) == 3, hlo  # forward, input gradient, weight gradient
  assert all("," not in lhs and "," not in rhs for lhs, rhs in contracting), contracting


@pytest.mark.parametrize("shape", [(3, 256, 1024), (2, 5, 184), (4, 7, 33), (2, 3, 16)])
def test_row_max_is_the_max_without_windowed_reductions(shape):
  """layers._row_max (the CPU attention's softmax maxima) equals jnp.max over the last axis, masked rows of
  the float32 minimum included, and compiles with XLA's own CPU options to no windowed reduction, which
  XLA:CPU turns a long minor-axis max into (and runs at a fraction of memory speed)."""
  from pixrec_jax import xla_options
  x = jax.random.normal(jax.random.key(0), shape) * 5.0
  x = x.at[0, 1].set(jnp.finfo(jnp.float32).min)  # a row with no allowed key, as `attend` masks it
  np.testing.assert_array_equal(layers._row_max(x), jnp.max(x, axis=-1, keepdims=True))
  compiled = jax.jit(layers._row_max, compiler_options=xla_options.compiler_options("cpu")).lower(x).compile()
  if shape[-1] % 32 == 0 and jax.default_backend() == "cpu":
    assert "reduce-window(" not in compiled.as_text()
    reference = jax.jit(lambda x: jnp.max(x, axis=-1), compiler_options=xla_options.compiler_options("cpu"))
    assert "reduce-window(" in reference.lower(x).compile().as_text()  # what the halving avoids


def test_projections_side_by_side_are_the_separate_ones(monkeypatch):
  """On CPU, Llama's q/k/v and gate/up projections and SigLIP's q/k/v run as one matmul each against their
  kernels side by side (layers.side_by_side); outputs and every parameter's gradient are the separate
  matmuls'. A LoRA adapter, which adds its own update to one projection, keeps them separate."""
  from pixrec_jax.models import lora, llama  # pylint: disable=import-outside-toplevel
  from pixrec_jax.models.config import TextConfig  # pylint: disable=import-outside-toplevel
  text = llama.LlamaModel(TextConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8), Runtime(),
                          nnx.Rngs(0))
  vision = siglip.VisionTransformer(VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=8),
                                    Runtime(), nnx.Rngs(1))
  cases = ((text, (jax.random.normal(jax.random.key(0), (2, 9, 32)), jnp.ones((2, 9), jnp.int32))),
           (vision, (jax.random.normal(jax.random.key(1), (3, 3, 16, 16)),)))

  def run(model, args):
    graph, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graph, p)(*args)))
    widths = sorted(e.outvars[0].aval.shape[-1] for e in jax.make_jaxpr(loss)(params).eqns
                    if e.primitive.name == "dot_general")
    return jax.jit(jax.value_and_grad(loss))(params), widths

  separate = lambda x, linears: [linear(x) for linear in linears]
  for model, args in cases:
    (value, grads), widths = run(model, args)
    with monkeypatch.context() as m:
      m.setattr(layers, "side_by_side", separate)
      (want_value, want_grads), want_widths = run(model, args)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      # atol 1e-5: gradients of size ~5 summed in another order (AVX-512 CPUs differ by up to 1.7e-6 near 0)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":  # the side-by-side matmuls are there: q+k+v (and gate+up) wide
      side = {32 + 16 + 16, 2 * 48} if model is text else {3 * 16}
      assert side <= set(widths) and not side & set(want_widths), (widths, want_widths)
  lora.apply(text, lora.LoRAConfig(rank=2, targets=("q_proj",)), rngs=nnx.Rngs(2))
  assert not {32 + 16 + 16} & set(run(text, cases[0][1])[1])


def _grads_both_ways(monkeypatch, fn, *args):
  """(value, grads) of fn on CPU with sums in halves (`layers.halved_sums`) and with plain reductions."""
  results = []
  for halves in (True, False):
    monkeypatch.setattr(layers, "halved_sums", lambda halves=halves: halves)
    results.append(jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args))
  return results


def test_layer_norm_and_bias_sums_in_halves_match_the_plain_form(monkeypatch):
  """On one CPU device LayerNorm (its backward written out) and the linear layers' bias take their sums as
  halves; values and every gradient are the plain form's to rounding, in float32 and bfloat16 inputs, for
  token counts that halve evenly (3 x 1024) and ones that do not (5 x 7)."""
  assert layers.halved_sums()  # the tests' CPU, no mesh
  rng = np.random.default_rng(0)
  for shape in ((3, 1024, 96), (5, 7, 40)):
    d = shape[-1]
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ln = layers.LayerNorm(d, 1e-6, rngs=nnx.Rngs(0))
    ln.weight[...], ln.bias[...] = (jnp.asarray(rng.standard_normal(d), jnp.float32) for _ in range(2))
    graphdef, params = nnx.split(ln)
    norm = lambda x, params, graphdef=graphdef, g=g: jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * g)
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
      (va, ga), (vb, gb) = _grads_both_ways(monkeypatch, norm, x.astype(dtype), params)
      np.testing.assert_allclose(va, vb, rtol=tol)
      for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert u.dtype == v.dtype
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(v.astype(jnp.float32)))))
    linear = layers.Linear(d, 24, axes=(None, None), use_bias=True, rngs=nnx.Rngs(1))
    linear.bias[...] = jnp.asarray(rng.standard_normal(24), jnp.float32)
    graphdef, params = nnx.split(linear)
    dense = lambda x, params, graphdef=graphdef: jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))
    (va, ga), (vb, gb) = _grads_both_ways(monkeypatch, dense, x, params)
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


def test_sums_in_halves_only_on_one_cpu_device():
  """A mesh of several devices shards the tokens, which halves would slice across devices: plain sums."""
  assert layers.halved_sums()
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert layers.halved_sums()
  if len(jax.devices()) > 1:
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
      assert not layers.halved_sums()
