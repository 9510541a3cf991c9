"""configs/amazon_smolvlm.py end to end: a tiny random SmolVLM checkpoint with its
processor (image splitting on) and a tiny processed dataset with images of
several sizes, all written inside the test."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import pixrec_jax
from pixrec_jax import config_lib
from pixrec_jax.data import catalog, prompts
from pixrec_jax.train import run
from tests import hf_fixtures
from tests import processor_fixtures as pf

CONFIG = "configs/amazon_smolvlm.py"
TITLES = ["Cozy Ceramic Mug", "Sleek Steel Lamp", "Tiny Toy Car", "Plain Notebook", "Wool Scarf", "Glass Vase",
          "Bamboo Board", "Desk Fan", "Linen Towel", "Brass Key Ring"]
# (width, height, mode) of each item's image; None: the item has none.
SHAPES = [(97, 45, "RGB"), (30, 113, "RGBA"), (7, 5, "L"), None, (100, 30, "RGB"), (32, 32, "LA"),
          (40, 100, "RGB"), (150, 64, "RGBA"), (64, 64, "RGB"), (20, 90, "RGB")]


def _write_dataset(root) -> list[str]:
  """Ten items, twelve users of five purchases each; returns the item texts."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir()
  items = []
  for i, (title, shape) in enumerate(zip(TITLES, SHAPES)):
    image = None
    if shape is not None:
      image = f"images/{i:06d}.png"
      pf.random_image(rng, *shape).save(root / image)
    fields = {"title": title, "main_category": "Home", "brand": f"Brand{i % 3}", "price": f"{5 + i}.99"}
    items.append(catalog.Item(item_id=i, fields=fields, image=image))
  users = [catalog.User(user_id=f"u{u}", items=rng.choice(len(items), 5, replace=False).astype(np.int32),
                        timestamps=np.arange(5, dtype=np.int64) * 1000) for u in range(12)]
  catalog.write_dataset(root, name="tiny", source="tests", items=items, users=users, options={},
                        counts={"items": len(items), "users": len(users)})
  return [prompts.render_item_text(item.fields) for item in items]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  data = tmp_path_factory.mktemp("dataset")
  tokenizer = pf.bpe_tokenizer(_write_dataset(data))
  model = tmp_path_factory.mktemp("smolvlm")
  config = transformers.Idefics3Config(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id),
      vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         image_size=32, patch_size=8),
      scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  hf_fixtures.build_and_save(config, model)
  # 32 px tiles, longest edge 64: up to 2 x 2 tiles and the global image, 4 tokens each.
  pf.idefics3_processor(tokenizer, 4, max_image_size={"longest_edge": 32}, size={"longest_edge": 64}).save_pretrained(model)
  return data, model


def test_the_config_has_the_papers_settings_and_names_missing_folders(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"empty: data.path, model.path; set --config.data.path="):
    config_lib.parse_args(["--config", CONFIG])
  cfg, _ = config_lib.parse_args(["--config", CONFIG, "--config.data.path=/data", "--config.model.path=/model"])
  assert (cfg.pixrec.alpha, cfg.pixrec.beta, cfg.pixrec.temperature, cfg.pixrec.pooling) == (0.125, -0.025, 0.5, "mean")
  assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.trainable) == (1e-4, 1, 10, "heads_lm_head")
  assert (cfg.data.source, cfg.data.max_history, cfg.data.template) == ("dataset", 5, prompts.ITEM_TEMPLATE)
  assert cfg.data.length_buckets == 4  # batch 1: each batch cut to the tokens and slots it uses
  library = config_lib.load_config_file(CONFIG)  # Without the command line, the job checks too.
  with pytest.raises(config_lib.ConfigError, match="data.path, model.path"):
    run.setup(library, tmp_path)


def _config(data, model, *overrides):
  cfg, _ = config_lib.parse_args(["--config", CONFIG, f"--config.data.path={data}", f"--config.model.path={model}",
                                  "--config.train.epochs=0", "--config.train.steps=2", "--config.train.batch_size=2",
                                  "--config.train.log_every=1", "--config.eval.batch_size=4", *overrides])
  return cfg


def test_inputs_and_logits_equal_the_hf_processor_and_model(tmp_path, folders):
  data, model = folders
  builder = run.setup(_config(data, model, "--config.model.dtype=float32"), tmp_path).builder
  history, target = [0, 1, 3, 2], 4  # Item 3 has no image.
  assert [builder.images.grid(i) for i in (0, 1, 2, 4)] == [(1, 2), (2, 1), (2, 2), (1, 2)]
  ex = builder.train_example(history, target)
  texts = builder.item_texts
  image = lambda i: "<image>" if SHAPES[i] else ""
  text = "".join((prompts.HISTORY_INTRO if k == 0 else prompts.HISTORY_NEXT) + texts[i] + image(i)
                 for k, i in enumerate(history)) + prompts.TARGET_SEPARATOR + texts[target] + image(target)
  shown = [Image.open(data / f"images/{i:06d}.png") for i in history + [target] if SHAPES[i]]
  inputs = transformers.AutoProcessor.from_pretrained(model)(text=[text], images=[shown], return_tensors="pt")
  ids = ex["full_ids"][ex["full_mask"].astype(bool)]
  assert ids.tolist() == inputs["input_ids"][0].tolist()
  pixels = ex["images"][ex["image_valid"]]
  np.testing.assert_allclose(pixels, inputs["pixel_values"][0].numpy(), rtol=0, atol=1e-5)
  with torch.no_grad():
    want = transformers.Idefics3ForConditionalGeneration.from_pretrained(model).eval()(**inputs).logits[0].numpy()
  got = pixrec_jax.from_pretrained(model)(input_ids=ids[None], attention_mask=np.ones((1, len(ids)), np.int32),
                                          pixel_values=pixels[None]).logits[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


def test_two_steps_end_to_end_on_a_tiny_checkpoint(tmp_path, folders):
  data, model = folders
  out = run.train_and_evaluate(_config(data, model), tmp_path)
  written = json.loads((tmp_path / "metrics.json").read_text())
  layout = written["report"]["layout"]
  assert (layout["image_size"], layout["image_seq_len"], layout["max_image_tiles"]) == (32, 4, 4)
  assert written["report"]["text_only"] is False
  for split in ("valid", "test"):
    assert written[split] == pytest.approx(out[split])
    assert all(0.0 <= v <= 1.0 for v in written[split].values())
    assert written["report"]["splits"][split]["users"] == 12
  log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
