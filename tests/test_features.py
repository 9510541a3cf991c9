"""train.cache_image_features: a frozen tower's features of every catalogue tile, computed once, give the
train step the loss, gradients and update it gets from the pixels."""

import dataclasses
import json
import pathlib
import pickle
import types

import jax
import ml_dtypes
import numpy as np
import pytest

from pixrec_jax import config_lib, flops
from pixrec_jax.data import features, pipeline
from pixrec_jax.train import run

SMALL = ["--config.data.synthetic.num_users=60", "--config.train.epochs=0", "--config.train.steps=6",
         "--config.train.log_every=3", "--config.model.text.num_hidden_layers=1",
         "--config.model.vision.num_hidden_layers=1"]


def _config(*overrides, option="paper"):
  cfg, _ = config_lib.parse_args(["--config", f"configs/demo.py:{option}", *SMALL, *overrides])
  cfg.eval.splits = ()
  return cfg


def _table(tmp_path, first, counts, row_shape=(2, 3), dtype=np.float32):
  return features.FeatureTable(str(tmp_path / "t.npy"), features.IMAGE_FEATURES, np.asarray(first),
                               np.asarray(counts), row_shape, dtype)


def test_the_table_maps_rows_by_item_and_tile_and_crosses_processes(tmp_path):
  table = _table(tmp_path, [0, -1, 2], [2, 0, 3], dtype=ml_dtypes.bfloat16)
  out = table.create()
  assert out.shape == (5, 2, 3) and out.dtype == ml_dtypes.bfloat16
  out[:] = np.arange(30, dtype=np.float32).reshape(5, 2, 3).astype(ml_dtypes.bfloat16)
  out.flush()
  np.testing.assert_array_equal(table.row(2, 1).astype(np.float32), np.arange(18, 24).reshape(2, 3))
  table.rows()  # mapped in this process ...
  clone = pickle.loads(pickle.dumps(table))  # ... and not pickled with it: a worker maps the file itself
  assert clone._rows is None and clone.row(0, 1).dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(clone.row(0, 1).astype(np.float32), np.arange(6, 12).reshape(2, 3))
  with pytest.raises(ValueError, match="item 1 has 0 image tiles in the feature table, not tile 0"):
    table.row(1, 0)
  with pytest.raises(ValueError, match=r"a feature table of \(5, 2, 3\) uint16, not the catalogue's \(5, 2, 4\)"):
    _table(tmp_path, [0, -1, 2], [2, 0, 3], row_shape=(2, 4), dtype=ml_dtypes.bfloat16).rows()
  with pytest.raises(ValueError, match="holds its image rows in one of"):
    features.rows_key({"images": 0, "image_features": 0})


def test_a_table_the_disk_cannot_hold_is_refused_before_encoding(tmp_path, monkeypatch):
  """A mapped write to a full disk kills the process with SIGBUS mid-encoding; create() checks the room first,
  counting the old table it replaces as free."""
  table = _table(tmp_path, [0, -1, 2], [2, 0, 3])  # 5 rows of 2 x 3 float32: 120 bytes
  monkeypatch.setattr(features.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=119))
  with pytest.raises(OSError, match=r"feature table of 5 image tiles \(\(2, 3\) float32 a tile\) needs 0.00 GiB in "
                                    r".* 0.00 GiB free: .* train.cache_image_features=False"):
    table.create()
  assert not pathlib.Path(table.path).exists()
  monkeypatch.setattr(features.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=120))
  table.create().flush()  # exactly enough
  monkeypatch.setattr(features.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
  table.create().flush()  # the file it replaces frees the room


def test_catalog_tiles_count_each_items_grid(image_builder):
  store = image_builder.images
  first, counts = features.catalog_tiles(store, len(image_builder.item_texts))
  for item in range(len(counts)):
    if store.has_image(item):
      rows, cols = store.grid(item)
      assert counts[item] == rows * cols + 1 and first[item] == counts[:item].sum()
    else:
      assert counts[item] == 0 and first[item] == -1
    # the table's rows are the slots an example of the item fills
    assert image_builder.item_example(item)["item_image_valid"].sum() == counts[item]
  assert counts.sum() > 0


def test_flops_leave_out_the_cached_part():
  from tests.test_flops import CFG, SHAPES  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  plain = flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="heads_lm_head")
  cached = flops.train_flops(CFG, dataclasses.replace(SHAPES, cached="connector"), proj_dim=8,
                             trainable="heads_lm_head")
  assert "vision" not in cached and "connector" not in cached
  assert cached["total"] == pytest.approx(plain["total"] - plain["vision"] - plain["connector"])
  vision = flops.train_flops(CFG, dataclasses.replace(SHAPES, cached="vision"), proj_dim=8, trainable="frozen_vision")
  whole = flops.train_flops(CFG, SHAPES, proj_dim=8, trainable="frozen_vision")
  assert "vision" not in vision and vision["connector"] == whole["connector"]
  assert vision["total"] == pytest.approx(whole["total"] - whole["vision"])
  with pytest.raises(ValueError, match="the cached part trains"):
    flops.train_flops(CFG, dataclasses.replace(SHAPES, cached="connector"), proj_dim=8, trainable="frozen_vision")


@pytest.mark.parametrize("trainable,budget,accum", [("heads_lm_head", "-1", 1), ("frozen_vision", "0", 2)])
def test_cached_features_give_the_steps_of_the_pixels(tmp_path, trainable, budget, accum):
  """The same batches, from pixels and from the table: equal losses and updates, three steps in a row. With
  the connector training (frozen_vision) the table holds the tower's output; with data.image_budget=0 the
  cached run packs every slot of the batch, and it splits into microbatches like any packed batch."""
  common = [f"--config.train.trainable={trainable}", f"--config.data.image_budget={budget}",
            "--config.train.batch_size=4", f"--config.train.grad_accum_steps={accum}", "--config.data.pack_rows=0",
            "--config.data.pack_items=False"]
  jobs = {on: run.setup(_config(*common, f"--config.train.cache_image_features={on}"), tmp_path / str(on))
          for on in (False, True)}
  want = "connector" if trainable == "heads_lm_head" else "vision"
  assert jobs[True].feature_cache == want and jobs[False].feature_cache == ""
  states = {on: run.init_state(job) for on, job in jobs.items()}
  table = run.encode_features(jobs[True], states[True].params, states[True].frozen)
  assert table.key == (features.IMAGE_FEATURES if want == "connector" else features.VISION_FEATURES)
  iters = {False: run._train_iterator(jobs[False]), True: run._train_iterator(jobs[True], table)}
  for _ in range(3):
    batches = {on: pipeline.split_bookkeeping(next(it))[0] for on, it in iters.items()}
    assert table.key in batches[True] and "images" not in batches[True] and "pixel_lut" not in batches[True]
    np.testing.assert_array_equal(batches[True]["full_ids"], batches[False]["full_ids"])
    metrics = {}
    for on in (False, True):
      states[on], metrics[on] = jobs[on].trainer.step(states[on], batches[on])
    np.testing.assert_allclose(float(metrics[True]["loss"]), float(metrics[False]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[True]["grad_norm"]), float(metrics[False]["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(states[True].params), jax.tree.leaves(states[False].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  shapes = {k: np.shape(v) for k, v in batches[True].items()}
  assert run.step_flops(jobs[True], shapes) == run.step_flops(jobs[True]) < run.step_flops(jobs[False])


def test_the_paper_job_caches_and_logs_what_the_pixels_log(tmp_path, capsys):
  """demo.py:paper sets the cache: the job encodes the catalogue's tiles once, says so, and trains as it does
  on pixels (the same log, to the last digit here); the summary records it."""
  logs, summaries = [], []
  for on in (True, False):
    cfg = _config(f"--config.train.cache_image_features={on}")
    job = run.setup(cfg, tmp_path / str(on))
    _, summary = run.train(job, run.init_state(job))
    summaries.append(summary)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("examples_per_s", "tflops_per_device", "mfu")}
    logs.append([strip(json.loads(line)) for line in (tmp_path / str(on) / "train_log.jsonl").read_text().splitlines()])
  assert _config().train.cache_image_features and not _config(option="paper,text_only").train.cache_image_features
  assert [r["step"] for r in logs[0]] == [3, 6]
  for cached, plain in zip(*logs):
    assert cached.keys() == plain.keys()
    for k in cached:
      assert cached[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), k
  assert summaries[0]["cache_image_features"] == "connector" and summaries[0]["feature_encoding_seconds"] > 0
  assert summaries[1]["cache_image_features"] is None
  out = capsys.readouterr().out
  assert "train.cache_image_features: the frozen vision tower and connector encode each catalogue image tile" in out
  assert "image tiles encoded in" in out and (tmp_path / "True" / run.FEATURES_DIR).is_dir()


def test_the_cache_needs_a_frozen_tower_and_images(tmp_path):
  with pytest.raises(ValueError, match="needs a frozen vision tower, and with train.trainable='all' it trains"):
    run.setup(_config("--config.train.trainable=all"), tmp_path / "all")
  with pytest.raises(ValueError, match="and LoRA adapters on it"):
    run.setup(_config("--config.lora.rank=2", "--config.lora.targets=('vision_model/**/mlp/fc1',)"), tmp_path / "lora")
  cfg = _config("--config.pixrec.text_only=True")
  with pytest.raises(ValueError, match="but the prompts have no images .pixrec.text_only."):
    run.setup(cfg, tmp_path / "text")


def test_workers_read_the_table_from_the_file(tmp_path):
  """grain's worker processes map the table themselves and send its rows, bfloat16 included."""
  job = run.setup(_config("--config.model.dtype=bfloat16", "--config.data.num_workers=1"), tmp_path)
  state = run.init_state(job)
  table = run.encode_features(job, state.params, state.frozen)
  assert table.dtype == ml_dtypes.bfloat16
  batch = next(run._train_iterator(job, table))
  rows = batch[features.IMAGE_FEATURES]
  assert rows.dtype == ml_dtypes.bfloat16 and rows.shape[0] == job.image_budget
  used = np.unique(batch["image_index"][batch["image_valid"].astype(bool)])
  assert used.size and np.abs(rows[used].astype(np.float32)).sum() > 0


@pytest.mark.parametrize("trainable", ["heads_lm_head", "frozen_vision"])
def test_the_runs_evaluation_reads_the_table_and_embeds_as_the_pixels_do(tmp_path, trainable):
  """After train() the job's evaluation reads the table in place of pixels: the catalogue's and the users'
  embeddings are the pixels', and so are the generative protocol's beams (the connector maps the tower's rows
  where it trains)."""
  from pixrec_jax.eval import generative, ranking  # pylint: disable=import-outside-toplevel
  job = run.setup(_config(f"--config.train.trainable={trainable}"), tmp_path)
  state, _ = run.train(job, run.init_state(job))
  settings = run.eval_settings(job)
  assert settings.features is job.features_table and settings.features.key in features.ROW_KEYS
  prefix = "item_" + settings.features.key
  assert prefix in next(iter(pipeline.catalog_dataset(job.builder, [0, 1], 2, features=settings.features)))
  states = (state.params, state.frozen)
  plain = dataclasses.replace(settings, features=None)
  for what in ("catalog", "user"):
    if what == "catalog":
      got, want = (ranking.catalog_embeddings(job.trainer.graphdef, states, job.builder, run.item_input_keys(job),
                                              job.mesh, s) for s in (settings, plain))
    else:
      got, want = (ranking.user_embeddings(job.trainer.graphdef, states, job.builder, job.splits.test, job.mesh, s)
                   for s in (settings, plain))
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=what)
  # The generative protocol's prompts read it too: the same beams, texts and scores.
  gen = generative.GenerativeSettings.from_config(job.cfg.eval.generative, job.builder.layout.max_item_tokens,
                                                  True, progress=False)
  cases = job.splits.test[:4]
  (texts, scores), (want_texts, want_scores) = (
      generative.generate_for_cases(job.trainer.graphdef, states, job.builder, cases, g, job.mesh)
      for g in (dataclasses.replace(gen, features=settings.features), gen))
  assert texts == want_texts
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  blank = dataclasses.replace(settings.features, path=str(tmp_path / "blank.npy"))
  blank.create().flush()  # all zeros: what the prompts read is the table's
  _, blank_scores = generative.generate_for_cases(job.trainer.graphdef, states, job.builder, cases,
                                                  dataclasses.replace(gen, features=blank), job.mesh)
  assert np.abs(blank_scores - want_scores).max() > 1e-4


def test_a_rerun_reuses_the_table_and_another_config_encodes_it_again(tmp_path, capsys):
  """The table is written with its fingerprint (config, dataset, checkpoint files): a run of the same config in
  the same workdir (a resumed run) reads it as it is; one whose frozen weights differ (another seed) encodes
  it again, and so does a run whose table was left half written (no fingerprint)."""
  def train(*overrides):
    job = run.setup(_config(*overrides), tmp_path)
    _, summary = run.train(job, run.init_state(job))
    return job.features_table, summary["feature_encoding_seconds"], capsys.readouterr().out

  table, seconds, _ = train()
  written = pathlib.Path(table.path).stat().st_mtime_ns
  assert seconds > 0 and pathlib.Path(table.path + ".json").is_file()
  again, seconds, out = train()
  assert seconds is None and "train.cache_image_features: reusing" in out
  assert pathlib.Path(again.path).stat().st_mtime_ns == written
  _, seconds, out = train("--config.seed=1")
  assert seconds > 0 and "reusing" not in out
  pathlib.Path(table.path + ".json").unlink()
  _, seconds, _ = train("--config.seed=1")
  assert seconds > 0


def test_a_reopened_run_reads_the_table_its_training_left(tmp_path, capsys, monkeypatch):
  """recommend's model, reopened from the run's checkpoint (run.restore_trained), reads the table training wrote
  when its fingerprint matches, its tile counts from the fingerprint's file (no image read to find it): the
  catalogue index is the pixels' (and a blank table changes it, so the table is what it reads). Without the
  fingerprint (a half-written table) it reads pixels."""
  from pixrec_jax import recommend  # pylint: disable=import-outside-toplevel
  run.train_and_evaluate(_config(), tmp_path)  # the main job: trains, checkpoints
  with monkeypatch.context() as m:
    m.setattr(features, "catalog_tiles", lambda *a: pytest.fail("the saved table's counts were derived again"))
    trained = run.restore_trained(tmp_path, "latest")
  table = trained.job.features_table
  assert table is not None and table.key == features.IMAGE_FEATURES
  assert table.path == str(tmp_path / run.FEATURES_DIR / "image_features.process0.npy")
  settings = recommend._settings(trained)  # pylint: disable=protected-access
  assert settings.features is table
  got = recommend.build_index(trained, tmp_path).embeddings
  trained.job.features_table = None
  want = recommend.build_index(trained, tmp_path).embeddings
  np.testing.assert_allclose(got, want, atol=2e-6)
  blank = dataclasses.replace(table, path=str(tmp_path / "blank.npy"))
  blank.create().flush()
  trained.job.features_table = blank
  assert np.abs(recommend.build_index(trained, tmp_path).embeddings - want).max() > 1e-4
  capsys.readouterr()
  assert recommend.main(["--workdir", str(tmp_path), "--step", "latest", "--items", "0,1", "--k", "3"]) == 0
  assert f"image features from {table.path}" in capsys.readouterr().err  # the CLI says what it read
  pathlib.Path(table.path + ".json").unlink()
  assert run.restore_trained(tmp_path, "latest").job.features_table is None
