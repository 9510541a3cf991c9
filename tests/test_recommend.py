"""Recommendations from a trained run equal what evaluation ranks first; the catalogue index is built once."""

import json

import numpy as np
import pytest

from pixrec_jax import recommend
from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.eval import ranking
from pixrec_jax.train import run
from tests import run_fixtures as rf

K = 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  rf.check(rf.run(rf.main_args(workdir, train__steps=12, checkpoint__every_steps=12)))
  return workdir


def _evaluation_top_k(trained, cases, k):
  """For each case, the k items that evaluation ranks first: sorted by the rank evaluation would give
  each item as the target (pessimistic among equal scores), then by id."""
  job = trained.job
  states = (trained.params, trained.frozen)
  settings = ranking.EvalSettings(batch_size=job.cfg.eval.batch_size, mask_history=job.cfg.eval.mask_history,
                                  progress=False)
  items = ranking.catalog_embeddings(job.trainer.graphdef, states, job.builder, run.item_input_keys(job), job.mesh,
                                     settings)
  users = ranking.user_embeddings(job.trainer.graphdef, states, job.builder, cases, job.mesh, settings)
  n = items.shape[0]
  out = []
  for case, user in zip(cases, users):
    every_target = [EvalCase(case.user_index, case.history, j) for j in range(n)]
    ranks = ranking.rank_targets(np.repeat(user[None], n, axis=0), items, every_target, settings.mask_history)
    out.append(sorted(range(n), key=lambda j: (ranks[j], j))[:k])
  return out, items


def test_recommend_lists_the_items_evaluation_ranks_first(workdir, tmp_path, capsys):
  trained = run.restore_trained(workdir, "latest")
  cases = trained.job.splits.valid[:6]
  users = trained.job.dataset.users
  histories = tmp_path / "histories.jsonl"
  histories.write_text("".join(json.dumps({"user_id": users[c.user_index].user_id, "items": c.history.tolist()})
                               + "\n" for c in cases))
  assert recommend.main(["--workdir", str(workdir), "--histories", str(histories), "--k", str(K), "--json"]) == 0
  captured = capsys.readouterr()
  printed = [json.loads(line) for line in captured.out.splitlines()]
  assert "embedded into" in captured.err and "image features from" not in captured.err  # pixels: no table
  expected, items = _evaluation_top_k(trained, cases, K)
  titles = [item.fields["title"] for item in trained.job.dataset.items]
  for case, record, want in zip(cases, printed, expected):
    assert record["user_id"] == users[case.user_index].user_id and record["history"] == case.history.tolist()
    assert [r["item_id"] for r in record["recommendations"]] == want
    assert [r["rank"] for r in record["recommendations"]] == list(range(1, K + 1))
    assert all(r["title"] == titles[r["item_id"]] for r in record["recommendations"])
    scores = [r["score"] for r in record["recommendations"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    if trained.job.cfg.eval.mask_history:
      assert not set(want) & set(case.history.tolist())

  # The catalogue index was built once: a second call reads it, and a table names the items.
  index = workdir / recommend.INDEX_DIR / f"step_{trained.step}"
  written = (index / "embeddings.npy").stat().st_mtime_ns
  first = cases[0]
  assert recommend.main(["--workdir", str(workdir), "--items", ",".join(map(str, first.history.tolist())),
                         "--k", str(K)]) == 0
  captured = capsys.readouterr()
  assert "from" in captured.err and (index / "embeddings.npy").stat().st_mtime_ns == written
  rows = [line.split(None, 3) for line in captured.out.splitlines()[2:]]
  assert [int(r[1]) for r in rows] == expected[0] and [r[3] for r in rows] == [titles[i] for i in expected[0]]

  # embed-catalog: the same embeddings, in a form an ANN library loads without pickle.
  out = tmp_path / "catalog"
  assert recommend.main(["embed-catalog", "--workdir", str(workdir), "--out", str(out)]) == 0
  emb = np.load(out / "embeddings.npy", allow_pickle=False)
  assert emb.dtype == np.float32 and emb.shape == items.shape
  np.testing.assert_array_equal(emb, items)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
  assert [r["item_id"] for r in rows] == list(range(len(titles))) and [r["title"] for r in rows] == titles
  assert json.loads((out / "meta.json").read_text())["step"] == trained.step


def test_bad_histories_are_named(workdir, tmp_path, capsys):
  assert recommend.main(["--workdir", str(workdir), "--items", "3,99999"]) == 1
  assert "item ids must be integers in [0," in capsys.readouterr().err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"items": [1, 2]}\n{"items": "3"}\n')
  assert recommend.main(["--workdir", str(workdir), "--histories", str(bad)]) == 1
  assert f"{bad}:2" in capsys.readouterr().err
  assert recommend.main(["--workdir", str(tmp_path / "nothing"), "--items", "1"]) == 1
  assert "train first" in capsys.readouterr().err
