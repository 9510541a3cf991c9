"""LoRA: adapters by path pattern, what trains, dropout, merging for export (tiny Llama PixRec, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixrec_jax import config_lib, export
from pixrec_jax import sharding as shd
from pixrec_jax.convert import hf
from pixrec_jax.data import pipeline
from pixrec_jax.models import lora
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer

LAYERS = 2


def _model_fn(tokenizer, cfg=lora.LoRAConfig(rank=4, alpha=8.0), scan_layers=False):
  text = TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
  bcfg = BackboneConfig("llama", text)
  heads = HeadsConfig(proj_dim=16, text_only=True)
  return lambda: lora.apply(PixRec(Backbone(bcfg, Runtime(scan_layers=scan_layers), rngs=nnx.Rngs(0)), heads,
                                   rngs=nnx.Rngs(1)), cfg, rngs=nnx.Rngs(2))


_outputs = nnx.jit(lambda model, batch: model.train_outputs(batch))


def _adapter_paths(model):
  return sorted(lora.join(p) for p, _ in nnx.to_flat_state(nnx.state(model, lora.LoRAParam)))


@pytest.fixture(scope="module")
def batch(text_builder, small_splits):
  it = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=8, seed=0))
  return pipeline.split_bookkeeping(next(it))[0]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapters_sit_on_the_mlp_linears_start_at_the_base_and_merge(word_tokenizer, batch, scan_layers):
  base = _model_fn(word_tokenizer, lora.LoRAConfig(rank=0), scan_layers)()
  model = _model_fn(word_tokenizer, scan_layers=scan_layers)()
  layer_keys = [""] if scan_layers else [f"{i}/" for i in range(LAYERS)]
  assert _adapter_paths(model) == sorted(f"backbone/text_model/layers/{i}mlp/{name}_proj/lora/{ab}"
                                         for i in layer_keys for name in ("down", "gate", "up") for ab in "ab")
  up = model.backbone.text_model.layers
  up = (up if scan_layers else up[0]).mlp.up_proj
  lead = (LAYERS,) if scan_layers else ()
  assert up.lora.a.shape == lead + (32, 4) and up.lora.b.shape == lead + (4, 64)
  if scan_layers:
    assert up.lora.a.get_metadata()["logical_axes"] == ("layers", "embed", None)
  # B is zero at init: the adapted model is the base model.
  want = _outputs(base, batch)
  got = _outputs(model, batch)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  for adapter in lora.adapters(model):
    adapter.b.set_value(0.1 * jax.random.normal(jax.random.key(3), adapter.b.shape))
  adapted = _outputs(model, batch)
  assert float(jnp.abs(adapted["user"] - want["user"]).max()) > 1e-3
  merged = export.merge_adapters(model)
  assert _adapter_paths(merged) == [] and len(_adapter_paths(model)) == 6 * len(layer_keys)
  for key, value in _outputs(merged, batch).items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(adapted[key]), atol=1e-5, err_msg=key)


def test_dropout_only_with_a_key(word_tokenizer, batch):
  model = _model_fn(word_tokenizer, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.5))()
  for adapter in lora.adapters(model):
    adapter.b.set_value(jax.random.normal(jax.random.key(3), adapter.b.shape))
  plain = _outputs(model, batch)["user"]
  np.testing.assert_array_equal(_outputs(model, batch)["user"], plain)  # no key: evaluation, nothing dropped
  lora.set_dropout_key(model, jax.random.key(0))
  dropped = _outputs(model, batch)["user"]
  assert float(jnp.abs(dropped - plain).max()) > 1e-3
  np.testing.assert_array_equal(_outputs(model, batch)["user"], dropped)  # one key, one mask
  lora.set_dropout_key(model, jax.random.key(1))
  assert float(jnp.abs(_outputs(model, batch)["user"] - dropped).max()) > 1e-3


def test_training_moves_only_adapters_and_heads_and_the_export_equals_the_adapted_model(word_tokenizer, batch,
                                                                                        tmp_path):
  model_fn = _model_fn(word_tokenizer, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
  tx, sched = optim.optimizer(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
  trainable = optim.trainable_filter("all", tied_embeddings=False, text_only=True, lora=True)
  trainer = Trainer(model_fn, tx, trainable, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(devices=jax.devices()[:1]),
                    sched)
  state = trainer.init_state()
  trained = {lora.join(p) for p, _ in nnx.to_flat_state(state.params)}
  adapters = {p for p in trained if "/lora/" in p}
  assert len(adapters) == 6 * LAYERS
  assert trained - adapters == {f"{h}_proj/{w}" for h in ("user", "item") for w in ("kernel", "bias")}
  # Only trainable leaves carry optimiser state: AdamW's two moments for each of them.
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert len(moments) == 2 * len(trained)
  assert sum(x.size for x in moments) == 2 * trainer.param_counts(state)["trainable"]
  frozen_before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state.frozen)}
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for p, v in nnx.to_flat_state(state.frozen):
    np.testing.assert_array_equal(np.asarray(v[...]), frozen_before[p], err_msg=lora.join(p))
  model = trainer.model(state)
  assert all(float(jnp.abs(a.b[...]).max()) > 0 for a in lora.adapters(model))
  # The merged backbone, written as plain transformers weights, computes the adapted model's logits.
  merged = export.merge_adapters(model)
  hf.save_pretrained(merged.backbone, tmp_path)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids, mask = batch["full_ids"], batch["full_mask"]
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                         attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
  logits = nnx.jit(lambda b, i, m: b(input_ids=i, attention_mask=m).logits)
  ours = np.asarray(logits(model.backbone, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits(merged.backbone, ids, mask))[real], ours[real], atol=1e-5)
  np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)


def test_bad_patterns_name_themselves(word_tokenizer):
  with pytest.raises(ValueError, match=r"lora.targets: pattern\(s\) \['text_model/\*\*/mlp/fc9'\] match no"):
    _model_fn(word_tokenizer, lora.LoRAConfig(rank=4, targets=("text_model/**/mlp/fc9",)))()
  with pytest.raises(ValueError, match="lora.rank must be >= 0"):
    lora.LoRAConfig(rank=-1).validate()
  fn = _model_fn(word_tokenizer)
  tx, _ = optim.optimizer(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  trainable = optim.trainable_filter("all", tied_embeddings=False, text_only=True, lora=True)
  with pytest.raises(ValueError, match=r"train.freeze: pattern\(s\) \['no_such_module'\] match no parameter"):
    Trainer(fn, tx, trainable, LossWeights(0.3, 0.4, 0.2), mesh, freeze=("user_proj", "no_such_module"))
  trainer = Trainer(fn, tx, trainable, LossWeights(0.3, 0.4, 0.2), mesh, freeze=("user_proj", "layers/1/**/lora"))
  paths = {lora.join(p) for p, _ in nnx.to_flat_state(trainer.abstract_state.params)}
  assert not any(p.startswith("user_proj") or "layers/1/" in p for p in paths)
  assert any(p.startswith("item_proj") for p in paths) and any("layers/0/mlp/up_proj/lora" in p for p in paths)


def test_the_lora_option_sets_the_papers_preset():
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:lora"])
  assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (8, 8.0, 0.1)
  assert tuple(cfg.lora.targets) == lora.PAPER_TARGETS
  default, _ = config_lib.parse_args(["--config", "configs/demo.py", "--config.train.freeze=a/b,c"])
  assert default.lora.rank == 0 and tuple(default.lora.targets) == lora.PAPER_TARGETS
  assert tuple(default.train.freeze) == ("a/b", "c") and default.train.grad_accum_steps == 1
