"""Tiny random Hugging Face models built inside the tests (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

VOCAB = 96
IMAGE_TOKEN = 95


def tiny_idefics3_config(*, model_type: str = "idefics3", kv_heads: int = 2, tie: bool = False,
                         image_size: int = 32, patch_size: int = 8, scale_factor: int = 2,
                         rope_theta: float = 5000.0):
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, pad_token_id=0,
              tie_word_embeddings=tie)
  vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size)
  cls = transformers.SmolVLMConfig if model_type == "smolvlm" else transformers.Idefics3Config
  return cls(text_config=text, vision_config=vision, scale_factor=scale_factor, image_token_id=IMAGE_TOKEN,
             tie_word_embeddings=tie)


def tiny_llama_config(*, kv_heads: int = 2, tie: bool = False):
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, rms_norm_eps=1e-5,
                                  max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 10000.0},
                                  tie_word_embeddings=tie)


def tiny_paligemma_config(*, kv_heads: int = 2, tie: bool = True, sliding_window: int = 4, image_size: int = 16,
                          patch_size: int = 8, vision_use_head: bool = False, softcap: bool = True,
                          image_token: int = IMAGE_TOKEN, vocab: int = VOCAB):
  """PaliGemma 2: a SigLIP tower and a Gemma2 decoder whose layers alternate sliding and full attention.

  Soft-caps are small enough (attention 0.1, logits 0.5) to bend the tiny model's logits."""
  text = dict(model_type="gemma2", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, query_pre_attn_scalar=1,
              sliding_window=sliding_window, max_position_embeddings=256, pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
              attn_logit_softcapping=0.1 if softcap else None, final_logit_softcapping=0.5 if softcap else None)
  vision = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=patch_size, vision_use_head=vision_use_head)
  return transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                                      projection_dim=32, tie_word_embeddings=tie)


def build_and_save(config, path, seed: int = 0, max_shard_size=None):
  """Random model for `config`, with non-trivial norms and biases, saved as safetensors
  (in several shards with an index when max_shard_size is given)."""
  torch.manual_seed(seed)
  if isinstance(config, transformers.LlamaConfig):
    model = transformers.LlamaForCausalLM(config)
  elif config.model_type == "paligemma":
    model = transformers.PaliGemmaForConditionalGeneration(config)
  elif config.model_type == "smolvlm":
    model = transformers.SmolVLMForConditionalGeneration(config)
  else:
    model = transformers.Idefics3ForConditionalGeneration(config)
  with torch.no_grad():
    # Default init leaves norms at 1 and biases at 0, which would hide layout mistakes.
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  return model


def image_prompt(image_seq_len: int) -> list[int]:
  """The token layout of one image without splitting: fake, global, image * n, fake."""
  fake, glob = 93, 94
  return [fake, glob] + [IMAGE_TOKEN] * image_seq_len + [fake]


def random_text(rng: np.random.Generator, n: int) -> list[int]:
  return rng.integers(1, 90, size=n).tolist()
