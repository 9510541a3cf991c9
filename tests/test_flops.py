"""Analytic train-step FLOPs against a count made by hand, matmul by matmul, for a tiny config."""

import dataclasses

import pytest

from pixrec_jax import flops
from pixrec_jax.models.config import BackboneConfig, TextConfig, VisionConfig

# Vision: 8 px images, 4 px patches (4 patches of 48 values), width 8, MLP 16, one layer.
# Pixel shuffle 2: one token per image. Text: width 16, 4 query heads and 2 KV heads of 4, MLP 32,
# 2 layers, 50 tokens, untied LM head.
CFG = BackboneConfig(
    model_type="idefics3",
    text=TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=4),
    vision=VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                        patch_size=4),
    scale_factor=2, image_token_id=49)
SHAPES = flops.StepShapes(batch=2, seq_len=10, item_len=6, nig_tokens=3, images=6)


def mm(m, k, n):
  """FLOPs of an (m, k) @ (k, n) matmul."""
  return 2 * m * k * n


# Forward FLOPs, one matmul at a time. Vision: 6 images x 4 patches = 24 rows.
PATCH = mm(24, 48, 8)
VISION_W = mm(24, 8, 8) * 4 + mm(24, 8, 16) + mm(24, 16, 8)  # q, k, v, out; fc1, fc2
VISION_ATTN = 6 * 2 * (mm(4, 4, 4) + mm(4, 4, 4))  # per image and head: scores (4x4 @ 4x4), then values
CONNECTOR = mm(6, 32, 16)  # 6 tokens of 4 patches x 8 after the shuffle


def decoder_w(rows):
  # q (16 -> 16), k and v (16 -> 8), o (16 -> 16), gate and up (16 -> 32), down (32 -> 16); two layers
  return 2 * (mm(rows, 16, 16) + 2 * mm(rows, 16, 8) + mm(rows, 16, 16) + 2 * mm(rows, 16, 32) + mm(rows, 32, 16))


def decoder_attn(t):
  return 2 * 2 * 4 * (mm(t, 4, t) + mm(t, t, 4))  # layers x batch x heads x (scores, values)


FULL_W, FULL_ATTN = decoder_w(20), decoder_attn(10)
ITEM_W, ITEM_ATTN = decoder_w(12), decoder_attn(6)
LM_HEAD = mm(6, 16, 50)  # 2 examples x 3 next-item positions
HEADS = 3 * mm(2, 16, 8)  # user_proj once, item_proj twice


def test_all_trainable_counts_three_passes_except_the_first_input_gradient():
  got = flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="all")
  assert got["vision"] == 2 * PATCH + 3 * VISION_W + 3 * VISION_ATTN  # nothing before the patch embedding
  assert got["connector"] == 3 * CONNECTOR
  assert got["decoder_full"] == 3 * (FULL_W + FULL_ATTN)
  assert got["decoder_item"] == 3 * (ITEM_W + ITEM_ATTN)
  assert got["lm_head"] == 3 * LM_HEAD
  assert got["heads"] == 3 * HEADS
  want = 2 * PATCH + 3 * (VISION_W + VISION_ATTN + CONNECTOR + FULL_W + FULL_ATTN + ITEM_W + ITEM_ATTN + LM_HEAD
                          + HEADS)
  assert got["total"] == want == 1_160_832  # 119,808 vision + 18,432 + 629,760 + 359,424 + 28,800 + 4,608


def test_frozen_parts_before_the_trained_ones_run_forward_only():
  frozen_vision = flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="frozen_vision")
  assert frozen_vision["vision"] == PATCH + VISION_W + VISION_ATTN
  assert frozen_vision["connector"] == 2 * CONNECTOR  # weight gradient, no input gradient
  assert frozen_vision["decoder_full"] == 3 * (FULL_W + FULL_ATTN)

  heads = flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="heads_lm_head")
  assert heads["decoder_full"] == FULL_W + FULL_ATTN
  assert heads["decoder_item"] == ITEM_W + ITEM_ATTN
  assert heads["lm_head"] == 2 * LM_HEAD and heads["heads"] == 2 * HEADS
  assert heads["total"] == PATCH + VISION_W + VISION_ATTN + CONNECTOR + FULL_W + FULL_ATTN + ITEM_W + ITEM_ATTN \
      + 2 * LM_HEAD + 2 * HEADS


def test_tied_embedding_training_sends_gradients_back_through_the_frozen_decoder():
  tied = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, tie_word_embeddings=True))
  got = flops.train_flops(tied, SHAPES, proj_dim=8, trainable="heads_lm_head")
  assert got["decoder_full"] == 2 * FULL_W + 3 * FULL_ATTN  # input gradients only
  assert got["lm_head"] == 3 * LM_HEAD


def test_text_only_has_no_vision():
  shapes = flops.StepShapes(batch=2, seq_len=10, item_len=6, nig_tokens=3, images=0)
  got = flops.train_flops(CFG, shapes, proj_dim=8, trainable="all", text_only=True)
  assert "vision" not in got and got["total"] == 3 * (FULL_W + FULL_ATTN + ITEM_W + ITEM_ATTN + LM_HEAD + HEADS)


@pytest.mark.parametrize("kind,key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100 pcie"), ("NVIDIA H200", "h200"),
    ("TPU v5 lite", "tpu v5e"), ("TPU v5p", "tpu v5p"), ("TPU v6 lite", "tpu v6e"), ("cpu", None)])
def test_device_kinds_map_to_peaks(kind, key):
  assert flops.device_key(kind) == key


def test_mfu_against_the_peak_and_none_on_cpu():
  got = flops.mfu(989.4e12, 2.0, 1, "NVIDIA H200")
  assert got["mfu"] == pytest.approx(0.5) and got["tflops_per_device"] == pytest.approx(494.7)
  cpu = flops.mfu(1e12, 1.0, 2, "cpu")
  assert cpu["mfu"] is None and cpu["tflops_per_device"] == pytest.approx(0.5)


def test_bad_trainable_mode_names_the_valid_ones():
  with pytest.raises(ValueError, match="heads_lm_head"):
    flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="lora")
