"""Multi-process training equals single-process training, and when jax.distributed starts.

The end-to-end test runs tests/distributed_training.py as 2 local processes of 2
CPU devices each, joined through jax.distributed (gloo collectives, the CPU
default in jax 0.10), next to 1 process of 4 devices; both run the same short job.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from pixrec_jax import config_lib, distributed
from pixrec_jax.data import pipeline, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"single": [one JSON report], "multi": [two]} and their workdirs."""
  tmp = tmp_path_factory.mktemp("distributed")
  data = tmp / "data"
  synthetic.generate(data, synthetic.SyntheticOptions(num_users=40))  # once, not raced by the processes
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  port = _free_port()
  layouts = {"single": (1, 4), "multi": (2, 2)}
  procs = {}
  # All three processes at once: the two halves of the multi-process job must run together anyway.
  for name, (count, devices) in layouts.items():
    procs[name] = [subprocess.Popen([sys.executable, "-m", "tests.distributed_training", str(tmp / name), str(data),
                                     str(i), str(count), str(devices), str(port)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for i in range(count)]
  out = {}
  for name, group in procs.items():
    reports = []
    for proc in group:
      stdout, stderr = proc.communicate(timeout=600)
      assert proc.returncode == 0, f"{name} process failed:\n{stderr[-4000:]}"
      reports.append(json.loads(stdout.strip().splitlines()[-1]))
    out[name] = reports
  return out, tmp


def _losses(workdir: pathlib.Path) -> list[float]:
  return [json.loads(line)["loss"] for line in (workdir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one_with_all_devices(runs):
  out, tmp = runs
  (single,), multi = out["single"], out["multi"]
  assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in multi] == [(0, 2, 4, 2),
                                                                                               (1, 2, 4, 2)]
  assert [r["rows"] for r in multi] == [[0, 2], [1, 2]]  # each host read its half of every batch
  # The demo's packing, chosen from the data on each host alike: image rows (at most the batch's 8 x 4
  # slots) and packed rows (fewer than its 8 prompts and 8 items), split evenly over the processes.
  packing = {(r["image_budget"], r["pack_rows"], r["pack_items"]) for r in multi}
  assert len(packing) == 1
  budget, rows, _ = packing.pop()
  assert 0 < budget <= 32 and budget % 2 == 0 and 0 < rows < 16 and rows % 2 == 0
  # Only process 0 logs: one line per step, not one per process.
  want = _losses(tmp / "single")
  assert len(want) == 3
  np.testing.assert_allclose(_losses(tmp / "multi"), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_evaluation_covers_every_user_once_on_every_process(runs):
  out, tmp = runs
  (single,), multi = out["single"], out["multi"]
  assert multi[0]["eval_users"] == multi[1]["eval_users"] == single["eval_users"]
  assert multi[0]["eval"] == multi[1]["eval"]  # ranked from the same gathered embeddings
  want = np.load(tmp / "single" / "embeddings_0.npz")
  assert want["users"].shape[0] == single["eval_users"]["test"]
  for process in range(2):
    got = np.load(tmp / "multi" / f"embeddings_{process}.npz")
    for key in ("items", "users"):
      # Metrics are not compared with the single process's: a near tie may rank either way
      # when the two runs' weights differ in the last bits, as all-reduces may make them.
      np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_checkpoint_saved_by_both_processes_restores(runs):
  out, _ = runs
  (single,), multi = out["single"], out["multi"]
  for report in multi:
    assert report["restored_equal"] and report["restored_shardings_equal"]
    assert report["arrays_sharded_across_processes"] > 0  # the checkpoint really holds shards of both
    np.testing.assert_allclose(report["losses_after_restore"], single["losses_after_restore"], atol=1e-5, rtol=0)
  assert single["restored_equal"]


@pytest.mark.slow
def test_each_process_encodes_the_whole_feature_table_and_trains_like_one(runs):
  """train.cache_image_features on two processes: both tables equal the one process's, and so do the losses of
  the steps that read them."""
  out, _ = runs
  (single,), multi = out["single"], out["multi"]
  assert {r["feature_cache"] for r in multi + [single]} == {"connector"}
  for report in multi:
    np.testing.assert_allclose(report["feature_table_sum"], single["feature_table_sum"], rtol=1e-6)
    np.testing.assert_allclose(report["cached_losses"], single["cached_losses"], atol=1e-5, rtol=0)


def test_hosts_read_disjoint_blocks_that_make_up_the_one_host_batches(text_builder, small_splits):
  def batches(**kw):
    it = iter(pipeline.train_dataset(small_splits.train, text_builder, seed=3, **kw))
    return [next(it) for _ in range(4)]

  whole = batches(batch_size=8)
  halves = [batches(batch_size=4, shard_index=i, shard_count=2) for i in range(2)]
  for k, want in enumerate(whole):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), want[key], err_msg=key)


def _group(**values) -> ml_collections.ConfigDict:
  group = distributed.default_config()
  group.update(values)
  return group


def test_every_config_has_the_distributed_group_and_flags_set_it():
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py", "--config.distributed.enabled=true",
                                  "--config.distributed.coordinator_address=10.0.0.2:1234",
                                  "--config.distributed.num_processes=4", "--config.distributed.process_id=3",
                                  "--config.distributed.local_device_ids=0,1"])
  chosen = distributed.plan(cfg.distributed, environ={}, cloud_tpu=False)
  assert chosen == distributed.Plan("config", "10.0.0.2:1234", 4, 3, (0, 1)) and chosen.complete


def test_auto_stays_single_process_outside_a_cluster():
  assert distributed.plan(_group(), environ={}, cloud_tpu=False) is None
  assert distributed.plan(_group(), environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"},
                          cloud_tpu=False) is None
  assert distributed.plan(_group(enabled="false"), environ={"JAX_NUM_PROCESSES": "2"}, cloud_tpu=True) is None
  with pytest.raises(ValueError, match="distributed.enabled"):
    distributed.plan(_group(enabled="sometimes"), environ={})


def test_environment_variables_start_it_and_config_fields_win():
  env = {"JAX_COORDINATOR_ADDRESS": "host0:9999", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}
  assert distributed.plan(_group(), environ=env, cloud_tpu=False) == distributed.Plan("env", "host0:9999", 8, 5)
  chosen = distributed.plan(_group(process_id=2), environ=env, cloud_tpu=False)
  assert (chosen.source, chosen.process_id, chosen.num_processes) == ("config", 2, 8)


def test_slurm_tasks_find_the_first_node_as_coordinator():
  batch_script = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NNODES": "4",
                  "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[007-009,012]"}
  assert distributed.plan(_group(), environ=batch_script, cloud_tpu=False) is None  # not started by srun
  env = {**batch_script, "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "gpu[007-009,012]", "SLURM_STEP_NUM_TASKS": "4",
         "SLURM_STEP_NUM_NODES": "4"}
  chosen = distributed.plan(_group(), environ=env, cloud_tpu=False)
  # One task per node drives all of its GPUs: no local_device_ids.
  assert chosen == distributed.Plan("slurm", f"gpu007:{61440 + 1234 % 4096}", 4, 2, None)
  two_per_node = {**env, "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1", "JAX_COORDINATOR_PORT": "5000"}
  assert distributed.plan(_group(), environ=two_per_node, cloud_tpu=False) == distributed.Plan(
      "slurm", "gpu007:5000", 4, 2, (1,))
  one_gpu_each = {**two_per_node, "CUDA_VISIBLE_DEVICES": "3"}  # --gpus-per-task=1 already split them
  assert distributed.plan(_group(), environ=one_gpu_each, cloud_tpu=False).local_device_ids is None


@pytest.mark.parametrize("nodelist, first", [("node001", "node001"), ("a1,b2", "a1"), ("n[3-5]", "n3"),
                                             ("rack1-n[08,10-11],x", "rack1-n08"), ("gpu[1-2]-ib", "gpu1-ib")])
def test_first_slurm_host(nodelist, first):
  assert distributed.first_slurm_host(nodelist) == first


def test_cloud_tpu_leaves_the_values_to_jax():
  assert distributed.plan(_group(), environ={}, cloud_tpu=True) == distributed.Plan("cloud_tpu")
  assert distributed.on_cloud_tpu({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert distributed.plan(_group(enabled="true"), environ={}, cloud_tpu=False) == distributed.Plan("enabled=true")
