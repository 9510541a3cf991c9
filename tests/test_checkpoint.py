"""Checkpoints, exact resume, preemption and the non-finite guard, on the main job as a child process.

The runs are tiny text-only demo runs (tests/run_fixtures.py): 12 steps, a checkpoint
every 3. A resumed run must equal the uninterrupted one bit for bit: the same logged
losses at every step and the same final arrays (parameters, optimiser state, counters).
"""

import shutil
import signal

import numpy as np
import pytest

from pixrec_jax import config_lib
from pixrec_jax.train import checkpoint
from tests import run_fixtures as rf

STEPS, EVERY = 12, 3
RUN = dict(train__steps=STEPS, checkpoint__every_steps=EVERY)


def _checkpoints(workdir) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(workdir / "checkpoints", read_only=True)


def _assert_same_run(a, b):
  """Same log records (but for the wall-clock rates: examples/s, TFLOP/s, MFU) and bitwise the same final arrays."""
  strip = lambda r: {k: v for k, v in r.items() if k not in ("examples_per_s", "tflops_per_device", "mfu")}
  assert [strip(r) for r in rf.log(a)] == [strip(r) for r in rf.log(b)]
  want, got = _checkpoints(a).arrays(STEPS), _checkpoints(b).arrays(STEPS)
  assert set(want) == set(got)
  different = [k for k in want if want[k].dtype != got[k].dtype or want[k].tobytes() != got[k].tobytes()]
  assert not different, f"arrays differ after the resume: {different[:10]}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """The uninterrupted run."""
  workdir = tmp_path_factory.mktemp("baseline")
  rf.check(rf.run(rf.main_args(workdir, **RUN)))
  assert [r["step"] for r in rf.log(workdir)] == list(range(1, STEPS + 1))
  return workdir


def test_sigkill_and_restart_gives_the_uninterrupted_run_bitwise(baseline, tmp_path):
  proc = rf.start(rf.main_args(tmp_path, **RUN))
  rf.wait_for(rf.committed(tmp_path, EVERY), proc, what=f"checkpoint {EVERY}")
  rf.kill(proc, signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL
  killed_at = _checkpoints(tmp_path).latest_step()
  assert EVERY <= killed_at < STEPS
  resumed = rf.check(rf.run(rf.main_args(tmp_path, **RUN)))
  assert f"resuming from step {killed_at}" in resumed.stdout
  _assert_same_run(baseline, tmp_path)


def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(baseline, tmp_path):
  proc = rf.start(rf.main_args(tmp_path, **RUN))
  rf.wait_for(rf.committed(tmp_path, EVERY), proc, what=f"checkpoint {EVERY}")
  out, err = rf.kill(proc, signal.SIGTERM)
  assert proc.returncode == 0, err[-3000:]
  saved = _checkpoints(tmp_path).latest_step()
  assert f"stopped by SIGTERM after step {saved}" in out
  assert EVERY <= saved < STEPS
  assert rf.log(tmp_path)[-1]["step"] == saved
  rf.check(rf.run(rf.main_args(tmp_path, **RUN)))
  _assert_same_run(baseline, tmp_path)


# Dies in orbax's background commit of step 6: its arrays are (being) written, the step not yet renamed into place.
_DIE_DURING_ASYNC_SAVE = """
import os, signal
import orbax.checkpoint as ocp
_finalize = ocp.CheckpointManager._finalize
def _die_before_commit(self, step, *args, **kwargs):
  if step == 6:
    os.kill(os.getpid(), signal.SIGKILL)
  return _finalize(self, step, *args, **kwargs)
ocp.CheckpointManager._finalize = _die_before_commit
"""


def test_kill_during_an_async_save_leaves_the_previous_checkpoint(baseline, tmp_path):
  proc = rf.run(rf.main_args(tmp_path, **RUN), prelude=_DIE_DURING_ASYNC_SAVE)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  directory = tmp_path / "checkpoints"
  assert (directory / "6.orbax-checkpoint-tmp").is_dir() and not (directory / "6").exists()
  ckpt = _checkpoints(tmp_path)
  assert ckpt.steps() == [3] and ckpt.latest_step() == 3
  assert int(ckpt.arrays(3)["step"]) == 3
  resumed = rf.check(rf.run(rf.main_args(tmp_path, **RUN)))
  assert "resuming from step 3" in resumed.stdout
  assert not (directory / "6.orbax-checkpoint-tmp").exists()
  _assert_same_run(baseline, tmp_path)


# NaN next-item weights in the 5th batch: a NaN loss and NaN gradients at step 5.
_NAN_AT_STEP_5 = """
from pixrec_jax.data import pipeline
_split = pipeline.split_bookkeeping
_calls = [0]
def _poisoned(batch):
  inputs, bookkeeping = _split(batch)
  _calls[0] += 1
  if _calls[0] == 5:
    inputs["nig_weights"] = inputs["nig_weights"] * float("nan")
  return inputs, bookkeeping
pipeline.split_bookkeeping = _poisoned
"""


def test_nonfinite_loss_stops_naming_the_step_without_saving(tmp_path):
  proc = rf.run(rf.main_args(tmp_path, **RUN), prelude=_NAN_AT_STEP_5)
  assert proc.returncode == 1
  assert "non-finite loss or gradient at step 5" in proc.stderr and "latest checkpoint is step 3" in proc.stderr
  ckpt = _checkpoints(tmp_path)
  assert ckpt.steps() == [3]
  assert not checkpoint.nonfinite_leaves(ckpt.arrays(3))


def test_nonfinite_skip_leaves_that_update_out_and_counts_it(tmp_path):
  proc = rf.run(rf.main_args(tmp_path, **{**RUN, "checkpoint__every_steps": 1}, train__nonfinite="skip",
                             checkpoint__keep=STEPS), prelude=_NAN_AT_STEP_5)
  rf.check(proc)
  records = {r["step"]: r for r in rf.log(tmp_path)}
  assert [records[s]["nonfinite_steps"] for s in (4, 5, 6, STEPS)] == [0, 1, 1, 1]
  assert not np.isfinite(records[5]["loss"]) and np.isfinite(records[6]["loss"])
  ckpt = _checkpoints(tmp_path)
  before, skipped, after = ckpt.arrays(4), ckpt.arrays(5), ckpt.arrays(6)
  model_and_optimiser = [k for k in before if k.startswith(("params/", "opt_state/"))]
  assert all(np.array_equal(before[k], skipped[k]) for k in model_and_optimiser)
  assert not all(np.array_equal(skipped[k], after[k]) for k in model_and_optimiser)
  assert int(skipped["first_nonfinite_step"]) == 5 and int(ckpt.arrays(STEPS)["nonfinite_steps"]) == 1
  assert not checkpoint.nonfinite_leaves(ckpt.arrays(STEPS))


def test_a_checkpoint_from_another_config_names_the_mismatched_parameters(baseline, tmp_path):
  shutil.copytree(baseline / "checkpoints", tmp_path / "checkpoints")
  proc = rf.run(rf.main_args(tmp_path, **RUN, model__text__intermediate_size=192))
  assert proc.returncode == 1
  assert "was written for another model" in proc.stderr
  assert "params/backbone/text_model/layers/0/mlp/up_proj/kernel: checkpoint (128, 256) float32, this model " \
         "(128, 192) float32" in proc.stderr
  assert "model.text.intermediate_size: 256 -> 192" in proc.stderr


def test_the_best_validated_checkpoint_is_kept_besides_the_latest(tmp_path):
  rf.check(rf.run(rf.main_args(tmp_path, train__steps=9, checkpoint__every_steps=3, checkpoint__keep=1,
                               checkpoint__eval_every_steps=3, checkpoint__best_metric="valid/mrr")))
  scores = {r["step"]: r["valid/mrr"] for r in rf.log(tmp_path) if "valid/mrr" in r}
  assert sorted(scores) == [3, 6, 9] and len(set(scores.values())) > 1
  best = max(scores, key=lambda s: (scores[s], s))  # among equal scores, the later step
  ckpt = checkpoint.open_run(tmp_path)
  assert ckpt.steps() == sorted({best, 9})
  assert ckpt.best_step() == best and ckpt.resolve("best") == (best, "best by valid/mrr")
  assert ckpt.metrics(9)["valid/mrr"] == pytest.approx(scores[9])


@pytest.mark.parametrize("config", ["configs/demo.py", "configs/demo.py:text_only", "configs/amazon_smolvlm.py",
                                    "configs/amazon_text.py"])
def test_every_config_has_the_checkpoint_and_nonfinite_settings(config):
  cfg = config_lib.load_config_file(config)
  options = checkpoint.CheckpointOptions.from_config(cfg)
  assert options.every_steps > 0 and options.keep > 0 and options.async_save
  assert checkpoint.nonfinite_policy(cfg) == "stop"
  config_lib.override(cfg, "checkpoint.async", "false")
  config_lib.override(cfg, "train.nonfinite", "skip")
  assert cfg.checkpoint["async"] is False and checkpoint.nonfinite_policy(cfg) == "skip"


def test_bad_checkpoint_settings_are_named():
  with pytest.raises(ValueError, match="best_metric must name a validation metric"):
    checkpoint.CheckpointOptions(best_metric="loss")
  with pytest.raises(ValueError, match="multiple of checkpoint.every_steps"):
    checkpoint.CheckpointOptions(every_steps=4, eval_every_steps=6)
  cfg = config_lib.load_config_file("configs/demo.py")
  config_lib.override(cfg, "train.nonfinite", "ignore")
  with pytest.raises(ValueError, match="train.nonfinite must be one of"):
    checkpoint.nonfinite_policy(cfg)


def test_reading_a_missing_checkpoint_directory_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    checkpoint.Checkpointer(tmp_path / "nothing", read_only=True)
