"""Export to PyTorch: train a few steps, export, reload with transformers, compare with Flax (float32).

Two families: the SmolVLM family (an Idefics3 backbone, reading images) and the
text-only family (a Llama backbone from a tiny local Hugging Face checkpoint).
"""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixrec_jax import export
from pixrec_jax.convert import torch_heads
from pixrec_jax.data import pipeline, synthetic
from pixrec_jax.train import run
from tests import hf_fixtures as fx
from tests import run_fixtures as rf

TOL = 1e-4
STEPS = 4


def _train(workdir, **overrides):
  rf.check(rf.run(rf.main_args(workdir, train__steps=STEPS, checkpoint__every_steps=STEPS, **overrides)))
  return run.restore_trained(workdir, "latest")


def _batches(builder, n=6):
  """An item batch (items read alone) and a user batch (history-only prompts with several items)."""
  items = next(iter(pipeline.catalog_dataset(builder, list(range(n)), n)))
  histories = [np.arange(i, i + 1 + i % 4) for i in range(n)]
  users = next(iter(pipeline.user_dataset(builder, histories, n)))
  return items, users


def _torch(x):
  x = np.asarray(x)
  return torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "iub" else x.astype(np.float32))


def _assert_close(want, got, what, mask=None):
  want, got = np.asarray(want), np.asarray(got)
  if mask is not None:
    want, got = want[mask.astype(bool)], got[mask.astype(bool)]
  diff = float(np.abs(want - got).max())
  assert diff < TOL, f"{what}: max abs difference {diff:.2e} exceeds {TOL}"


# Our side of each comparison, jitted (op by op, these passes took half of a round trip's minute on a CPU).
_backbone_logits = nnx.jit(lambda model, ids, mask, pixels: model.backbone(input_ids=ids, attention_mask=mask,
                                                                         pixel_values=pixels).logits)
_item_embedding = nnx.jit(lambda model, *args: model.item_embedding(*args))
_user_embedding = nnx.jit(lambda model, *args: model.user_embedding(*args))


def _check_round_trip(trained, out, auto_class):
  meta = export.export_trained(trained, out)
  model = trained.model()
  hf_model = auto_class.from_pretrained(str(out), use_safetensors=True, dtype=torch.float32).eval()
  ours = torch_heads.PixRecTorch.from_pretrained(out)
  items, users = _batches(trained.job.builder)
  images = not meta["text_only"]
  for prefix, batch in (("item", items), ("user", users)):
    ids, mask = batch[f"{prefix}_ids"], batch[f"{prefix}_mask"]
    pixels = valid = None
    if images:
      valid = batch[f"{prefix}_image_valid"]
      pixels = batch[f"{prefix}_images"] * valid[:, :, None, None, None]  # transformers reads zeros as no image
    logits = _backbone_logits(model, ids, mask, pixels)
    kwargs = {"pixel_values": _torch(pixels)} if images else {}
    with torch.no_grad():
      hf_logits = hf_model(input_ids=_torch(ids), attention_mask=_torch(mask), **kwargs).logits.numpy()
    _assert_close(logits, hf_logits, f"{prefix} prompts: logits", mask)

  images_of = lambda b, p: (b[f"{p}_images"], b[f"{p}_image_valid"]) if images else (None, None)
  want = _item_embedding(model, items["item_ids"], items["item_mask"], *images_of(items, "item"))
  pixels, valid = images_of(items, "item")
  with torch.no_grad():
    got = ours.item_embedding(_torch(items["item_ids"]), _torch(items["item_mask"]),
                              None if pixels is None else _torch(pixels), None if valid is None else _torch(valid))
  _assert_close(want, got.numpy(), "item embeddings")
  want = _user_embedding(model, users["user_ids"], users["user_mask"], users["user_mask"], *images_of(users, "user"))
  pixels, valid = images_of(users, "user")
  with torch.no_grad():
    got = ours.user_embedding(_torch(users["user_ids"]), _torch(users["user_mask"]), _torch(users["user_mask"]),
                              None if pixels is None else _torch(pixels), None if valid is None else _torch(valid))
  _assert_close(want, got.numpy(), "user embeddings")
  return meta


def test_smolvlm_family_round_trip_matches_flax(tmp_path):
  trained = _train(tmp_path / "run", config="configs/demo.py")
  meta = _check_round_trip(trained, tmp_path / "export", transformers.AutoModelForImageTextToText)
  assert meta["architecture"] == "Idefics3ForConditionalGeneration" and meta["step"] == STEPS
  out = tmp_path / "export"
  processor = transformers.AutoProcessor.from_pretrained(str(out))
  assert processor.image_seq_len == trained.model().backbone.cfg.image_seq_len
  assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == len(trained.job.builder.tokenizer)
  assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_text_only_llama_round_trip_matches_flax(tmp_path):
  # The run's synthetic data, made first so that the checkpoint's vocabulary is its tokenizer's.
  options = synthetic.SyntheticOptions(num_users=rf.TINY["data.synthetic.num_users"],
                                       num_groups=rf.TINY["data.synthetic.num_groups"])
  dataset = synthetic.generate(tmp_path / "run" / "data", options)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(dataset.tokenizer_path))
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
  fx.build_and_save(config, tmp_path / "llama")
  tokenizer.save_pretrained(tmp_path / "llama")
  trained = _train(tmp_path / "run", model__path=tmp_path / "llama")
  meta = _check_round_trip(trained, tmp_path / "export", transformers.AutoModelForCausalLM)
  assert meta["architecture"] == "LlamaForCausalLM" and meta["text_only"]
  assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llama"
  assert not (tmp_path / "export" / "processor_config.json").exists()


def test_export_refuses_to_write_over_the_run_or_an_existing_folder(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "run")]) == 1
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "run" / "checkpoints" / "x")]) == 1
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "taken")]) == 1
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "new")]) == 1  # nothing trained
  assert (tmp_path / "taken" / "file").read_text() == "x" and not (tmp_path / "new").exists()


def test_heads_read_only_their_own_format(tmp_path):
  (tmp_path / torch_heads.CONFIG_FILE).write_text(json.dumps({"format": "other", "version": 1}))
  with pytest.raises(ValueError, match="expected 'pixrec_jax.export'"):
    torch_heads.PixRecHeads.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory written by"):
    torch_heads.PixRecHeads.from_pretrained(tmp_path / "nothing")
