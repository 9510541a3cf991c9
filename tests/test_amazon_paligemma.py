"""configs/paligemma2_3b_224.py on a local PaliGemma checkpoint, end to end: a tiny random
PaliGemma 2 with its processor and a tiny processed dataset with images of several
sizes (tests/test_amazon_smolvlm.py's), all written inside the test."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import pixrec_jax
from pixrec_jax import config_lib
from pixrec_jax.data import prompts
from pixrec_jax.models import zoo
from pixrec_jax.models.config import BackboneConfig
from pixrec_jax.train import run
from tests import hf_fixtures
from tests import processor_fixtures as pf
from tests.test_amazon_smolvlm import SHAPES, _write_dataset

CONFIG = "configs/paligemma2_3b_224.py:paper"  # as its docstring runs it on a checkpoint
SIZE, PATCH = 28, 14  # 4 image tokens per image, as 224 / 14 gives PaliGemma 2 its 256


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  data = tmp_path_factory.mktemp("dataset")
  processor = pf.paligemma_processor(pf.gemma_tokenizer(_write_dataset(data)), (SIZE // PATCH) ** 2, SIZE)
  tokenizer = processor.tokenizer
  model = tmp_path_factory.mktemp("paligemma")
  config = hf_fixtures.tiny_paligemma_config(vocab=len(tokenizer), image_token=processor.image_token_id,
                                             image_size=SIZE, patch_size=PATCH)
  assert config.text_config.pad_token_id == tokenizer.pad_token_id
  hf_fixtures.build_and_save(config, model)
  processor.save_pretrained(model)
  return data, model


def _config(data, model, *overrides):
  cfg, _ = config_lib.parse_args(["--config", CONFIG, f"--config.model.path={model}", "--config.data.source=dataset",
                                  f"--config.data.path={data}", "--config.train.epochs=0", "--config.train.steps=2",
                                  "--config.train.batch_size=2", "--config.train.log_every=1",
                                  "--config.eval.batch_size=4", *overrides])
  return cfg


def _logits(hf_model, ours, ids, pixels):
  """Both models on the same causal prompt (no token_type_ids: PixRec's prompts have no bidirectional
  prefix)."""
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pixels)).logits[0].numpy()
  got = _forward(ours, np.asarray([ids]), np.ones((1, len(ids)), np.int32), pixels[None])[0]
  return np.asarray(got), want


_forward = nnx.jit(lambda model, ids, mask, pixels: model(input_ids=ids, attention_mask=mask,
                                                          pixel_values=pixels).logits)


def test_inputs_and_logits_equal_the_hf_processor_and_model(tmp_path, folders):
  data, model = folders
  cfg = _config(data, model, "--config.model.dtype=float32")
  builder = run.setup(cfg, tmp_path).builder
  # The checkpoint's config.json decides the backbone, checked against the config's model_type.
  assert zoo.backbone_config(cfg.model, builder.tokenizer) == BackboneConfig.from_pretrained(model)
  assert cfg.model.model_type == "paligemma"
  assert (builder.layout.style, builder.layout.image_seq_len, builder.images.spec.processor) == (
      "paligemma", 4, "siglip")
  history, target = [0, 1, 3, 2], 4  # Item 3 has no image.
  texts = builder.item_texts
  image = lambda i: "<image>" if SHAPES[i] else ""
  user_text = "".join((prompts.HISTORY_INTRO if k == 0 else prompts.HISTORY_NEXT) + texts[i] + image(i)
                      for k, i in enumerate(history)) + prompts.TARGET_SEPARATOR
  shown = [Image.open(data / f"images/{i:06d}.png") for i in history if SHAPES[i]]
  processor = transformers.AutoProcessor.from_pretrained(model)
  inputs = processor(text=[user_text], images=[shown], return_tensors="np")

  user = builder.user_example(history)
  ids = user["user_ids"][user["user_mask"].astype(bool)]
  assert ids.tolist() == inputs["input_ids"][0].tolist()
  pixels = user["user_images"][user["user_image_valid"]]
  np.testing.assert_allclose(pixels, inputs["pixel_values"], rtol=0, atol=1e-5)
  hf_model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(model).eval()
  ours = pixrec_jax.from_pretrained(model)
  # The processor's own ids and pixels into transformers; ours into our backbone.
  got, want = _logits(hf_model, ours, inputs["input_ids"][0].tolist(), inputs["pixel_values"])
  assert got.shape == want.shape
  np.testing.assert_allclose(_logits(hf_model, ours, ids.tolist(), pixels)[0], want, rtol=0, atol=1e-4)

  ex = builder.train_example(history, target)  # The full prompt: the target and its image follow.
  full = ex["full_ids"][ex["full_mask"].astype(bool)].tolist()
  got, want = _logits(hf_model, ours, full, ex["images"][ex["image_valid"]])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_two_steps_end_to_end_on_a_tiny_checkpoint(tmp_path, folders):
  data, model = folders
  out = run.train_and_evaluate(_config(data, model), tmp_path)
  written = json.loads((tmp_path / "metrics.json").read_text())
  layout = written["report"]["layout"]
  assert (layout["style"], layout["image_size"], layout["image_seq_len"], layout["max_image_tiles"]) == (
      "paligemma", SIZE, 4, 0)
  assert written["report"]["text_only"] is False
  for split in ("valid", "test"):
    assert written[split] == pytest.approx(out[split])
    assert all(0.0 <= v <= 1.0 for v in written[split].values())
  log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
