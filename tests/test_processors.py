"""Our Idefics3 image preprocessing and prompt tokens against Hugging Face's processor.

Every processor and tokenizer is built locally (tests/processor_fixtures.py); the
reference is transformers' Idefics3ImageProcessor (PIL backend) and
Idefics3Processor on the same images and the same prompt strings.
"""

import json
import pickle

import numpy as np
import pytest
import transformers
from flax import nnx
from PIL import Image

from pixrec_jax.data import examples, images, processors, prompts
from pixrec_jax.data import tokenizer as word_tokenizer
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, TextConfig, VisionConfig
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from tests import processor_fixtures as pf

TILE = 32
SEQ = 4  # image tokens per tile: (32 / 8) ** 2 / 2 ** 2
# (width, height, mode): landscape, portrait, tiny, exact multiples, square-ish, a one-pixel sliver.
SHAPES = [(97, 45, "RGB"), (30, 113, "RGBA"), (7, 5, "L"), (64, 64, "RGB"), (32, 32, "LA"), (200, 199, "RGB"),
          (33, 97, "RGB"), (1, 50, "RGB"), (150, 64, "RGBA")]


def _hf_tiles(processor, image, **kwargs):
  out = processor(images=[image], return_row_col_info=True, **kwargs)
  assert np.asarray(out["pixel_attention_mask"]).all()  # Every tile is a full TILE x TILE image.
  return np.asarray(out["pixel_values"])[0], out["rows"][0][0], out["cols"][0][0]


def _assert_same(ours: images.Tiles, theirs):
  pixels, rows, cols = theirs
  assert (ours.rows, ours.cols) == (rows, cols)
  assert ours.pixels.shape == pixels.shape
  np.testing.assert_allclose(ours.pixels, pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("longest_edge", [TILE, 2 * TILE, 3 * TILE, 100])
def test_image_preprocessing_matches_hf(split, longest_edge):
  hf = pf.image_processor(max_image_size={"longest_edge": TILE}, size={"longest_edge": longest_edge},
                          do_image_splitting=split)
  spec = images.ImageSpec.from_hf_dict(hf.to_dict())
  rng = np.random.default_rng(longest_edge)
  for width, height, mode in SHAPES:
    image = pf.random_image(rng, width, height, mode)
    ours = images.preprocess(image, spec)
    _assert_same(ours, _hf_tiles(hf, image))
    assert ours.rows * ours.cols <= spec.tile_budget
    assert images.tile_grid(width, height, spec) == (ours.rows, ours.cols)


def test_other_filters_and_normalisations_match_hf():
  hf = pf.image_processor(max_image_size={"longest_edge": TILE}, size={"longest_edge": 80}, resample=Image.BICUBIC,
                          image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28], rescale_factor=1 / 250)
  spec = images.ImageSpec.from_hf_dict(hf.to_dict())
  assert spec.resample == Image.BICUBIC and spec.mean == (0.48, 0.46, 0.41)
  rng = np.random.default_rng(1)
  for width, height, mode in SHAPES[:4]:
    image = pf.random_image(rng, width, height, mode)
    _assert_same(images.preprocess(image, spec), _hf_tiles(hf, image))


def test_over_budget_images_are_processed_at_a_shorter_longest_edge():
  hf = pf.image_processor(max_image_size={"longest_edge": TILE}, size={"longest_edge": 4 * TILE})
  unbounded = images.ImageSpec.from_hf_dict(hf.to_dict())
  assert unbounded.tile_budget == 16
  spec = images.ImageSpec.from_hf_dict(hf.to_dict(), max_tiles=4)
  rng = np.random.default_rng(2)
  # Square: 4 x 4 tiles at 128 px, 3 x 3 at 96, 2 x 2 at 64. 2:1: 2 x 4 at 128, 2 x 3 at 96, 1 x 2 at 64.
  for (width, height), edge, grid in [((90, 90), 2 * TILE, (2, 2)), ((120, 60), 2 * TILE, (1, 2)),
                                      ((40, 120), 3 * TILE, (3, 1))]:
    image = pf.random_image(rng, width, height)
    assert np.prod(images.tile_grid(width, height, unbounded)) > 4
    ours = images.preprocess(image, spec)
    assert (ours.rows, ours.cols) == grid
    _assert_same(ours, _hf_tiles(hf, image, size={"longest_edge": edge}))


def test_the_demo_spec_is_idefics3_without_splitting():
  hf = pf.image_processor(max_image_size={"longest_edge": TILE}, size={"longest_edge": TILE},
                          do_image_splitting=False)
  assert images.ImageSpec.from_hf_dict(hf.to_dict()) == images.ImageSpec(TILE)
  # A square TILE x TILE image (the synthetic catalogue's) passes both resizes unchanged.
  image = pf.random_image(np.random.default_rng(3), TILE, TILE)
  simple = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
  np.testing.assert_allclose(images.preprocess(image, images.ImageSpec(TILE)).pixels[0], simple, atol=1e-6)


def test_unsupported_settings_are_refused():
  settings = pf.image_processor(max_image_size={"longest_edge": TILE}).to_dict()
  with pytest.raises(ValueError, match="image_processor_type 'CLIPImageProcessor' is not supported"):
    images.ImageSpec.from_hf_dict({**settings, "image_processor_type": "CLIPImageProcessor"})
  with pytest.raises(ValueError, match="size must be"):
    images.ImageSpec.from_hf_dict({**settings, "size": {"height": 64, "width": 64}})
  with pytest.raises(ValueError, match="set max_tiles"):
    images.ImageSpec(TILE, do_resize=False, do_image_splitting=True)


# -- prompt tokens ------------------------------------------------------------------

ITEMS = [  # (fields, image shape or None)
    ({"title": "Cozy Ceramic Mug", "main_category": "Home & Kitchen", "brand": "Acme", "price": "12.99"}, (97, 45, "RGB")),
    ({"title": "Sleek Steel Lamp", "brand": "Lumen"}, (30, 113, "RGBA")),
    ({"title": "Tiny Toy Car", "main_category": "Toys", "price": "3.5"}, (7, 5, "L")),
    ({"title": "Plain Notebook", "brand": "Paper Co."}, None),
    ({"title": "Wool Scarf", "main_category": "Fashion", "brand": "Knit", "price": "25"}, (100, 30, "RGB")),
    ({"title": "Glass Vase", "price": "40"}, (32, 32, "LA")),
    ({"title": "Bamboo Cutting Board", "main_category": "Home & Kitchen"}, (40, 100, "RGB")),
    ({"title": "Desk Fan\nwith two speeds", "brand": "Breeze"}, (150, 64, "RGBA")),
]
HISTORIES = [([0, 1, 2], 4), ([3, 4], 5), ([5, 6, 7, 0], 1), ([2], 3), ([3], 7)]


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
def tokenizer(catalogue):
  return pf.bpe_tokenizer(catalogue[0])


def _processor(tokenizer, split):
  return pf.idefics3_processor(tokenizer, SEQ, max_image_size={"longest_edge": TILE}, size={"longest_edge": 3 * TILE},
                               do_image_splitting=split)


def _builder(catalogue, processor):
  texts, paths = catalogue
  spec = images.ImageSpec.from_hf_dict(processor.image_processor.to_dict())
  layout = examples.PromptBuilder.plan(processor.tokenizer, texts, max_history=4, image_seq_len=SEQ, image_size=TILE,
                                       max_image_tiles=spec.tile_budget)
  return examples.PromptBuilder(processor.tokenizer, texts, images.ImageStore(paths, spec), layout)


@pytest.fixture(scope="module", params=[True, False], ids=["split", "no_split"])
def processor(request, tokenizer):
  return _processor(tokenizer, request.param)


@pytest.fixture(scope="module")
def split_processor(tokenizer):
  return _processor(tokenizer, True)


@pytest.fixture(scope="module")
def split_builder(catalogue, split_processor):
  return _builder(catalogue, split_processor)


def _prompt(texts, history, with_images):
  """The PixRec prompt as one string, `<image>` wherever an item's image goes."""
  image = lambda i: "<image>" if with_images[i] else ""
  text = "".join((prompts.HISTORY_INTRO if k == 0 else prompts.HISTORY_NEXT) + texts[item] + image(item)
                 for k, item in enumerate(history))
  return text + prompts.TARGET_SEPARATOR


def _hf(processor, text, paths):
  opened = [Image.open(p) for p in paths]
  out = processor(text=[text], images=[opened] if opened else None)
  return out["input_ids"][0], (np.asarray(out["pixel_values"])[0] if opened else None)


def _real(ids, mask):
  return ids[mask.astype(bool)].tolist()


def test_prompt_tokens_and_pixels_equal_the_hf_processor(catalogue, processor):
  texts, paths = catalogue
  builder = _builder(catalogue, processor)
  with_images = [p is not None for p in paths]
  grids = {tuple(builder.images.grid(i)) for i, p in enumerate(paths) if p is not None}
  split = processor.image_processor.do_image_splitting
  assert grids == ({(2, 3), (3, 1), (3, 3), (1, 3), (3, 2)} if split else {(0, 0)})
  for history, target in HISTORIES:
    user_text = _prompt(texts, history, with_images)
    target_text = texts[target] + ("<image>" if with_images[target] else "")
    shown = [paths[i] for i in history if paths[i] is not None]
    want_paths = shown + ([paths[target]] if with_images[target] else [])

    ex = builder.train_example(history, target)
    want_ids, want_pixels = _hf(processor, user_text + target_text, want_paths)
    assert _real(ex["full_ids"], ex["full_mask"]) == want_ids
    assert _real(ex["full_ids"], ex["user_mask"]) == _hf(processor, user_text, shown)[0]
    np.testing.assert_allclose(ex["images"][ex["image_valid"]], want_pixels, rtol=0, atol=1e-5)
    history_tiles = sum(r * c + 1 for r, c in map(builder.images.grid, [i for i in history if with_images[i]]))
    assert int(ex["target_slot"]) == history_tiles

    user = builder.user_example(history)
    assert _real(user["user_ids"], user["user_mask"]) == _hf(processor, user_text, shown)[0]
    assert user["user_image_valid"].sum() == history_tiles

    item = builder.item_example(target)
    item_ids, item_pixels = _hf(processor, target_text, [paths[target]] if with_images[target] else [])
    assert _real(item["item_ids"], item["item_mask"]) == item_ids == _real(ex["item_ids"], ex["item_mask"])
    if with_images[target]:
      np.testing.assert_allclose(item["item_images"][item["item_image_valid"]], item_pixels, rtol=0, atol=1e-5)


def test_text_only_prompt_tokens_equal_the_hf_processor(catalogue, split_processor):
  processor = split_processor
  texts, _ = catalogue
  layout = examples.PromptBuilder.plan(processor.tokenizer, texts, max_history=4, image_seq_len=0, image_size=0)
  builder = examples.PromptBuilder(processor.tokenizer, texts, None, layout)
  for history, target in HISTORIES:
    ex = builder.train_example(history, target)
    text = _prompt(texts, history, [False] * len(texts)) + texts[target]
    assert _real(ex["full_ids"], ex["full_mask"]) == _hf(processor, text, [])[0]


def test_slots_are_static_and_the_layout_fits_the_largest_block(split_builder):
  builder = split_builder
  layout = builder.layout
  assert layout.max_image_tiles == 9 and layout.image_slots == 10
  ex = builder.train_example([0, 1, 2], 4)
  assert ex["images"].shape == (5 * 10, 3, TILE, TILE) and ex["image_valid"].shape == (50,)
  assert builder.user_example([0])["user_images"].shape == (4 * 10, 3, TILE, TILE)
  assert builder.item_example(3)["item_images"].shape == (10, 3, TILE, TILE)
  # "\n" and "\n\n" are one token each here. The plan's bound puts every tile in its own row.
  bound = 9 * (SEQ + 2) + 8 + 1 + SEQ + 3
  assert len(builder.image_block(3, 3)) == 9 * (SEQ + 2) + 2 + 1 + SEQ + 3 <= bound
  assert layout.item_len >= len(builder.prefix) + layout.max_item_tokens + bound


def test_the_store_caches_within_its_byte_budget_and_pickles(catalogue, split_processor):
  _, paths = catalogue
  spec = images.ImageSpec.from_hf_dict(split_processor.image_processor.to_dict())
  store = images.ImageStore(paths, spec, cache_bytes=10 * TILE * TILE * 3)  # Ten uint8 tiles.
  first = store.get_raw(0)  # 2 x 3 tiles + global: 7
  assert store.get_raw(0) is first and not first.pixels.flags.writeable and first.pixels.dtype == np.uint8
  # get() is the processor's float32 pixels of the cached bytes, and the pixel table gives them bit for bit.
  np.testing.assert_array_equal(store.get(0).pixels, images.load(paths[0], spec).pixels)
  np.testing.assert_array_equal(store.get(0).pixels, images.normalize(first.pixels, spec))
  lut = images.pixel_lut(spec)
  np.testing.assert_array_equal(lut[np.arange(3)[:, None, None], first.pixels], store.get(0).pixels)
  store.get_raw(1)  # 3 x 1 + 1 = 4 more: the oldest entry goes.
  assert store.get_raw(0) is not first and store.grid(1) == (3, 1)
  copy = pickle.loads(pickle.dumps(store))  # As grain worker processes receive it.
  np.testing.assert_array_equal(copy.get(2).pixels, store.get(2).pixels)
  with pytest.raises(ValueError, match="item 3 has no image"):
    store.get(3)


def test_a_grid_without_tile_tokens_fails_clearly(split_builder):
  with pytest.raises(ValueError, match="no '<row_7_col_1>' token"):
    split_builder.image_block(7, 1)


def test_item_pass_reuses_the_targets_tiles(split_builder, tokenizer):
  builder, tok = split_builder, tokenizer
  text = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=TILE, patch_size=8)
  cfg = BackboneConfig("idefics3", text, vision, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
  assert cfg.image_seq_len == SEQ
  model = PixRec(Backbone(cfg, rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=8), rngs=nnx.Rngs(1))
  cases = [([0, 1, 2], 4), ([3, 4], 5), ([5, 6], 1)]  # Split targets after split and unsplit histories.
  train = [builder.train_example(h, t) for h, t in cases]
  batch = {k: np.stack([ex[k] for ex in train]) for k in train[0]}
  items = [builder.item_example(t) for _, t in cases]
  alone = {k: np.stack([ex[k] for ex in items]) for k in items[0]}
  # Jitted: op-by-op, the two passes took most of a minute on a CPU.
  got = nnx.jit(lambda model, batch: model.train_outputs(batch)["item"])(model, batch)
  want = nnx.jit(lambda model, b: model.item_embedding(b["item_ids"], b["item_mask"], b["item_images"],
                                                      b["item_image_valid"]))(model, alone)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# -- loading from a checkpoint directory ---------------------------------------------


@pytest.mark.parametrize("layout", ["processor", "hub"])
def test_settings_load_from_a_saved_processor(tmp_path, split_processor, catalogue, layout):
  processor = split_processor
  if layout == "processor":  # transformers 5: one processor_config.json
    processor.save_pretrained(tmp_path)
  else:  # as SmolVLM-256M-Instruct ships: image settings in preprocessor_config.json
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"image_seq_len": SEQ, "processor_class": "Idefics3Processor"}))
  spec, seq = processors.load_image_spec(tmp_path, max_tiles=4)
  assert seq == SEQ
  assert spec == images.ImageSpec.from_hf_dict(processor.image_processor.to_dict(), max_tiles=4)
  tok = processors.load_tokenizer(tmp_path)
  text = catalogue[0][0] + "<image>\n<row_1_col_2>"
  assert tok(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
  assert processors.image_spec_for(tmp_path, tile_size=TILE, image_seq_len=SEQ).tile_budget == 9
  with pytest.raises(ValueError, match="makes 32 px tiles"):
    processors.image_spec_for(tmp_path, tile_size=64, image_seq_len=SEQ)
  with pytest.raises(ValueError, match="4 <image> tokens per tile"):
    processors.image_spec_for(tmp_path, tile_size=TILE, image_seq_len=16)


def test_the_generic_fast_tokenizer_loads_like_autotokenizer_and_model_tokenizers_still_go_through_it(tmp_path):
  texts = ["Blue ceramic mug", "Red wool scarf, large", "Mug (blue)"]
  plain = word_tokenizer.build_word_tokenizer(texts, tmp_path / "plain")
  assert json.loads((plain / "tokenizer_config.json").read_text())["tokenizer_class"] in processors._PLAIN_FAST_TOKENIZERS
  gemma = tmp_path / "gemma"
  pf.gemma_tokenizer(texts).save_pretrained(gemma)
  for path in (plain, gemma):
    ours, auto = processors.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(auto)
    assert [ours(t)["input_ids"] for t in texts] == [auto(t)["input_ids"] for t in texts]
    assert ours.pad_token_id == auto.pad_token_id and len(ours) == len(auto)
  assert type(processors.load_tokenizer(gemma)).__name__ != type(processors.load_tokenizer(plain)).__name__
  (plain / "tokenizer_config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="tokenizer_config.json: not a JSON object"):
    processors.load_tokenizer(plain)


def test_missing_tokenizer_or_processor_is_named(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    processors.load_tokenizer(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="has no tokenizer"):
    processors.load_tokenizer(tmp_path)
  tokenizer.save_pretrained(tmp_path)
  assert processors.load_tokenizer(tmp_path)("Mug")["input_ids"] == tokenizer("Mug")["input_ids"]
  with pytest.raises(FileNotFoundError, match="has no image processor"):
    processors.load_image_spec(tmp_path)
