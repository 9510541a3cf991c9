"""Config files, overrides and the command-line errors users see."""

import subprocess
import sys

import pytest

from pixrec_jax import config_lib

DEMO = "configs/demo.py"


def test_leaf_overrides_are_typed():
  cfg, workdir = config_lib.parse_args(["--config", DEMO, "--workdir", "/tmp/x", "--config.train.steps=200",
                                        "--config.train.lr", "3e-4", "--config.eval.mask_history=false",
                                        "--config.eval.splits=test"])
  assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
  assert cfg.train.lr == pytest.approx(3e-4)
  assert cfg.eval.mask_history is False
  assert tuple(cfg.eval.splits) == ("test",)
  assert str(workdir) == "/tmp/x"


def test_config_argument_selects_the_text_only_baseline():
  cfg, _ = config_lib.parse_args(["--config", f"{DEMO}:text_only"])
  assert cfg.pixrec.text_only is True
  base, _ = config_lib.parse_args(["--config", DEMO])
  assert base.pixrec.text_only is False


def test_paper_preset_sets_the_published_values():
  cfg, _ = config_lib.parse_args(["--config", f"{DEMO}:paper"])
  assert (cfg.pixrec.alpha, cfg.pixrec.beta, cfg.pixrec.temperature) == (0.125, -0.025, 0.5)
  assert cfg.train.trainable == "heads_lm_head" and cfg.train.lr == 1e-4


def test_unknown_key_lists_the_valid_keys():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.parse_args(["--config", DEMO, "--config.train.stepz=5"])
  msg = str(e.value)
  assert "'train.stepz'" in msg and "steps" in msg and "batch_size" in msg and "lr" in msg
  with pytest.raises(config_lib.ConfigError, match="Valid keys there: .*train.steps"):
    config_lib.parse_args(["--config", DEMO, "--config.trainx.steps=5"])


def test_bad_values_and_arguments_are_named():
  with pytest.raises(config_lib.ConfigError, match="train.steps: expected an integer"):
    config_lib.parse_args(["--config", DEMO, "--config.train.steps=many"])
  with pytest.raises(config_lib.ConfigError, match="names a group"):
    config_lib.parse_args(["--config", DEMO, "--config.train=1"])
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.parse_args(["--config", "configs/nope.py"])
  with pytest.raises(ValueError, match="unknown option"):
    config_lib.parse_args(["--config", f"{DEMO}:txt_only"])


def test_main_exits_2_with_the_message_on_a_bad_key():
  proc = subprocess.run([sys.executable, "-m", "pixrec_jax.main", "--config", DEMO, "--config.bogus=1"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'bogus'" in proc.stderr and "train.steps" in proc.stderr
