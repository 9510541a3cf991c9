"""Tiny SmolVLM- and PaliGemma 2-family backbones for training tests (random init, a synthetic tokenizer).

Kept apart from tests/sharded_training.py, which forces 8 host devices and XLA's cheapest code generation
when imported: a test module importing these from there would change every later test in its process.
"""

from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.data import examples
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig, VisionConfig, gemma2_layer_types
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer

IMAGE_SIZE = 16  # 2 x 2 patches of 8 pixels


def backbone_configs(tok) -> dict[str, BackboneConfig]:
  image = tok.convert_tokens_to_ids(examples.IMAGE_TOKEN)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=IMAGE_SIZE, patch_size=8)
  llama = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
  gemma2 = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, model_type="gemma2", query_pre_attn_scalar=8,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
                      layer_types=gemma2_layer_types(2))
  return {"smolvlm": BackboneConfig("smolvlm", llama, vision, scale_factor=2, image_token_id=image),
          "paligemma": BackboneConfig("paligemma", gemma2, vision, scale_factor=1, image_token_id=image)}


def text_only_trainer(num_hidden_layers: int = 2) -> Trainer:
  """A one-device Trainer for a tiny text-only PixRec (vocabulary 64, hidden 16; batches of ids below 64)."""
  text = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
  vision = VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        image_size=16, patch_size=8)
  bcfg = BackboneConfig("idefics3", text, vision, scale_factor=1, image_token_id=63)
  model_fn = lambda: PixRec(Backbone(bcfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=8, text_only=True),
                            rngs=nnx.Rngs(1))
  tx, _ = optim.optimizer(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
  return Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(1, 1, 1))
