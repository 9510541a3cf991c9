"""Our PaliGemma image preprocessing and prompt tokens against Hugging Face's processor.

Every processor and tokenizer is built locally (tests/processor_fixtures.py); the
reference is transformers' SiglipImageProcessor (PIL backend) and PaliGemmaProcessor
on the same images and the same prompt strings, `<image>` where each image goes.
"""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

from pixrec_jax.data import examples, images, processors, prompts
from tests import processor_fixtures as pf

SIZE = 28
SEQ = 4  # image tokens per image: (28 / 14) ** 2
# (width, height, mode): landscape, portrait, tiny, exact, square-ish, one-pixel sliver, large.
SHAPES = [(97, 45, "RGB"), (30, 113, "RGBA"), (7, 5, "L"), (28, 28, "RGB"), (32, 32, "LA"), (200, 199, "RGB"),
          (1, 50, "RGB"), (150, 64, "RGBA"), (56, 56, "RGB")]


def _assert_pixels(image, spec, hf):
  ours = images.preprocess(image, spec)
  theirs = np.asarray(hf(images=[image])["pixel_values"])
  assert (ours.rows, ours.cols) == (0, 0) and ours.pixels.shape == theirs.shape == (1, 3, spec.size, spec.size)
  np.testing.assert_allclose(ours.pixels, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size,settings", [
    (SIZE, {}),  # SigLIP's defaults: bicubic, mean and std 0.5
    (56, {"resample": Image.BILINEAR, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28],
          "rescale_factor": 1 / 250}),
    (17, {"resample": Image.LANCZOS}),
])
def test_image_preprocessing_matches_hf(size, settings):
  hf = pf.siglip_image_processor(size={"height": size, "width": size}, **settings)
  spec = images.ImageSpec.from_hf_dict(hf.to_dict())
  assert (spec.processor, spec.size, spec.tile_budget, spec.resample) == (
      "siglip", size, 0, settings.get("resample", Image.BICUBIC))
  rng = np.random.default_rng(size)
  for width, height, mode in SHAPES:
    image = pf.random_image(rng, width, height, mode)
    _assert_pixels(image, spec, hf)
    assert images.tile_grid(width, height, spec) == (0, 0)


def _hub_settings(size):
  """preprocessor_config.json as google/paligemma2-3b-pt-224 ships it (at `size` px)."""
  return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
          "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "image_seq_length": SEQ,
          "image_std": [0.5, 0.5, 0.5], "processor_class": "PaliGemmaProcessor", "resample": 3,
          "rescale_factor": 0.00392156862745098, "size": {"height": size, "width": size}}


def test_hub_settings_convert_images_to_rgb():
  assert images.ImageSpec.from_hf_dict(_hub_settings(224)) == images.ImageSpec.default(224, "siglip")
  hf = transformers.SiglipImageProcessorPil.from_dict(_hub_settings(SIZE))
  spec = images.ImageSpec.from_hf_dict(hf.to_dict())
  rng = np.random.default_rng(5)
  _assert_pixels(pf.random_image(rng, 40, 30), spec, hf)
  # Unset do_convert_rgb: transformers fails on other modes; we convert as do_convert_rgb=True does.
  grey = pf.random_image(rng, 40, 30, "LA")
  with pytest.raises(ValueError, match="mean must have 2 elements"):
    hf(images=[grey])
  _assert_pixels(grey, spec, pf.siglip_image_processor(size={"height": SIZE, "width": SIZE}))


def test_unsupported_settings_are_refused():
  settings = _hub_settings(SIZE)
  for change, message in [({"size": {"height": 28, "width": 56}}, "size must be"),
                          ({"size": {"shortest_edge": 28}}, "size must be"),
                          ({"do_center_crop": True}, "only SigLIP's one resize"),
                          ({"do_resize": False}, "only SigLIP's one resize")]:
    with pytest.raises(ValueError, match=message):
      images.ImageSpec.from_hf_dict({**settings, **change})
  with pytest.raises(ValueError, match="siglip squashes every image"):
    images.ImageSpec(SIZE, do_image_splitting=True, processor="siglip")


# -- prompt tokens ------------------------------------------------------------------

ITEMS = [  # (fields, image shape or None)
    ({"title": "Cozy Ceramic Mug", "main_category": "Home & Kitchen", "brand": "Acme", "price": "12.99"}, (97, 45, "RGB")),
    ({"title": "Sleek Steel Lamp", "brand": "Lumen"}, (30, 113, "RGBA")),
    ({"title": "Tiny Toy Car", "main_category": "Toys", "price": "3.5"}, (7, 5, "L")),
    ({"title": "Plain Notebook", "brand": "Paper Co."}, None),
    ({"title": "Wool Scarf", "main_category": "Fashion", "brand": "Knit", "price": "25"}, (100, 30, "RGB")),
    ({"title": "Glass Vase", "price": "40"}, (32, 32, "LA")),
    ({"title": "Bamboo Cutting Board", "main_category": "Home & Kitchen"}, None),
    ({"title": "Desk Fan\nwith two speeds", "brand": "Breeze"}, (150, 64, "RGBA")),
]
# Images everywhere; the last history item without one; the target without one; no history image;
# nothing with an image at all.
HISTORIES = [([0, 1, 2], 4), ([4, 5, 3], 7), ([5, 6, 7, 0], 3), ([3, 6], 1), ([3], 6)]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(4)
  texts, paths = [], []
  for i, (fields, shape) in enumerate(ITEMS):
    texts.append(prompts.render_item_text(fields))
    if shape is None:
      paths.append(None)
    else:
      paths.append(root / f"{i}.png")
      pf.random_image(rng, *shape).save(paths[-1])
  return texts, paths


@pytest.fixture(scope="module")
def processor(catalogue):
  return pf.paligemma_processor(pf.gemma_tokenizer(catalogue[0]), SEQ, SIZE)


@pytest.fixture(scope="module", params=[True, False], ids=["tokenizer_adds_bos", "tokenizer_adds_nothing"])
def tokenizer(request, processor, tmp_path_factory):
  """The processor's tokenizer as our loader reads it: with its BOS on, as the Hub's tokenizer_config.json
  has it, or off, as the processor leaves it (and saves it)."""
  path = tmp_path_factory.mktemp("tokenizer")
  processor.tokenizer.save_pretrained(path)
  tok = processors.load_tokenizer(path)
  tok.add_bos_token = request.param
  assert (tok("Mug")["input_ids"][0] == tok.bos_token_id) == request.param
  return tok


def _builder(catalogue, tokenizer, processor, text_only=False):
  texts, paths = catalogue
  spec = images.ImageSpec.from_hf_dict(processor.image_processor.to_dict())
  layout = examples.PromptBuilder.plan(tokenizer, texts, max_history=4, image_seq_len=0 if text_only else SEQ,
                                       image_size=SIZE, style="paligemma")
  return examples.PromptBuilder(tokenizer, texts, None if text_only else images.ImageStore(paths, spec), layout)


def _prompt(texts, history, with_images):
  """The PixRec user prompt as one string, `<image>` wherever an item's image goes."""
  image = lambda i: "<image>" if with_images[i] else ""
  text = "".join((prompts.HISTORY_INTRO if k == 0 else prompts.HISTORY_NEXT) + texts[item] + image(item)
                 for k, item in enumerate(history))
  return text + prompts.TARGET_SEPARATOR


def _hf(processor, text, paths, **kwargs):
  """The processor's output for text with in-text `<image>`s. It refuses text without images; that is
  its formula for no images instead: BOS, text, "\\n" (the tokenizer adding nothing itself)."""
  if not paths:
    with pytest.raises(ValueError, match="`images` are expected"):
      processor(text=[text])
    return {"input_ids": [processor.tokenizer.bos_token_id] + _tokens(processor, text + "\n")}, None
  out = processor(text=[text], images=[[Image.open(p) for p in paths]], **kwargs)
  return {k: list(v[0]) for k, v in out.items() if k in ("input_ids", "token_type_ids")}, \
      np.asarray(out["pixel_values"])


def _tokens(processor, text):
  return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _real(ids, mask):
  return ids[mask.astype(bool)].tolist()


def test_prompt_tokens_and_pixels_equal_the_hf_processor(catalogue, processor, tokenizer):
  texts, paths = catalogue
  builder = _builder(catalogue, tokenizer, processor)
  has = [p is not None for p in paths]
  layout = builder.layout
  assert (layout.style, layout.image_slots, layout.max_image_tiles, builder.prefix) == ("paligemma", 1, 0, [])
  for history, target in HISTORIES:
    user_text = _prompt(texts, history, has)
    target_text = texts[target] + ("<image>" if has[target] else "")
    shown = [paths[i] for i in history if has[i]]

    # The user segment, in training and at evaluation, is the processor's prompt for the history.
    want_user, user_pixels = _hf(processor, user_text, shown)
    ex = builder.train_example(history, target)
    user = builder.user_example(history)
    assert _real(ex["full_ids"], ex["user_mask"]) == _real(user["user_ids"], user["user_mask"]) \
        == want_user["input_ids"]
    if shown:
      np.testing.assert_allclose(user["user_images"][user["user_image_valid"]], user_pixels, rtol=0, atol=1e-5)

    # The target follows as the processor's suffix, tokenised on its own, with its image in place.
    suffix = _tokens(processor, texts[target]) + [processor.image_token_id] * (SEQ if has[target] else 0)
    assert _real(ex["full_ids"], ex["full_mask"]) == want_user["input_ids"] + suffix
    if shown and not has[target]:  # The one case the processor's suffix can express.
      out, _ = _hf(processor, user_text, shown, suffix=texts[target])
      assert out["input_ids"] == _real(ex["full_ids"], ex["full_mask"]) + [processor.tokenizer.eos_token_id]
      assert out["token_type_ids"][:-1] == _real(ex["target_mask"], ex["full_mask"])
    want_images = shown + ([paths[target]] if has[target] else [])
    if want_images:
      _, full_pixels = _hf(processor, user_text + target_text, want_images)
      np.testing.assert_allclose(ex["images"][ex["image_valid"]], full_pixels, rtol=0, atol=1e-5)
    assert int(ex["target_slot"]) == len(shown)
    nig = ex["nig_labels"][ex["nig_weights"] > 0].tolist()
    assert nig == _tokens(processor, texts[target])[:layout.max_item_tokens]

    # An item read alone is the processor's prompt for it.
    item = builder.item_example(target)
    want_item, item_pixels = _hf(processor, target_text, [paths[target]] if has[target] else [])
    assert _real(item["item_ids"], item["item_mask"]) == want_item["input_ids"] \
        == _real(ex["item_ids"], ex["item_mask"])
    if has[target]:
      np.testing.assert_allclose(item["item_images"][item["item_image_valid"]], item_pixels, rtol=0, atol=1e-5)


def test_one_bos_right_after_the_last_image(catalogue, processor, tokenizer):
  builder = _builder(catalogue, tokenizer, processor)
  bos, image = tokenizer.bos_token_id, processor.image_token_id
  for history in ([0, 3], [3, 0], [3, 6]):  # Items 3 and 6 have no image.
    ids = builder.user_segment(history)[0]
    last_image = max((i for i, t in enumerate(ids) if t == image), default=-1)
    assert ids.count(bos) == 1 and ids.index(bos) == last_image + 1


def test_text_only_prompts_follow_the_processors_formula(catalogue, processor, tokenizer):
  texts, _ = catalogue
  builder = _builder(catalogue, tokenizer, processor, text_only=True)
  bos = [processor.tokenizer.bos_token_id]
  for history, target in HISTORIES:
    user_text = _prompt(texts, history, [False] * len(texts))
    ex = builder.train_example(history, target)
    assert _real(ex["full_ids"], ex["full_mask"]) == bos + _tokens(processor, user_text + "\n") \
        + _tokens(processor, texts[target])
    assert _real(ex["item_ids"], ex["item_mask"]) == bos + _tokens(processor, texts[target] + "\n")


def test_layout_and_store_mismatches_fail_clearly(catalogue, processor, tokenizer):
  builder = _builder(catalogue, tokenizer, processor)
  with pytest.raises(ValueError, match="one tile each, not a 1 x 2 grid"):
    builder.image_block(1, 2)
  texts, paths = catalogue
  idefics3 = images.ImageStore(paths, images.ImageSpec(SIZE))
  with pytest.raises(ValueError, match="makes idefics3 tiles, but paligemma prompts stand for siglip tiles"):
    examples.PromptBuilder(tokenizer, texts, idefics3, builder.layout)
  with pytest.raises(ValueError, match="max_image_tiles must be 0"):
    examples.PromptBuilder.plan(tokenizer, texts, max_history=2, image_seq_len=SEQ, image_size=SIZE,
                                max_image_tiles=4, style="paligemma")


# -- loading from a checkpoint directory ---------------------------------------------


@pytest.mark.parametrize("layout", ["processor", "hub"])
def test_settings_load_from_a_saved_processor(tmp_path, processor, catalogue, layout):
  if layout == "processor":  # transformers 5: one processor_config.json
    processor.save_pretrained(tmp_path)
  else:  # as google/paligemma2-3b-pt-224 ships: everything in preprocessor_config.json
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_hub_settings(SIZE)))
  spec, seq = processors.load_image_spec(tmp_path)
  assert (spec, seq) == (images.ImageSpec.default(SIZE, "siglip"), SEQ)
  assert processors.image_spec_for(tmp_path, tile_size=SIZE, image_seq_len=SEQ) == spec
  with pytest.raises(ValueError, match="makes 28 px tiles"):
    processors.image_spec_for(tmp_path, tile_size=224, image_seq_len=SEQ)
  with pytest.raises(ValueError, match="4 <image> tokens per tile"):
    processors.image_spec_for(tmp_path, tile_size=SIZE, image_seq_len=256)
  text = catalogue[0][0] + "<image>\n"
  assert processors.load_tokenizer(tmp_path)(text, add_special_tokens=False)["input_ids"] \
      == processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_random_init_uses_the_familys_defaults():
  assert processors.default_image_spec("paligemma", 224) == images.ImageSpec.default(224, "siglip")
  assert processors.default_image_spec("idefics3", 32) == images.ImageSpec(32)
  assert examples.prompt_style("paligemma") == "paligemma"
  assert examples.prompt_style("idefics3") == examples.prompt_style("llama") == "idefics3"
