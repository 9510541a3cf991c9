"""The launch scripts in dry-run mode: the exact commands they would run."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu" / "tpu.py"
LOCAL_GPU = ROOT / "launch" / "gpu" / "local_multi_gpu.sh"
SLURM = ROOT / "launch" / "gpu" / "slurm.sbatch"
JAX_VERSION = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)


def _dry_run(*argv: str) -> list[list[str]]:
  """Runs a launch script with --dry-run; each printed line split as a shell would."""
  proc = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _tpu(*args: str) -> list[list[str]]:
  return _dry_run(sys.executable, TPU, *args)


def _remote(cmd: list[str]) -> str:
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  return cmd[cmd.index("--command") + 1]


@pytest.mark.parametrize("accelerator, created, runtime", [
    ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v5p-32", "v2-alpha-tpuv5"),
    ("v6e-64", "v6e-64", "v2-alpha-tpuv6e"),
])
@pytest.mark.parametrize("spot", [False, True])
def test_tpu_create_picks_the_generations_runtime(accelerator, created, runtime, spot):
  (cmd,) = _tpu("create", "pix", "--zone", "us-east5-b", "--accelerator-type", accelerator, "--dry-run",
                *(["--spot"] if spot else []))
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pix", "--zone=us-east5-b",
                 f"--accelerator-type={created}", f"--version={runtime}"] + (["--spot"] if spot else [])


def test_tpu_queued_resource_create_and_delete():
  (cmd,) = _tpu("create", "pix", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type", "v5p-128",
                "--queued", "--spot", "--dry-run")
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "pix", "--node-id=pix",
                 "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-128",
                 "--runtime-version=v2-alpha-tpuv5", "--spot"]
  (cmd,) = _tpu("delete", "pix", "--zone", "us-east5-a", "--queued", "--dry-run")
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pix", "--zone=us-east5-a", "--force",
                 "--quiet"]
  (cmd,) = _tpu("status", "pix", "--zone", "us-east5-a", "--queued", "--dry-run")
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pix", "--zone=us-east5-a"]


def test_tpu_delete():
  (cmd,) = _tpu("delete", "pix", "--zone", "europe-west4-a", "--dry-run")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pix", "--zone=europe-west4-a", "--quiet"]


def test_tpu_install_ships_the_commit_to_every_worker():
  archive, scp, ssh = _tpu("install", "pix", "--zone", "us-east5-b", "--dry-run")
  assert archive[:3] == ["git", "-C", str(ROOT)] and "archive" in archive and archive[-1] == "HEAD"
  tarball = archive[archive.index("archive") + 2].removeprefix("--output=")
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pix:pixrec_jax.tar.gz",
                 "--zone=us-east5-b", "--worker=all"]
  assert "--worker=all" in ssh
  remote = _remote(ssh)
  assert "tar -xzf ~/pixrec_jax.tar.gz -C ~/pixrec_jax" in remote
  assert f'-r ~/pixrec_jax/requirements.txt -e ~/pixrec_jax "jax[tpu]=={JAX_VERSION}"' in remote


def test_tpu_run_starts_the_job_on_every_worker_with_its_config():
  (cmd,) = _tpu("run", "pix", "--zone", "us-east5-b", "--config", "configs/demo.py:text_only", "--workdir",
                "/mnt/runs/demo", "--dry-run", "--", "--config.train.steps=100", '--config.eval.splits=("test",)')
  assert cmd[5:8] == ["pix", "--zone=us-east5-b", "--worker=all"]
  remote = _remote(cmd)
  assert remote.startswith("cd ~/pixrec_jax && (nohup ~/pixrec_venv/bin/python -m pixrec_jax.main ")
  job = shlex.split(remote.split("nohup ", 1)[1].split(" > ", 1)[0])
  assert job == ["~/pixrec_venv/bin/python", "-m", "pixrec_jax.main", "--config", "configs/demo.py:text_only",
                 "--workdir", "/mnt/runs/demo", "--config.distributed.enabled=true", "--config.train.steps=100",
                 '--config.eval.splits=("test",)']
  assert remote.endswith("> ~/pixrec_run.log 2>&1 < /dev/null & echo $! > ~/pixrec_run.pid)")


def test_tpu_run_on_one_worker_in_the_foreground():
  (cmd,) = _tpu("run", "pix", "--zone", "z", "--config", "configs/demo.py", "--workdir", "w", "--worker", "0",
                "--foreground", "--dry-run")
  assert "--worker=0" in cmd and _remote(cmd).endswith("2>&1 | tee ~/pixrec_run.log")


def test_tpu_logs_and_stop_select_workers():
  (cmd,) = _tpu("logs", "pix", "--zone", "z", "--dry-run")
  assert "--worker=0" in cmd and _remote(cmd) == "tail -n +1 -F ~/pixrec_run.log"
  (cmd,) = _tpu("logs", "pix", "--zone", "z", "--worker", "3", "--no-follow", "--dry-run")
  assert "--worker=3" in cmd and _remote(cmd) == "cat ~/pixrec_run.log"
  (cmd,) = _tpu("stop", "pix", "--zone", "z", "--dry-run")
  assert "--worker=all" in cmd and 'kill -TERM "$(cat ~/pixrec_run.pid)"' in _remote(cmd)


def test_tpu_refuses_unknown_generations_and_stray_job_arguments():
  proc = subprocess.run([sys.executable, TPU, "create", "pix", "--zone", "z", "--accelerator-type", "v9x-8",
                         "--dry-run"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "v5litepod" in proc.stderr and not proc.stdout
  proc = subprocess.run([sys.executable, TPU, "logs", "pix", "--zone", "z", "--dry-run", "--", "--config.x=1"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "only run" in proc.stderr


def test_local_gpu_one_process_drives_every_gpu():
  (cmd,) = _dry_run("bash", LOCAL_GPU, "--dry-run", "--gpus", "8", "configs/demo.py", "/tmp/my run",
                    "--config.train.steps=10")
  assert cmd == ["python", "-m", "pixrec_jax.main", "--config", "configs/demo.py", "--workdir", "/tmp/my run",
                 "--config.distributed.enabled=false", "--config.train.steps=10"]


def test_local_gpu_processes_split_the_gpus_and_join_one_job():
  cmds = _dry_run("bash", LOCAL_GPU, "--dry-run", "--gpus", "8", "--processes", "4", "--port", "4321",
                  "configs/demo.py:text_only", "w", "--config.data.template=it's {title}")
  assert len(cmds) == 4
  for i, cmd in enumerate(cmds):
    assert cmd == ["env", f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}", "python", "-m", "pixrec_jax.main",
                   "--config", "configs/demo.py:text_only", "--workdir", "w", "--config.distributed.enabled=true",
                   "--config.distributed.coordinator_address=127.0.0.1:4321",
                   "--config.distributed.num_processes=4", f"--config.distributed.process_id={i}",
                   "--config.data.template=it's {title}"]
  proc = subprocess.run(["bash", LOCAL_GPU, "--dry-run", "--gpus", "8", "--processes", "3", "c", "w"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "do not split evenly" in proc.stderr


def test_slurm_template_one_task_per_node_and_its_srun():
  directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SLURM.read_text(), re.MULTILINE))
  assert directives["ntasks-per-node"] == "1" and int(directives["nodes"]) > 1
  assert int(directives["gpus-per-node"]) >= 1
  (cmd,) = _dry_run("bash", SLURM, "--dry-run", "configs/amazon_text.py", "/shared/runs/a",
                    "--config.train.steps=1000")
  assert cmd == ["srun", "--kill-on-bad-exit=1", "python", "-m", "pixrec_jax.main", "--config",
                 "configs/amazon_text.py", "--workdir", "/shared/runs/a", "--config.distributed.enabled=true",
                 "--config.train.steps=1000"]


@pytest.mark.parametrize("script", [LOCAL_GPU, SLURM])
def test_shell_scripts_parse(script):
  assert subprocess.run(["bash", "-n", script], capture_output=True, timeout=60).returncode == 0
