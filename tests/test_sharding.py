"""Sharded training equals single-device training (8 forced CPU devices, in a subprocess),
for SmolVLM and PaliGemma 2 backbones; one mesh per family runs scanned layers under remat."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ("smolvlm", "paligemma")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-m", "tests.sharded_training", str(tmp_path_factory.mktemp("shard"))],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_no_activation_is_resharded_by_replication(runs):
  # GSPMD warns when it can only reshard an array by replicating it. The embedding lookup (table features
  # sharded over fsdp) and the image-feature merge (a gather across examples) did this to whole
  # (batch, length, features) activations until both were given replicated tables.
  lines = [line for line in runs["stderr"].splitlines() if "Involuntary full rematerialization" in line]
  assert not lines, "\n".join(line[:400] for line in lines[:5])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mesh", ["fsdp4_data2", "tp2_fsdp2_dp2"])
def test_mesh_gives_single_device_losses_and_params(runs, family, mesh):
  want, got = runs[family]["single"], runs[family][mesh]
  np.testing.assert_allclose(got["losses"], want["losses"], atol=1e-5, rtol=0)
  assert set(got["params"]) == set(want["params"])
  for name, values in want["params"].items():
    np.testing.assert_allclose(got["params"][name], values, atol=1e-5, rtol=0, err_msg=name)


def test_packed_prompts_on_a_mesh_give_the_unpacked_single_device_step(runs):
  """data.pack_rows on data 2 x fsdp 4: the same examples in another order and layout; the loss does not
  depend on the order, so losses and parameters equal the unpacked single-device run's."""
  want, got = runs["smolvlm"]["single"], runs["smolvlm"]["packed_fsdp4_data2"]
  np.testing.assert_allclose(got["losses"], want["losses"], atol=1e-5, rtol=0)
  for name, values in want["params"].items():
    np.testing.assert_allclose(got["params"][name], values, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_meshes_really_shard_the_state(runs, family):
  assert any("fsdp" in s for s in runs[family]["fsdp4_data2"]["specs"])
  assert any("tensor" in s for s in runs[family]["tp2_fsdp2_dp2"]["specs"])
  # One run per family has scanned layers: stacked arrays sharded, but never along their layer axis.
  scanned = [run for run in runs[family].values() if run["scanned"]]
  assert len(scanned) == 1
  assert scanned[0]["layer_axis_specs"] == ["None"] and scanned[0]["stacked_sharded"]
