"""Training PixRec on a local Hugging Face checkpoint: the weights load onto the model."""

import json

import numpy as np
import transformers

from pixrec_jax import config_lib
from pixrec_jax.convert.hf import param_table
from pixrec_jax.convert.safetensors_io import CheckpointReader
from pixrec_jax.train import run
from tests import hf_fixtures as fx
from tests import processor_fixtures as pf


def _checkpoint(tmp_path, tokenizer):
  """A tiny random SmolVLM-family checkpoint whose vocabulary is the synthetic tokenizer's."""
  config = transformers.Idefics3Config(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       tie_word_embeddings=False),
      vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         image_size=32, patch_size=8),
      scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  path = tmp_path / "ckpt"
  fx.build_and_save(config, path)
  tokenizer.save_pretrained(path)
  # The processor files as SmolVLM checkpoints ship them; no splitting, since the word
  # tokenizer has no tile tokens.
  pf.image_processor(max_image_size={"longest_edge": 32}, size={"longest_edge": 32},
                     do_image_splitting=False).save_pretrained(path)
  (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4, "processor_class": "Idefics3Processor"}))
  return path


def test_backbone_weights_come_from_the_checkpoint(tmp_path, small_dataset, word_tokenizer):
  ckpt = _checkpoint(tmp_path, word_tokenizer)
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py"])
  for key, value in {"model.path": str(ckpt), "data.source": "dataset", "data.path": str(small_dataset.path),
                     "train.trainable": "heads_lm_head", "train.steps": "2", "train.batch_size": "4",
                     "eval.batch_size": "32"}.items():
    config_lib.override(cfg, key, value)
  job = run.setup(cfg, tmp_path / "work")
  state = run.init_state(job)
  state, _ = run.train(job, state)
  model = job.trainer.model(state)
  reader = CheckpointReader(ckpt)
  for entry in param_table(model.backbone.cfg):
    node = model.backbone
    for key in entry.path:
      node = node[key] if isinstance(key, int) else getattr(node, key)
    want = entry.transform.to_ours(reader.get(entry.hf_name))
    if entry.hf_name == "lm_head.weight":
      assert not np.allclose(np.asarray(node[...]), want), "the LM head trains in heads_lm_head mode"
    else:
      np.testing.assert_array_equal(np.asarray(node[...]), want, err_msg=entry.hf_name)
