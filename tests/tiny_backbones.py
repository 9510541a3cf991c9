"""Tiny SmolVLM- and PaliGemma 2-family backbones for training tests (random init, a synthetic tokenizer).

Kept apart from tests/sharded_training.py, which forces 8 host devices and XLA's cheapest code generation
when imported: a test module importing these from there would change every later test in its process.
"""

from pixrec_jax.data import examples
from pixrec_jax.models.config import BackboneConfig, TextConfig, VisionConfig, gemma2_layer_types

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
