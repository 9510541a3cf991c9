"""Our Flax port against transformers on tiny random SmolVLM-family models (float32)."""

import numpy as np
import pytest
import torch
from flax import nnx

from tests import hf_fixtures as fx

import pixrec_jax

TOL = 1e-4


def _hf_outputs(model, batch):
  kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    logits = model(**kwargs).logits.float().numpy()
    hidden = model.model(**kwargs).last_hidden_state.float().numpy()
  return logits, hidden


@nnx.jit  # one program per case (op by op, the passes took most of this file's time)
def _forward(model, batch):
  out = model(**batch)
  return out.logits, out.last_hidden_state


def _ours(model, batch):
  return tuple(map(np.asarray, _forward(model, batch)))


def _assert_close(hf, ours, mask, what):
  real = mask.astype(bool)
  diff = np.abs(hf[real] - ours[real]).max()
  assert diff < TOL, f"{what}: max abs difference {diff:.2e} at real positions exceeds {TOL}"


def _pad(rows, length, left=False):
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    if left:
      ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    else:
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def _images(rng, count, size=32):
  return rng.normal(size=(count, 3, size, size)).astype(np.float32)


def _cases(image_seq_len):
  rng = np.random.default_rng(0)
  txt = lambda n: fx.random_text(rng, n)
  img = fx.image_prompt(image_seq_len)
  cases = {}
  ids, mask = _pad([txt(12), txt(7)], 12)
  cases["text_only_right_padding"] = dict(input_ids=ids, attention_mask=mask)
  ids, mask = _pad([txt(12), txt(7)], 12, left=True)
  cases["text_only_left_padding"] = dict(input_ids=ids, attention_mask=mask)
  ids, mask = _pad([txt(5) + img + txt(4), txt(3) + img + txt(2)], 5 + len(img) + 4)
  cases["one_image_right_padding"] = dict(input_ids=ids, attention_mask=mask,
                                          pixel_values=_images(rng, 2)[:, None])
  ids, mask = _pad([txt(5) + img + txt(4), txt(3) + img + txt(2)], 5 + len(img) + 4, left=True)
  cases["one_image_left_padding"] = dict(input_ids=ids, attention_mask=mask, pixel_values=_images(rng, 2)[:, None])
  # Two images in the first example, one in the second: its second slot is an all-zero padding image.
  # The first example's second image is 24x16 real pixels padded to 32x32 (pixel mask 0 outside).
  rows = [txt(4) + img + txt(3) + img + txt(2), txt(6) + img + txt(3)]
  ids, mask = _pad(rows, max(map(len, rows)))
  pixels = np.zeros((2, 2, 3, 32, 32), np.float32)
  pixel_mask = np.zeros((2, 2, 32, 32), np.int64)
  pixels[0, 0], pixel_mask[0, 0] = _images(rng, 1)[0], 1
  pixels[0, 1, :, :24, :16], pixel_mask[0, 1, :24, :16] = _images(rng, 1)[0, :, :24, :16], 1
  pixels[1, 0], pixel_mask[1, 0] = _images(rng, 1)[0], 1
  cases["several_images_variable_size"] = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                               pixel_attention_mask=pixel_mask)
  return cases


@pytest.mark.parametrize("model_type,kv_heads,tie", [
    ("idefics3", 2, False),  # grouped-query attention, untied head
    ("idefics3", 4, True),  # multi-head attention, tied embeddings
    ("smolvlm", 1, False),  # multi-query attention, SmolVLM class
])
def test_vlm_matches_transformers(tmp_path, model_type, kv_heads, tie):
  config = fx.tiny_idefics3_config(model_type=model_type, kv_heads=kv_heads, tie=tie)
  hf_model = fx.build_and_save(config, tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  assert ours.cfg.text.tie_word_embeddings == tie
  assert ("lm_head" in vars(ours)) == (not tie)
  for name, batch in _cases(ours.cfg.image_seq_len).items():
    hf_logits, hf_hidden = _hf_outputs(hf_model, batch)
    logits, hidden = _ours(ours, batch)
    assert logits.shape == hf_logits.shape, name
    _assert_close(hf_hidden, hidden, batch["attention_mask"], f"{name}: last hidden state")
    _assert_close(hf_logits, logits, batch["attention_mask"], f"{name}: logits")


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True)])
def test_text_only_llama_matches_transformers(tmp_path, kv_heads, tie):
  hf_model = fx.build_and_save(fx.tiny_llama_config(kv_heads=kv_heads, tie=tie), tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  assert not ours.cfg.is_vlm
  rng = np.random.default_rng(1)
  for left in (False, True):
    ids, mask = _pad([fx.random_text(rng, 10), fx.random_text(rng, 6)], 10, left=left)
    batch = dict(input_ids=ids, attention_mask=mask)
    hf_logits, hf_hidden = _hf_outputs(hf_model, batch)
    logits, hidden = _ours(ours, batch)
    _assert_close(hf_hidden, hidden, mask, f"left={left}: last hidden state")
    _assert_close(hf_logits, logits, mask, f"left={left}: logits")


def test_image_token_count_mismatch_is_a_clear_error(tmp_path):
  fx.build_and_save(fx.tiny_idefics3_config(), tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  ids = np.asarray([fx.image_prompt(ours.cfg.image_seq_len) + [5, 6]])
  two_images = np.ones((1, 2, 3, 32, 32), np.float32)
  with pytest.raises(ValueError, match="image features and image tokens do not match"):
    ours(input_ids=ids, pixel_values=two_images)


def test_sharded_safetensors_checkpoint_loads(tmp_path):
  hf_model = fx.build_and_save(fx.tiny_idefics3_config(), tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  ours = pixrec_jax.from_pretrained(tmp_path)
  batch = _cases(ours.cfg.image_seq_len)["one_image_right_padding"]
  hf_logits, _ = _hf_outputs(hf_model, batch)
  _assert_close(hf_logits, _ours(ours, batch)[0], batch["attention_mask"], "sharded checkpoint: logits")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  from pixrec_jax.convert import safetensors_io

  fx.build_and_save(fx.tiny_idefics3_config(), tmp_path)
  tensors = dict(safetensors_io.CheckpointReader(tmp_path).items())
  del tensors["model.text_model.norm.weight"]
  safetensors_io.save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="lacks 1 parameters.*model.text_model.norm.weight"):
    pixrec_jax.from_pretrained(tmp_path)
  tensors["model.text_model.norm.weight"] = np.ones(32, np.float32)
  tensors["model.extra.weight"] = np.ones(3, np.float32)
  safetensors_io.save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="does not use.*model.extra.weight"):
    pixrec_jax.from_pretrained(tmp_path)
