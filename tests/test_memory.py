"""The memory report: the train step compiled ahead of time for a config (tiny demo sizes)."""

import json

import pytest

from pixrec_jax import memory

TINY = ["--config.data.synthetic.num_users=60", "--config.data.synthetic.num_groups=12",
        "--config.model.text.num_hidden_layers=1", "--config.model.vision.num_hidden_layers=1",
        "--config.train.batch_size=8"]


def test_report_prints_per_device_figures_and_a_json_last_line(tmp_path, capsys):
  assert memory.main(["--config", "configs/demo.py", "--workdir", str(tmp_path), "--device_memory_gib", "0.001",
                      *TINY]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  figures = json.loads(out[-1])
  g = figures["per_device_gib"]
  assert figures["config"] == "configs/demo.py" and figures["batch_size"] == 8
  # The demo packs its prompts (and items) into rows and its distinct images into an image budget, both
  # chosen from the data: the step compiled is that of those shapes.
  assert 0 < figures["pack_rows"] < 8 and figures["batch_shapes"]["full_ids"][0] == figures["pack_rows"]
  assert 0 < figures["image_budget"] < 8 * 6 and figures["batch_shapes"]["images"][0] == figures["image_budget"]
  assert figures["trainable_param_count"] == figures["param_count"] > 100_000
  # AdamW keeps two float32 moments per trainable float32 parameter.
  assert g["optimizer_analytic"] == pytest.approx(2 * g["trainable_params_analytic"], rel=1e-3)
  assert g["params_analytic"] == pytest.approx(figures["param_count"] * 4 / memory.GIB)
  # XLA's arguments are the parameters, the optimiser state and the batch (and a few scalars).
  assert g["arguments"] == pytest.approx(g["params_analytic"] + g["optimizer_analytic"] + g["batch_analytic"],
                                         rel=0.02)
  assert g["temporaries"] > 0 and g["total"] >= g["arguments"]
  assert figures["fits"] is False  # 0.001 GiB
  assert any(line.startswith("does NOT fit in 0.001 GiB") for line in out)


def test_lora_report_counts_only_adapters_and_heads_as_trainable(tmp_path, capsys):
  assert memory.main(["--config", "configs/demo.py:lora", "--workdir", str(tmp_path), *TINY]) == 0
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert figures["lora_rank"] == 8 and figures["fits"] is True
  assert 0 < figures["trainable_param_count"] < 0.2 * figures["param_count"]
  g = figures["per_device_gib"]
  assert g["optimizer_analytic"] == pytest.approx(2 * g["trainable_params_analytic"], rel=1e-3)


def test_bad_mesh_and_devices_are_named(capsys):
  with pytest.raises(ValueError, match="--mesh: 'model=2' is not AXIS=SIZE"):
    memory.parse_mesh("data=1,model=2")
  assert memory.parse_mesh("data=1, fsdp=8") == {"data": 1, "fsdp": 8}
  assert memory.main(["--config", "configs/demo.py", "--mesh", "fsdp=x"]) == 1
  assert "--mesh: fsdp='x' is not an integer" in capsys.readouterr().err


def test_the_paper_option_is_estimated_with_its_feature_table_rows(tmp_path, capsys):
  """train.cache_image_features (the paper option's): the step compiled reads the table's rows (the image
  tokens of a tile, in the text width), not pixels, as many as the image budget."""
  figures = {}
  for on in (True, False):
    assert memory.main(["--config", "configs/demo.py:paper", "--workdir", str(tmp_path / str(on)), *TINY,
                        f"--config.train.cache_image_features={on}"]) == 0
    figures[on] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  cached, pixels = figures[True]["batch_shapes"], figures[False]["batch_shapes"]
  assert "images" not in cached and "pixel_lut" not in cached and "image_features" in pixels.keys() | cached.keys()
  assert cached["image_features"][0] == pixels["images"][0] == figures[True]["image_budget"]
  seq = figures[True]["batch_shapes"]["image_features"][1:]
  assert len(seq) == 2 and seq[1] == 128  # (image_seq_len, the demo decoder's width)
