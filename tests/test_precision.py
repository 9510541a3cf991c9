"""Mixed precision: bfloat16 matmuls, float32 softmax, norms, logits and losses.

The dtypes are read off the traced program (every softmax exponential and every
norm's rsqrt, wherever it is nested), and the bfloat16 model must stay close to
the float32 one with the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import hf_fixtures as fx

from pixrec_jax.models import layers, scan
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime
from pixrec_jax.recsys import losses

FAMILIES = {"llama": fx.tiny_llama_config, "paligemma": fx.tiny_paligemma_config}


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (jit, custom_jvp, scan, remat)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _out_dtypes(jaxpr, primitive: str) -> set:
  return {str(v.aval.dtype) for e in _equations(jaxpr) if e.primitive.name == primitive for v in e.outvars}


def _forward(model, ids):
  return model.logits(model.hidden_states(model.embed(ids)))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_keeps_softmax_norms_and_logits_in_float32(family, param_dtype):
  cfg = BackboneConfig.from_hf_dict(FAMILIES[family]().to_dict())
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 90, (2, 10)), jnp.int32)
  reference = Backbone(cfg, Runtime(), rngs=nnx.Rngs(0))
  # Scanned as the full-size configs run, with the reference's weights (rounded to param_dtype).
  model = Backbone(cfg, Runtime(dtype="bfloat16", param_dtype=param_dtype, scan_layers=True), rngs=nnx.Rngs(0))
  weights = scan.to_layout(nnx.state(reference), nnx.state(model))
  nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), weights))
  assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {param_dtype}
  graphdef, _ = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s: _forward(nnx.merge(graphdef, s), ids))(nnx.state(model)).jaxpr
  assert _out_dtypes(jaxpr, "exp") == {"float32"}  # attention softmax
  assert _out_dtypes(jaxpr, "rsqrt") == {"float32"}  # RMSNorms
  matmuls = [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
  assert any(str(v.aval.dtype) == "bfloat16" for e in matmuls for v in e.invars), "no matmul runs in bfloat16"
  forward = nnx.jit(_forward)
  logits = forward(model, ids)
  assert logits.dtype == jnp.float32
  want = np.asarray(forward(reference, ids))
  err = np.abs(np.asarray(logits) - want).max() / np.abs(want).max()
  assert err < 0.05, f"bfloat16 logits differ from float32 by {err:.3f} of their range"


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_training_gradient_has_no_float32_matmul(family):
  """Every matmul of the bfloat16 backward pass reads bfloat16 (the float32 attention and output
  logits' cotangents are rounded first): a float32 x bfloat16 matmul runs in float32 on XLA."""
  cfg = BackboneConfig.from_hf_dict(FAMILIES[family]().to_dict())
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 90, (2, 10)), jnp.int32)
  model = Backbone(cfg, Runtime(dtype="bfloat16", param_dtype="float32", scan_layers=True), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  loss = lambda s: jnp.mean(jax.nn.log_softmax(_forward(nnx.merge(graphdef, s), ids))[..., 0])
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  matmuls = [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
  operand_dtypes = [tuple(str(v.aval.dtype) for v in e.invars) for e in matmuls]
  assert len(matmuls) > 10 and set(operand_dtypes) == {("bfloat16", "bfloat16")}, sorted(set(operand_dtypes))
  grads = jax.jit(jax.grad(loss))(params)  # and the whole model's bfloat16 gradients come out usable
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_einsum_f32_gradients_are_the_einsums_rounded_only_at_the_cotangent():
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 5, 3, 8), (2, 7, 3, 8)))
  w = jnp.asarray(rng.normal(size=(2, 3, 5, 7)), jnp.float32)
  spec = "bthd,bshd->bhts"
  loss = lambda f: (lambda a, b: jnp.sum(jnp.tanh(f(spec, a, b)) * w))
  plain = lambda s, a, b: jnp.einsum(s, a, b, preferred_element_type=jnp.float32)
  out = layers.einsum_f32(spec, a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, plain(spec, a, b))
  for got, want in zip(jax.grad(loss(layers.einsum_f32), (0, 1))(a, b), jax.grad(loss(plain), (0, 1))(a, b)):
    np.testing.assert_array_equal(got, want)  # float32 inputs: exactly the einsum's gradients
  # bfloat16 inputs: the float32 cotangent rounded to bfloat16, then the einsum's own transposes.
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  cotangent = (1 - jnp.tanh(plain(spec, a16, b16)) ** 2) * w
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a16, b16)
  want = vjp(cotangent.astype(jnp.bfloat16))
  got = jax.grad(loss(layers.einsum_f32), (0, 1))(a16, b16)
  for g, x in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(g, x)


def test_losses_are_float32_from_bfloat16_outputs():
  rng = np.random.default_rng(0)
  f32 = {"nig_logits": rng.normal(size=(4, 3, 50)), "user": rng.normal(size=(4, 16)),
         "target_given_user": rng.normal(size=(4, 16)), "item": rng.normal(size=(4, 16))}
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in f32.items()}
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in f32.items()}
  batch = {"nig_labels": jnp.asarray(rng.integers(0, 50, (4, 3)), jnp.int32), "nig_weights": jnp.ones((4, 3)),
           "target_item": jnp.asarray([0, 1, 2, 1], jnp.int32)}
  weights = losses.LossWeights(0.3, 0.4, 0.2)
  jaxpr = jax.make_jaxpr(lambda o: losses.mixed_loss(o, batch, weights)[0])(bf16).jaxpr
  assert _out_dtypes(jaxpr, "exp") == {"float32"} and _out_dtypes(jaxpr, "log") == {"float32"}
  loss, metrics = losses.mixed_loss(bf16, batch, weights)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  want, _ = losses.mixed_loss(f32, batch, weights)
  np.testing.assert_allclose(float(loss), float(want), rtol=2e-2)
