"""The text-only baseline (HF `LlamaForCausalLM`, SmolLM2) against transformers (float32).

tests/test_parity_smolvlm.py covers grouped-query and multi-head attention, tied and
untied heads, left and right padding; this adds SmolLM2's own shape (multi-query
here, rope_theta 100000, tied), explicit position ids, and the export round trip.
"""

import numpy as np
import torch
import transformers
from flax import nnx

from tests import hf_fixtures as fx

import pixrec_jax
from pixrec_jax.convert import hf

TOL = 1e-4


@nnx.jit
def _forward(model, batch):
  return model(**batch)


def _smollm2_like(kv_heads=1, tie=True):
  config = fx.tiny_llama_config(kv_heads=kv_heads, tie=tie)
  config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
  return config


def _batches():
  rng = np.random.default_rng(2)
  rows = [fx.random_text(rng, 10), fx.random_text(rng, 6)]
  ids = np.zeros((2, 10), np.int64)
  mask = np.zeros_like(ids)
  ids[0], mask[0] = rows[0], 1
  ids[1, 4:], mask[1, 4:] = rows[1], 1  # left padded
  # Positions counted from each row's first real token, as generation with left padding uses them.
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  return {"left_and_right_padding": dict(input_ids=ids, attention_mask=mask),
          "explicit_position_ids": dict(input_ids=ids, attention_mask=mask, position_ids=positions)}


def _compare(hf_model, ours):
  for name, batch in _batches().items():
    kwargs = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
      hf_logits = hf_model(**kwargs).logits.numpy()
      hf_hidden = hf_model.model(**kwargs).last_hidden_state.numpy()
    out = _forward(ours, batch)
    real = batch["attention_mask"].astype(bool)
    for what, a, b in (("hidden", hf_hidden, out.last_hidden_state), ("logits", hf_logits, out.logits)):
      diff = np.abs(a[real] - np.asarray(b)[real]).max()
      assert diff < TOL, f"{name}: {what} differ by {diff:.2e}"


def test_smollm2_shaped_llama_matches_transformers(tmp_path):
  hf_model = fx.build_and_save(_smollm2_like(), tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  assert ours.cfg.text.rope_theta == 100000.0 and ours.cfg.text.num_key_value_heads == 1
  _compare(hf_model, ours)


def test_export_loads_in_transformers(tmp_path):
  fx.build_and_save(_smollm2_like(kv_heads=2, tie=False), tmp_path / "hf")
  ours = pixrec_jax.from_pretrained(tmp_path / "hf")
  hf.save_pretrained(ours, tmp_path / "ours")
  reloaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _compare(reloaded.eval(), ours)
