"""The generative protocol: BM25 from generated text to item ids, the paper's fusion over
beams, pessimistic ties, and the whole split evaluation on a tiny random PixRec."""

import numpy as np
import pytest
from flax import nnx

from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.eval import bm25, generative
from pixrec_jax.eval.generate import GenerationSettings
from tests.conftest import tiny_pixrec_fn

EPS = 1 / 5000


@pytest.fixture(scope="module")
def catalog(small_dataset):
  texts = [small_dataset.item_text(i) for i in range(small_dataset.num_items)]
  return texts, bm25.CatalogIndex(texts)


def _unique(texts):
  return [i for i, t in enumerate(texts) if texts.count(t) == 1]


def test_planted_exact_match_ranks_first(catalog):
  texts, index = catalog
  for target in _unique(texts)[:5]:
    scores = bm25.fuse(index.scores(texts[target])[None], np.zeros(1), EPS)
    assert bm25.target_rank(scores, target) == 1
    assert scores[target] == 1.0  # min-max scaled


def test_better_beam_wins_between_two_exact_matches(catalog):
  """Each beam names a different item exactly (both scale to 1); exp(eps * beam score) puts the
  better beam's item first, whichever order the beams come in."""
  texts, index = catalog
  a, b = _unique(texts)[:2]
  scores = np.stack([index.scores(texts[a]), index.scores(texts[b])])
  for beam_scores, first in (((-1.0, -2.0), a), ((-2.0, -1.0), b)):
    fused = bm25.fuse(scores, np.asarray(beam_scores), EPS)
    assert bm25.target_rank(fused, first) == 1
    assert bm25.target_rank(fused, a + b - first) == 2


def test_items_sharing_a_text_are_all_candidates_with_pessimistic_ties(catalog):
  texts, index = catalog
  twins = next(ids for ids in ({t: [i for i, u in enumerate(texts) if u == t] for t in texts}).values()
               if len(ids) > 1)
  fused = bm25.fuse(index.scores(texts[twins[0]])[None], np.zeros(1), EPS)
  assert np.all(fused[twins] == fused[twins[0]])
  assert all(bm25.target_rank(fused, t) == len(twins) for t in twins)


def test_min_max_and_history_mask():
  np.testing.assert_allclose(bm25.min_max(np.asarray([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])),
                             [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
  scores = np.asarray([0.9, 0.5, 0.5, 0.1], np.float32)
  assert bm25.target_rank(scores, 2, history=[0], mask_history=False) == 3
  assert bm25.target_rank(scores, 2, history=[0], mask_history=True) == 2
  with pytest.raises(ValueError, match="beam_scores"):
    bm25.fuse(np.zeros((2, 3)), np.zeros(3), EPS)


def test_a_generation_without_words_scores_nothing(catalog):
  _, index = catalog
  assert not index.scores("... !!").any()


def test_protocol_and_settings_name_their_keys():
  with pytest.raises(ValueError, match="eval.protocol"):
    generative.check_protocol("sparse")
  with pytest.raises(ValueError, match="num_beams"):
    GenerationSettings(num_beams=0).validate()


def test_split_evaluation_with_images(word_tokenizer, image_builder, small_splits):
  """Prompts with images, batched with padding: each case's beams are those it gets alone, and
  the ranks are the fusion of exactly those beams."""
  graphdef, state = nnx.split(tiny_pixrec_fn(word_tokenizer, tie=True)())
  cases = list(small_splits.test[:3])
  settings = generative.GenerativeSettings(GenerationSettings(num_beams=2, max_new_tokens=4), batch_size=2,
                                           progress=False)
  index = bm25.CatalogIndex(image_builder.item_texts)
  texts, beam_scores = generative.generate_for_cases(graphdef, (state,), image_builder, cases, settings)
  assert len(texts) == 3 and all(len(t) == 2 for t in texts) and beam_scores.shape == (3, 2)
  alone = generative.generate_for_cases(graphdef, (state,), image_builder, cases[1:2],
                                        generative.GenerativeSettings(settings.generation, batch_size=1,
                                                                      progress=False))
  assert alone[0][0] == texts[1]
  np.testing.assert_allclose(alone[1][0], beam_scores[1], atol=1e-5)

  metrics, report = generative.evaluate_split(graphdef, (state,), image_builder, cases, index, settings, "test")
  ranks = generative.rank_generations(index, texts, beam_scores, cases, EPS, True)
  assert report["users"] == 3 and report["users_per_second"] > 0
  assert [e["rank"] for e in report["examples"]] == ranks.tolist()
  assert metrics["mrr"] == pytest.approx(float(np.mean(1.0 / ranks)))
  assert set(metrics) >= {"recall@1", "recall@10", "ndcg@10", "mrr"}


def test_rank_generations_uses_every_beam():
  texts = ["red apple box", "green tea", "blue apple box", "black coffee"]
  index = bm25.CatalogIndex(texts)
  cases = [EvalCase(0, np.asarray([3]), 1), EvalCase(1, np.asarray([0]), 2)]
  # The target is named by the second beam only; with the history masked it still ranks first.
  gens = [["red apple box", "green tea"], ["green tea", "blue apple box"]]
  ranks = generative.rank_generations(index, gens, np.asarray([[-1.0, -1.5], [-1.0, -1.2]]), cases, EPS, True)
  assert ranks.tolist() == [2, 2]
  ranks = generative.rank_generations(index, gens, np.asarray([[-1.5, -1.0], [-1.2, -1.0]]), cases, EPS, True)
  assert ranks.tolist() == [1, 1]
