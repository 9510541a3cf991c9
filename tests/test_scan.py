"""Scanned layers and remat against the plain loop, and the scanned <-> looped layouts.

Scanned and looped models built from one seed hold the same weights, so their
outputs and gradients can be compared directly: a forward pass must agree to
float32 rounding, and so must a rematerialised backward pass (remat recomputes,
it does not approximate).
"""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests import hf_fixtures as fx

from pixrec_jax import sharding as shd
from pixrec_jax.convert import hf
from pixrec_jax.models import scan
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import checkpoint, optim
from pixrec_jax.train.trainer import Trainer

FAMILIES = {
    "llama": fx.tiny_llama_config,
    "paligemma": fx.tiny_paligemma_config,  # layers sliding, full, sliding: the flag picks each mask
    "smolvlm": lambda: fx.tiny_idefics3_config(model_type="smolvlm"),
}
ATOL, RTOL = 1e-6, 1e-5  # float32 rounding: XLA fuses and orders a scanned loop's sums differently


def _config(family):
  return BackboneConfig.from_hf_dict(FAMILIES[family]().to_dict())


def _inputs(cfg):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 90, (2, 10)), jnp.int32)
  pixels = None
  if cfg.is_vlm:
    side = cfg.vision.image_size
    pixels = jnp.asarray(rng.normal(size=(2, 3, side, side)), jnp.float32)
  return ids, pixels


def _loss(model, ids, pixels):
  """Reaches every parameter the tests compare: vision tower (if any), decoder, logits."""
  hidden = model.hidden_states(model.embed(ids))
  loss = jnp.mean(jnp.square(hidden)) + jnp.mean(jnp.square(model.logits(hidden)))
  if pixels is not None:
    loss = loss + jnp.mean(jnp.square(model.image_features(pixels)))
  return loss, hidden


@nnx.jit
def _loss_and_grads(model, ids, pixels):
  (loss, hidden), grads = nnx.value_and_grad(_loss, has_aux=True)(model, ids, pixels)
  return loss, hidden, grads


def _flat(state):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def _assert_close(got, want, what, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=what)


def _assert_same_outputs_and_gradients(model, reference, ids, pixels, rtol=RTOL, atol=ATOL):
  """`model` (any layer layout) gives `reference`'s last hidden state, loss and every parameter gradient."""
  loss, hidden, grads = _loss_and_grads(reference, ids, pixels)
  m_loss, m_hidden, m_grads = _loss_and_grads(model, ids, pixels)
  _assert_close(m_hidden, hidden, "last hidden state", rtol, atol)
  _assert_close(m_loss, loss, "loss", rtol, atol)
  want, got = _flat(grads), _flat(scan.to_layout(m_grads, grads))
  assert set(got) == set(want)
  for name in want:
    _assert_close(got[name], want[name], f"gradient {name}", rtol, atol)


# family -> (looped remat, scanned remat): every pair rematerialises on one side at least,
# so each policy and scanning are checked against a different computation of the same numbers.
# Every policy on one side or the other; SmolVLM's decoder is the Llama one, so Llama alone adds no case.
PAIRS = {"paligemma": ("dots", "none"), "smolvlm": ("full", "minimal")}


@pytest.mark.parametrize("family", PAIRS)
def test_scanned_and_remat_equal_looped_forward_and_gradients(family):
  cfg = _config(family)
  ids, pixels = _inputs(cfg)
  looped_remat, scanned_remat = PAIRS[family]
  looped = Backbone(cfg, Runtime(remat=looped_remat), rngs=nnx.Rngs(0))
  scanned = Backbone(cfg, Runtime(scan_layers=True, remat=scanned_remat), rngs=nnx.Rngs(0))
  assert scan.is_scanned(nnx.state(scanned)) and not scan.is_scanned(nnx.state(looped))
  _assert_same_outputs_and_gradients(scanned, looped, ids, pixels)


def test_unknown_remat_policy_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown remat policy 'everything'.*'dots'.*'full'.*'minimal'.*'none'"):
    Runtime(remat="everything")


def test_stacked_parameters_carry_an_unsharded_layers_axis():
  cfg = _config("paligemma")
  state = nnx.state(nnx.eval_shape(lambda: Backbone(cfg, Runtime(scan_layers=True), rngs=nnx.Rngs(0))))
  q = state["text_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (cfg.text.num_hidden_layers, 32, 32)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
  fc1 = state["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
  assert fc1.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")
  assert shd.logical_to_spec(("layers", "embed", "heads")) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize("family", ["llama", "paligemma"])
def test_hugging_face_checkpoint_loads_and_exports_scanned(family, tmp_path):
  fx.build_and_save(FAMILIES[family](), tmp_path)
  looped = hf.from_pretrained(tmp_path)
  scanned = hf.from_pretrained(tmp_path, Runtime(scan_layers=True))
  want, got = hf.to_hf_tensors(looped), hf.to_hf_tensors(scanned)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  stacked = np.asarray(nnx.state(scanned)["text_model"]["layers"]["mlp"]["up_proj"]["kernel"][...])
  np.testing.assert_array_equal(stacked[1], np.asarray(looped.text_model.layers[1].mlp.up_proj.kernel[...]))


def test_to_layout_refuses_a_source_with_other_layers():
  cfg = _config("llama")
  looped = nnx.state(nnx.eval_shape(lambda: Backbone(cfg, Runtime(), rngs=nnx.Rngs(0))))
  deeper = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=3))
  scanned = nnx.state(nnx.eval_shape(lambda: Backbone(deeper, Runtime(scan_layers=True), rngs=nnx.Rngs(0))))
  source = {p: np.zeros(v.shape, v.dtype) for p, v in nnx.to_flat_state(looped)}
  with pytest.raises(ValueError, match="text_model/layers/input_layernorm/weight"):
    scan.to_layout(source, scanned)


def _trainer(scanned: bool) -> Trainer:
  cfg = _config("llama")
  rt = Runtime(scan_layers=scanned)
  model_fn = lambda: PixRec(Backbone(cfg, rt, rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=8, text_only=True),
                            rngs=nnx.Rngs(1))
  tx, sched = optim.optimizer(lr=1e-3, steps=4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  return Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), mesh, sched)


def _by_path(tree):
  """{(path with int layer indices): numpy array} for any state tree, by checkpoint names."""
  return {tuple(int(p) if p.isdigit() else p for p in name.split("/")): np.asarray(x)
          for name, x in checkpoint.leaf_names(tree).items()}


def test_checkpoints_restore_into_the_other_layer_layout(tmp_path):
  trainers = {False: _trainer(False), True: _trainer(True)}
  key = jax.random.key(0)
  for saved_scanned, writer in trainers.items():
    reader = trainers[not saved_scanned]
    state = writer.init_state()
    # Optimiser moments that differ per element, so that a mixed-up layer order would show.
    state = state._replace(opt_state=jax.tree.map(
        lambda x: jax.random.normal(key, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        state.opt_state))
    with checkpoint.Checkpointer(tmp_path / f"scanned_{saved_scanned}") as ckpt:
      ckpt.save(3, state, config={"k": 1}, progress={"step": 3}, wait=True)
      restored = ckpt.restore(3, reader.abstract_state)
      params, _ = ckpt.restore_model(3, reader.abstract_state.params, reader.abstract_state.frozen)
    assert restored.progress == {"step": 3}
    assert scan.is_scanned(restored.state.params) == (not saved_scanned)
    source = _by_path(state)
    for path, got in _by_path(restored.state).items():
      np.testing.assert_array_equal(got, scan.value_for(path, source, got.shape), err_msg="/".join(map(str, path)))
    want, got = _flat(state.params), _flat(scan.to_layout(params, state.params))
    assert set(got) == set(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Each array lands on the sharding the reader's train step expects.
    assert all(x.sharding == a.sharding for x, a in zip(jax.tree.leaves(restored.state),
                                                          jax.tree.leaves(reader.abstract_state)))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_fused_attention_under_scan_and_remat_equals_xla(remat):
  """attention="pallas" (custom VJP over Pallas kernels; the interpreter on CPU) inside scanned,
  rematerialised layers: forward and every gradient equal looped XLA attention's."""
  cfg = _config("paligemma")  # soft-capped, sliding and full layers
  ids, pixels = _inputs(cfg)
  looped = Backbone(cfg, Runtime(), rngs=nnx.Rngs(0))
  fused = Backbone(cfg, Runtime(attention="pallas", scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
  _assert_same_outputs_and_gradients(fused, looped, ids, pixels, rtol=1e-4, atol=1e-5)
