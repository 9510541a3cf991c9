"""Evaluation at scale and its reports: top-K on device, the cold-start slice, baselines, the
embedding cache, seed aggregation, and the files a run writes (plot, gallery, Markdown)."""

import json
import math

import numpy as np
import pytest

from pixrec_jax.data.catalog import EvalCase, Splits
from pixrec_jax.eval import baselines, gallery, ranking, report
from pixrec_jax.eval.metrics import curve_from_ranks, metrics_from_ranks
from tests import run_fixtures as rf


def _case(history, target, user=0):
  return EvalCase(user_index=user, history=np.asarray(history, np.int32), target=target)


# A hand-built split over 6 items: training sequences hold items 0..3 (item 1 twice); 4 and 5 never.
SPLITS = Splits(train=[(0, np.array([0, 1, 2])), (1, np.array([1, 3]))], valid=[],
                test=[_case([0, 1], 4, 0), _case([3], 2, 1), _case([2], 5, 2)], counts={})


def test_top_k_on_device_is_exact_best_first_lower_id_on_ties_and_skips_history():
  items = np.array([[1, 0], [0.6, 0.8], [1, 0], [0, 1], [-1, 0]], np.float32)  # items 0 and 2 tie
  users = np.array([[1, 0], [0, 1]], np.float32)
  cases = [_case([], 2), _case([3], 1)]
  ranked = ranking.rank_cases(users, items, cases, mask_history=True, top_k=3)
  assert ranked.top_ids.tolist() == [[0, 2, 1], [1, 0, 2]]
  np.testing.assert_allclose(ranked.top_scores, [[1, 1, 0.6], [0.8, 0, 0]], atol=1e-6)
  assert ranked.ranks.tolist() == [2, 1]  # the tie with item 0 counts against target 2
  with pytest.raises(ValueError, match="top_k=6 is larger than the catalogue"):
    ranking.rank_cases(users, items, cases, mask_history=True, top_k=6)


def test_cold_start_slice_on_a_hand_built_split():
  seen = baselines.seen_items(SPLITS, 6)
  assert seen.tolist() == [True, True, True, True, False, False]
  cold = ranking.cold_start_cases(SPLITS.test, seen)
  assert cold.tolist() == [True, False, True]
  ranks = np.array([3, 1, 10])
  block = ranking.slice_metrics(ranks, cold)
  assert block["users"] == 2
  assert block["metrics"]["recall@5"] == pytest.approx(0.5)
  assert block["metrics"]["mrr"] == pytest.approx((1 / 3 + 1 / 10) / 2)
  # No cold-start case: the block is still there, with a count of 0 and no metrics.
  assert ranking.slice_metrics(ranks, np.zeros(3, bool)) == {"users": 0, "metrics": None}


def test_baselines_rank_by_hand_computed_scores():
  assert baselines.train_counts(SPLITS, 6).tolist() == [1, 2, 1, 1, 0, 0]
  # Popularity scores 1, 2, 1, 1, 0, 0. Case 0 (target 4, score 0): 4 items above, item 5 ties -> 6;
  # with its history (0, 1) masked, 2 above -> 4. Case 1 (target 2): item 1 above, 0 and 3 tie -> 4;
  # with 3 masked -> 3. Case 2 (target 5): 4 above, 4 ties -> 6; with 2 masked -> 5.
  assert baselines.popularity(SPLITS.test, SPLITS, 6, mask_history=False).ranks.tolist() == [6, 4, 6]
  assert baselines.popularity(SPLITS.test, SPLITS, 6, mask_history=True).ranks.tolist() == [4, 3, 5]
  # Item-tower space: each case's last history item; targets 4, 2, 5 sit at cosines 0.6, 0, -1 from it.
  emb = np.array([[0, 1], [1, 0], [0, -1], [0.8, 0.6], [0.6, 0.8], [-1, 0]], np.float32)
  nn = baselines.last_item_nn(SPLITS.test, emb, mask_history=False)
  # Case 0 (last item 1): 1 (1.0), 3 (0.8) above target 4 (0.6) -> 3. Case 1 (last 3): 3 (1.0), 4 (0.96),
  # 1 (0.8), 0 (0.6) above target 2 (-0.6) -> 5. Case 2 (last 2): 2 (1.0) above, 1 ties target 5 at 0 -> 3.
  # Masking each history takes its last item (the top one) out: one place better.
  assert nn.ranks.tolist() == [3, 5, 3]
  assert baselines.last_item_nn(SPLITS.test, emb, mask_history=True).ranks.tolist() == [2, 4, 2]
  out = baselines.evaluate(["popularity"], SPLITS.test, SPLITS, emb, mask_history=True)
  assert out["popularity"]["metrics"] == metrics_from_ranks(np.array([4, 3, 5]))
  assert out["popularity"]["cold_start"] == {"users": 2, "metrics": metrics_from_ranks(np.array([4, 5]))}
  with pytest.raises(ValueError, match="eval.baselines: unknown baseline"):
    baselines.evaluate(["random"], SPLITS.test, SPLITS, emb, mask_history=True)


def test_curve_equals_hand_computed_recall_and_ndcg():
  curve = curve_from_ranks(np.array([1, 3, 12, 60]), ks=(1, 5, 20))
  assert curve["recall"] == pytest.approx([0.25, 0.5, 0.75])
  assert curve["ndcg"] == pytest.approx([0.25, (1 + 0.5) / 4, (1 + 0.5 + 1 / math.log2(13)) / 4])


def test_catalogue_cache_is_reused_and_invalidated_by_step_and_config(tmp_path):
  calls = []

  def compute(value):
    calls.append(value)
    return np.full((5, 3), value, np.float32)

  config = {"seed": 0, "model": {"hidden": 32}, "eval": {"batch_size": 64}}
  fp = ranking.fingerprint(config, {"name": "d"})
  cache = ranking.EmbeddingCache(tmp_path / "cache", 7, fp)
  first, hit = cache.get(lambda: compute(1.0), rows=5)
  assert not hit and calls == [1.0] and cache.path.name == "item_embeddings_step7.npz" and cache.path.is_file()
  # The same checkpoint again: read from the file, not computed.
  again, hit = cache.get(lambda: compute(2.0), rows=5)
  assert hit and calls == [1.0] and np.array_equal(again, first)
  # Evaluation settings do not change the fingerprint; the model config, the data and the step do.
  assert ranking.fingerprint({**config, "eval": {"batch_size": 8}}, {"name": "d"}) == fp
  assert ranking.fingerprint({**config, "model": {"hidden": 64}}, {"name": "d"}) != fp
  assert ranking.fingerprint(config, {"name": "e"}) != fp
  changed = ranking.EmbeddingCache(tmp_path / "cache", 7, ranking.fingerprint({**config, "seed": 1}, {"name": "d"}))
  recomputed, hit = changed.get(lambda: compute(3.0), rows=5)
  assert not hit and calls == [1.0, 3.0] and recomputed[0, 0] == 3.0
  assert cache.load() is None  # the file now holds the new fingerprint's vectors
  assert ranking.EmbeddingCache(tmp_path / "cache", 8, changed.fingerprint).load() is None
  # A catalogue of another size (items added) is recomputed too; a process that must not write only reads.
  _, hit = changed.get(lambda: compute(4.0)[:4], rows=4, write=False)
  assert not hit and changed.load()[0, 0] == 3.0


def test_seed_aggregation_gives_mean_and_sample_std():
  def one(r1, cold):
    return {"split": "test", "users": 4, "catalogue_items": 9, "mask_history": True,
            "models": {"pixrec": {"metrics": {"recall@1": r1, "mrr": 2 * r1},
                                  "curve": {"k": [1, 5], "recall": [r1, 1.0], "ndcg": [r1, 0.5]},
                                  "cold_start": {"users": 1 if cold is not None else 0,
                                                 "metrics": None if cold is None else {"recall@1": cold, "mrr": cold}}}}}
  out = report.aggregate_seeds([one(0.2, 0.0), one(0.4, 1.0), one(0.6, 1.0)], [0, 1, 2])
  m = out["models"]["pixrec"]
  assert m["metrics"] == pytest.approx({"recall@1": 0.4, "mrr": 0.8})
  assert m["std"] == pytest.approx({"recall@1": 0.2, "mrr": 0.4})  # sample std (n - 1) of 0.2, 0.4, 0.6
  assert m["curve"]["recall"] == pytest.approx([0.4, 1.0])
  assert m["cold_start"]["users"] == 1 and m["cold_start"]["metrics"]["mrr"] == pytest.approx(2 / 3)
  assert out["seeds"] == [0, 1, 2] and out["users"] == 4
  assert "| pixrec | 0.4000 ± 0.2000 | 0.8000 ± 0.4000 |" in report.markdown(out)
  empty = report.aggregate_seeds([one(0.2, None), one(0.4, None)], [3, 4])["models"]["pixrec"]["cold_start"]
  assert empty == {"users": 0, "metrics": None, "std": None}
  assert "n/a" in report.markdown(report.aggregate_seeds([one(0.2, None)], [3]))


def test_a_model_without_curve_or_some_metrics_gets_a_row_of_its_own(tmp_path):
  """The generative protocol's row: its metrics in the table (n/a where it has none), no line in the plot."""
  dense = {"metrics": {"recall@1": 0.5, "mrr": 0.7}, "curve": {"k": [1, 5], "recall": [0.5, 1.0], "ndcg": [0.5, 0.6]},
           "cold_start": None}
  out = {"split": "test", "users": 4, "catalogue_items": 9, "mask_history": True,
         "models": {"pixrec": dense, "pixrec (generative, 2 users)": {"metrics": {"recall@1": 0.25}, "curve": None,
                                                                       "cold_start": None}}}
  files = report.write(tmp_path, out)
  assert "| pixrec (generative, 2 users) | 0.2500 | n/a |" in files["md"].read_text()
  assert files["plot"].stat().st_size > 5000


def test_gallery_shows_history_top_k_and_highlights_the_target(small_dataset):
  cases = [_case([0, 1], 5), _case([2], 3)]
  page = gallery.render(small_dataset, cases, np.array([2, 12]), np.array([[4, 5, 6], [7, 8, 9]]),
                        np.array([[0.9, 0.8, -np.inf], [0.5, 0.4, 0.3]]), "t", ["u<1>", "u2"])
  assert page.count('<section class="user">') == 2 and "u&lt;1&gt;" in page
  # Target 5 is recommended second to user 0 and shown again as the true item; user 1's only as the true item.
  assert page.count('<figure class="target">') == 3
  # User 0: 2 history items, 2 recommendations (the masked -inf one is left out), the true item; user 1: 1, 3, 1.
  assert page.count("<figure") == 10 and page.count("data:image/png;base64,") == 10
  assert "score 0.900" in page and "rank 12" in page


def test_main_with_seeds_writes_each_run_its_reports_and_their_mean_and_std(tmp_path):
  from pixrec_jax.data import catalog

  work = tmp_path / "w"
  proc = rf.check(rf.run(rf.main_args(work, train__steps=2, checkpoint__every_steps=2, eval__splits="test",
                                      eval__seeds="0,1", eval__gallery_users=3)))
  seeds = [json.loads((work / f"seed_{s}" / "report.json").read_text()) for s in (0, 1)]
  top = json.loads((work / "report.json").read_text())
  assert top["seeds"] == [0, 1] and set(top["models"]) == {"pixrec_text_only", "popularity", "last_item_nn"}
  for name, m in top["models"].items():
    for k, v in m["metrics"].items():
      values = [r["models"][name]["metrics"][k] for r in seeds]
      assert v == pytest.approx(np.mean(values)) and m["std"][k] == pytest.approx(np.std(values, ddof=1))
  # Both seeds ranked the same test cases of the same data: the popularity baseline is identical.
  assert seeds[0]["models"]["popularity"] == seeds[1]["models"]["popularity"]
  assert seeds[0]["models"]["pixrec_text_only"]["metrics"] != seeds[1]["models"]["pixrec_text_only"]["metrics"]

  # The cold-start slice counts the test targets that no training sequence holds, computed here afresh.
  splits = catalog.leave_one_out(catalog.load_dataset(work / "data"))
  trained_on = {int(i) for _, seq in splits.train for i in seq}
  cold = sum(c.target not in trained_on for c in splits.test)
  metrics = json.loads((work / "seed_0" / "metrics.json").read_text())
  assert metrics["report"]["splits"]["test"]["cold_start"]["users"] == cold
  assert seeds[0]["models"]["pixrec_text_only"]["cold_start"]["users"] == cold
  assert seeds[0]["models"]["pixrec_text_only"]["metrics"] == pytest.approx(metrics["test"])

  for folder in (work, work / "seed_0", work / "seed_1"):
    png = (folder / report.PLOT).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "| popularity |" in (folder / report.REPORT_MD).read_text()
  assert "± " in (work / report.REPORT_MD).read_text()
  page = (work / "seed_0" / report.GALLERY).read_text()
  assert page.count('<section class="user">') == 3 and page.count('<figure class="target">') >= 3
  assert page.count("data:image/png;base64,") >= 3 * 11  # each user: top 10 and the true item at least

  # One catalogue pass per run: the report reused the embeddings evaluation cached for the checkpoint.
  assert proc.stderr.count("embed catalogue:   0%") == 2
  cfg = json.loads((work / "seed_1" / "config.json").read_text())
  manifest = json.loads((work / "data" / "manifest.json").read_text())
  assert ranking.EmbeddingCache(work / "seed_1" / "cache", 2, ranking.fingerprint(cfg, manifest)).load() is not None
