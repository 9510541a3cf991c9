"""Beam search (pixrec_jax.eval.generate) against transformers' `generate`, and the KV cache
against recomputing the whole window at every step, on tiny random models (float32)."""

import dataclasses

import numpy as np
import pytest
import torch

from tests import hf_fixtures as fx

import pixrec_jax
from pixrec_jax.eval import generate as gen
from pixrec_jax.models.config import Runtime

SETTINGS = gen.GenerationSettings(num_beams=4, max_new_tokens=8, repetition_penalty=1.3, length_penalty=1.0)


def _prompts(rng, lengths, width):
  """Right-padded prompts (the way evaluation builds them) of the given lengths."""
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros_like(ids)
  rows = [fx.random_text(rng, n) for n in lengths]
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return rows, ids, mask


def _hf_beams(hf_model, row, settings, eos):
  out = hf_model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                          num_beams=settings.num_beams, num_return_sequences=settings.num_beams, do_sample=False,
                          max_new_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                          length_penalty=settings.length_penalty, early_stopping=settings.early_stopping,
                          eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
  return out.sequences[:, len(row):].numpy(), out.sequences_scores.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  hf_model = fx.build_and_save(fx.tiny_llama_config(), path)
  rows, ids, mask = _prompts(np.random.default_rng(0), (7, 4), 8)
  # An EOS that the best beam of the first prompt emits third, so that beams finish early.
  eos = int(_hf_beams(hf_model, rows[0], SETTINGS, eos=None)[0][0, 2])
  refs = {es: [_hf_beams(hf_model, r, dataclasses.replace(SETTINGS, early_stopping=es), eos) for r in rows]
          for es in (False, True)}
  return path, ids, mask, eos, refs


def _assert_same(beams, refs, eos):
  finished_early = 0
  for i, (hf_tokens, hf_scores) in enumerate(refs):
    for k in range(len(hf_scores)):
      n = beams.lengths[i, k]
      np.testing.assert_array_equal(beams.tokens[i, k, :n], hf_tokens[k, :n], err_msg=f"prompt {i} beam {k}")
      assert n == hf_tokens.shape[1] or hf_tokens[k, n - 1] == eos
      finished_early += int(n < SETTINGS.max_new_tokens)
    np.testing.assert_allclose(beams.scores[i], hf_scores, rtol=0, atol=2e-6)
  return finished_early


@pytest.mark.parametrize("scan_layers,early_stopping", [(False, False), (True, True)])
def test_cached_beam_search_matches_transformers(llama, scan_layers, early_stopping):
  """With the cache, looped and scanned layers; without it, see test_gemma2_cache_equals_recompute."""
  path, ids, mask, eos, refs = llama
  ours = pixrec_jax.from_pretrained(path, Runtime(scan_layers=scan_layers))
  settings = dataclasses.replace(SETTINGS, early_stopping=early_stopping)
  beams = gen.generate(ours, ids, mask, settings, [eos], pad_id=0)
  # Both prompts batched (one of them padded) give what transformers gives each alone.
  assert _assert_same(beams, refs[early_stopping], eos) > 0, "no beam finished on EOS: the test lost its bite"


def test_gemma2_cache_equals_recompute(tmp_path):
  """Sliding-window layers (window 4, shorter than prompt + new tokens) and soft-capped
  logits in cached decoding give the same beams as the full forward pass."""
  fx.build_and_save(fx.tiny_paligemma_config(sliding_window=4), tmp_path)
  ours = pixrec_jax.from_pretrained(tmp_path)
  _, ids, mask = _prompts(np.random.default_rng(1), (9, 3), 10)
  settings = dataclasses.replace(SETTINGS, max_new_tokens=6)
  cached = gen.generate(ours, ids, mask, settings, [7], pad_id=0)
  full = gen.generate(ours, ids, mask, dataclasses.replace(settings, use_cache=False), [7], pad_id=0)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.lengths, full.lengths)
  np.testing.assert_allclose(cached.scores, full.scores, rtol=0, atol=2e-6)
  assert np.all(np.diff(cached.scores, axis=1) <= 0), "beams come best first"


def test_sampling_is_seeded(llama):
  path, ids, mask, eos, _ = llama
  ours = pixrec_jax.from_pretrained(path)
  settings = dataclasses.replace(SETTINGS, do_sample=True, temperature=0.5)
  a, b, c = (gen.generate(ours, ids, mask, dataclasses.replace(settings, seed=s), [eos], pad_id=0) for s in (3, 3, 4))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.scores, b.scores)
  assert not np.array_equal(a.tokens, c.tokens)


def test_bad_settings_name_the_key():
  with pytest.raises(ValueError, match="num_beams"):
    gen.GenerationSettings(num_beams=0).validate()
  with pytest.raises(ValueError, match="early_stopping"):
    gen.GenerationSettings(early_stopping="sometimes").validate()
