"""Our PaliGemma 2 port against transformers on tiny random models (float32).

The tiny Gemma2 has three layers (sliding, full, sliding) with a sliding window of
4 tokens, and every sequence here is longer than that, so the window cuts in.
"""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests import hf_fixtures as fx

import pixrec_jax
from pixrec_jax.convert import hf
from pixrec_jax.convert.safetensors_io import CheckpointReader

TOL = 1e-4
IMAGE_SIZE = 16  # 2 x 2 patches of 8 pixels: 4 image tokens per image
LENGTH = 16  # every case pads to this length, so that few shapes are compiled


@nnx.jit
def _forward(model, batch):
  return model(**batch)


def _hf_outputs(model, batch):
  kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    logits = model(**kwargs).logits.float().numpy()
    hidden = model.model(**kwargs).last_hidden_state.float().numpy()
  return logits, hidden


def _assert_close(hf_out, ours, mask, what):
  real = mask.astype(bool)
  diff = np.abs(hf_out[real] - np.asarray(ours)[real]).max()
  assert diff < TOL, f"{what}: max abs difference {diff:.2e} at real positions exceeds {TOL}"


def _compare(hf_model, ours, cases):
  for name, batch in cases.items():
    hf_logits, hf_hidden = _hf_outputs(hf_model, batch)
    out = _forward(ours, batch)
    assert out.logits.shape == hf_logits.shape, name
    _assert_close(hf_hidden, out.last_hidden_state, batch["attention_mask"], f"{name}: last hidden state")
    _assert_close(hf_logits, out.logits, batch["attention_mask"], f"{name}: logits")


def _batch(rows, prefix_lengths, left=False, length=LENGTH):
  """Padded ids, attention mask and token types (0 over each row's prefix and its padding, 1 after)."""
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  types = np.zeros_like(ids)
  for i, (row, prefix) in enumerate(zip(rows, prefix_lengths)):
    start = length - len(row) if left else 0
    ids[i, start:start + len(row)] = row
    mask[i, start:start + len(row)] = 1
    types[i, start + prefix:start + len(row)] = 1
  return ids, mask, types


def _cases(image_token, image_seq_len):
  rng = np.random.default_rng(0)
  txt = lambda n: fx.random_text(rng, n)
  img = [image_token] * image_seq_len
  images = lambda n: rng.normal(size=(n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
  cases = {}
  ids, mask, _ = _batch([txt(LENGTH), txt(7)], [0, 0], left=True)
  cases["text_only_left_padding"] = dict(input_ids=ids, attention_mask=mask)
  for left in (False, True):
    side = "left" if left else "right"
    # Hugging Face's layout: image tokens, then the prompt (both the bidirectional prefix), then the suffix.
    rows = [img + txt(6) + txt(5), img + txt(3) + txt(2)]
    ids, mask, types = _batch(rows, [len(img) + 6, len(img) + 3], left=left)
    cases[f"image_prefix_{side}_padding"] = dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                                 pixel_values=images(2))
  # Without token_type_ids everything is causal, as PixRec runs it.
  ids, mask, _ = _batch([txt(3) + img + txt(6), txt(5) + img + txt(2)], [0, 0])
  cases["image_mid_sequence_causal"] = dict(input_ids=ids, attention_mask=mask, pixel_values=images(2))
  # Images are consumed in order over the batch: two in the first row, one in the second.
  rows = [txt(2) + img + txt(3) + img + txt(2), txt(4) + img + txt(5)]
  ids, mask, types = _batch(rows, [2 + 2 * len(img) + 3, 4 + len(img)])
  cases["several_images_prefix"] = dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                        pixel_values=images(3))
  return cases


@pytest.mark.parametrize("kv_heads,tie,softcap,vision_use_head,image_token", [
    (2, True, True, False, fx.IMAGE_TOKEN),  # PaliGemma 2's shape: grouped-query, tied, soft-capped
    # Multi-query, untied head, no soft-caps, an unused SigLIP pooling head in the checkpoint, and
    # an image token outside the vocabulary, as Hugging Face allows.
    (1, False, False, True, fx.VOCAB),
])
def test_paligemma_matches_transformers(tmp_path, kv_heads, tie, softcap, vision_use_head, image_token):
  config = fx.tiny_paligemma_config(kv_heads=kv_heads, tie=tie, softcap=softcap, vision_use_head=vision_use_head,
                                    image_token=image_token)
  hf_model = fx.build_and_save(config, tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  assert ours.cfg.model_type == "paligemma" and ours.cfg.image_seq_len == 4
  assert ours.cfg.text.attention_types == ("sliding_attention", "full_attention", "sliding_attention")
  assert ("lm_head" in vars(ours)) == (not tie)
  _compare(hf_model, ours, _cases(image_token, ours.cfg.image_seq_len))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The default tiny PaliGemma 2, saved once for the tests that do not compare with transformers."""
  path = tmp_path_factory.mktemp("paligemma")
  fx.build_and_save(fx.tiny_paligemma_config(), path)
  return path


def test_each_gemma2_feature_changes_the_output(checkpoint):
  """Guards the parity cases against testing nothing: the bidirectional prefix, the sliding window
  and both soft-caps each move real outputs well beyond the tolerance."""
  ours = pixrec_jax.from_pretrained(checkpoint)

  def variant(**text_changes):
    cfg = dataclasses.replace(ours.cfg, text=dataclasses.replace(ours.cfg.text, **text_changes))
    graphdef, state = hf.abstract_backbone(cfg, pixrec_jax.Runtime())
    return nnx.merge(graphdef, hf.load_state(CheckpointReader(checkpoint), cfg, pixrec_jax.Runtime(), state))

  batch = _cases(fx.IMAGE_TOKEN, 4)["image_prefix_right_padding"]
  base = np.asarray(_forward(ours, batch).logits)
  causal = np.asarray(_forward(ours, {k: v for k, v in batch.items() if k != "token_type_ids"}).logits)
  assert np.abs(base - causal)[:, :4].max() > 100 * TOL, "the bidirectional prefix had no effect"
  text = {"input_ids": np.asarray([fx.random_text(np.random.default_rng(1), LENGTH)])}
  windowed = np.asarray(_forward(ours, text).logits)
  for change in (dict(sliding_window=64), dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None)):
    changed = np.asarray(_forward(variant(**change), text).logits)
    assert np.abs(windowed - changed).max() > 10 * TOL, f"{change} had no effect"
    if "sliding_window" in change:  # a window of 4 only cuts in from the fifth token on
      np.testing.assert_allclose(windowed[:, :4], changed[:, :4], atol=1e-6)


def test_pieces_compose_like_the_call(checkpoint):
  """PixRec's path (image_features -> embed -> hidden_states -> logits) equals the Hugging Face-style call."""

  @nnx.jit
  def pieces(model, batch):
    feats = model.image_features(batch["pixel_values"])
    return model.logits(model.hidden_states(model.embed(batch["input_ids"], feats), batch["attention_mask"]))

  ours = pixrec_jax.from_pretrained(checkpoint)
  batch = _cases(fx.IMAGE_TOKEN, 4)["image_mid_sequence_causal"]
  np.testing.assert_allclose(np.asarray(pieces(ours, batch)), np.asarray(_forward(ours, batch).logits), atol=1e-5)


def test_export_loads_in_transformers(tmp_path):
  """save_pretrained writes the Hub's tensor names; transformers loads them and agrees."""
  fx.build_and_save(fx.tiny_paligemma_config(tie=False), tmp_path / "hf")
  ours = pixrec_jax.from_pretrained(tmp_path / "hf")
  hf.save_pretrained(ours, tmp_path / "ours")
  reloaded, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "ours",
                                                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  reloaded.eval()
  batch = _cases(fx.IMAGE_TOKEN, 4)["image_prefix_left_padding"]
  _compare(reloaded, ours, {"exported": batch})
  assert pixrec_jax.from_pretrained(tmp_path / "ours").cfg == ours.cfg


def test_clear_errors(checkpoint):
  ours = pixrec_jax.from_pretrained(checkpoint)
  ids = np.asarray([[fx.IMAGE_TOKEN] * 4 + [5, 6]])
  with pytest.raises(ValueError, match="image features and image tokens do not match"):
    ours(input_ids=ids, pixel_values=np.ones((2, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
  with pytest.raises(ValueError, match="images must be 16x16"):
    ours(input_ids=ids, pixel_values=np.ones((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="no patch mask"):
    ours.image_features(np.ones((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32), np.ones((1, 2, 2), bool))
  with pytest.raises(ValueError, match="cudnn.*soft-capping"):
    pixrec_jax.from_pretrained(checkpoint, pixrec_jax.Runtime(attention="cudnn"))(input_ids=ids[:, 4:])


def test_pallas_attention_matches_transformers(checkpoint):
  """attention="pallas" (the fused soft-capping kernels; on CPU in Pallas's interpreter) through the whole
  model, vision tower included, with the bidirectional prefix, padding and the sliding window."""
  hf_model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(checkpoint).eval()
  ours = pixrec_jax.from_pretrained(checkpoint, pixrec_jax.Runtime(attention="pallas"))
  cases = _cases(fx.IMAGE_TOKEN, ours.cfg.image_seq_len)
  _compare(hf_model, ours, {k: cases[k] for k in ("image_prefix_left_padding", "several_images_prefix")})
  # Causal batches (PixRec's) with causal_blocks > 1: the kernels' causal promise, key blocks skipped.
  causal = pixrec_jax.from_pretrained(checkpoint, pixrec_jax.Runtime(attention="pallas", causal_blocks=2))
  _compare(hf_model, causal, {k: cases[k] for k in ("image_mid_sequence_causal", "text_only_left_padding")})
