"""bench/train_step.py's synthetic batches have the shapes training has."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from pixrec_jax import config_lib
from pixrec_jax.data import examples, processors, synthetic
from pixrec_jax.models import layers, zoo


def _bench_module(name):
  spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / f"bench/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train_step = _bench_module("train_step")
cpu_ops = _bench_module("cpu_ops")
attention = _bench_module("attention")
optimizer_update = _bench_module("optimizer_update")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  dataset = synthetic.generate(tmp_path_factory.mktemp("synthetic"))
  return dataset, processors.load_tokenizer(dataset.tokenizer_path)


@pytest.mark.parametrize("config", ["configs/demo.py", "configs/smolvlm_256m.py", "configs/paligemma2_3b_224.py",
                                    "configs/demo.py:text_only"])
def test_layout_equals_the_prompt_builders_plan_for_the_synthetic_catalogue(catalogue, config):
  dataset, tokenizer = catalogue
  cfg, _ = config_lib.parse_args(["--config", config])
  text_only = bool(cfg.pixrec.text_only)
  bcfg = zoo.backbone_config(cfg.model, tokenizer)
  texts = [dataset.item_text(i, cfg.data.template) for i in range(dataset.num_items)]
  want = examples.PromptBuilder.plan(tokenizer, texts, max_history=cfg.data.max_history,
                                     image_seq_len=0 if text_only else bcfg.image_seq_len,
                                     image_size=bcfg.vision.image_size, style=examples.prompt_style(bcfg.model_type))
  got = train_step.layout_for(bcfg, max_history=cfg.data.max_history, text_only=text_only)
  assert got == want


@pytest.mark.parametrize("style,image_seq_len", [("idefics3", 4), ("paligemma", 16)])
def test_synthetic_batch_has_one_image_block_per_valid_slot(style, image_seq_len):
  layout = examples.Layout(max_history=5, max_item_tokens=13, seq_len=256, item_len=40, image_seq_len=image_seq_len,
                           image_size=8, style=style)
  batch = train_step.synthetic_batch(layout, batch=16, vocab=96, image_token=3, seed=1)
  valid = batch["image_valid"].sum(1)
  assert set(valid) <= set(range(2, 7)) and len(set(valid)) > 1  # 1..5 history items + the target
  np.testing.assert_array_equal((batch["full_ids"] == 3).sum(1), valid * image_seq_len)
  np.testing.assert_array_equal((batch["item_ids"] == 3).sum(1), image_seq_len)
  np.testing.assert_array_equal(batch["target_slot"], valid - 1)
  rows = np.arange(16)[:, None]
  np.testing.assert_array_equal(batch["full_ids"][rows, batch["nig_positions"] + 1], batch["nig_labels"])
  assert (batch["full_mask"] == batch["user_mask"] + batch["target_mask"]).all()
  assert not batch["images"][~batch["image_valid"]].any() and batch["images"][batch["image_valid"]].std() > 0.5
  # Packed as the pipeline packs: uint8 rows, each valid slot's own row, and the processors' pixel table.
  packed = train_step.synthetic_batch(layout, batch=16, vocab=96, image_token=3, seed=1, image_budget=80)
  assert packed["images"].dtype == np.uint8 and packed["images"].shape[0] == 80
  rows = packed["image_index"][packed["image_valid"]]
  np.testing.assert_array_equal(rows, np.arange(len(rows)))
  np.testing.assert_allclose(packed["pixel_lut"][:, [0, 255]], [[-1, 1]] * 3)
  # data.image_budget=-1: the batch's own images rounded up to 8 rows, never more rows than its slots.
  chosen = train_step.synthetic_batch(layout, batch=16, vocab=96, image_token=3, seed=1, image_budget=-1)
  assert chosen["images"].shape[0] == -(-int(packed["image_valid"].sum()) // 8) * 8
  one = train_step.synthetic_batch(layout, batch=1, vocab=96, image_token=3, seed=1, image_budget=-1)
  assert one["images"].shape[0] == one["image_valid"].size == layout.max_history + 1


def test_train_step_never_waits_for_the_device():
  """Steps run back to back with no device-to-host transfer (a log line's device_get is the only sync).
  Text only and one layer, to compile fast; bench/train_step.py times every model under the same guard."""
  import jax

  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1",
                                  "--config.train.batch_size=4"])
  bcfg = train_step.backbone_config(cfg)
  layout = train_step.layout_for(bcfg, max_history=cfg.data.max_history, text_only=True)
  batch = train_step.synthetic_batch(layout, batch=4, vocab=bcfg.text.vocab_size, image_token=bcfg.image_token_id)
  trainer, _ = train_step.build_trainer(cfg, bcfg, text_only=True)
  state = trainer.init_state()
  state, _ = trainer.step(state, batch)  # compiles
  resident = trainer.put_batch(batch)  # bench/train_step.py --resident: the same program, no copy
  with jax.transfer_guard("disallow"):
    state, _ = trainer.step(state, resident)
  with jax.transfer_guard_device_to_host("disallow"):
    for _ in range(2):
      state, metrics = trainer.step(state, batch)
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("causal_blocks", [1, 2])
def test_cpu_ops_times_the_same_computation_in_both_libraries(causal_blocks):
  # bench/cpu_ops.py compares like with like only if each pair computes the same values: the matmuls, the
  # MLP's four gradients, our attention's dQ, dK, dV against PyTorch's fused kernel (padding, GQA), and the
  # rotary embedding's output and input gradient (ours a custom VJP) against transformers' rotate_half form.
  # The vision case's 512 patches take XLA attention's map over heads (layers._map_heads) on CPU, its
  # forward alone against PyTorch's under no_grad; its MLP (SigLIP's: tanh GELU, biases) gives its five
  # gradients.
  pairs = cpu_ops.cases(batch=3, seq=24, hidden=16, ffn=32, heads=4, kv_heads=2, head_dim=8,
                        causal_blocks=causal_blocks, vision=(2, 512, 2, 8))
  assert layers._map_heads(1, 512, 512) and not layers._map_heads(1, 511, 512) and not layers._map_heads(2, 512, 512)
  assert len(pairs) == 9
  for name, (ours, theirs) in pairs.items():
    got, want = ours(), theirs()
    got, want = (got, want) if isinstance(want, (tuple, list)) else ((got,), (want,))
    assert len(got) == len(want), name
    for g, w in zip(got, want):
      w = w.detach().numpy()
      assert g.shape == w.shape and np.abs(w).max() > 0, name
      np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4 * np.abs(w).max(), err_msg=name)


def test_attention_bench_reports_each_kernel_against_xla(capsys):
  # On CPU the fused kernels run in Pallas's interpreter: tiny shapes, every key block and the soft-cap.
  result = attention.main(["--batch", "2", "--seq", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                           "--softcap", "5", "--dtype", "float32", "--rounds", "1", "--iters", "1"])
  assert "cudnn" not in result  # soft-capped: no cuDNN path, reported as skipped
  assert result["xla"]["ms"] > 0 and result["pallas"]["ms"] > 0 and result["pallas_speedup_vs_xla"] > 0
  diffs = result["pallas"]["max_abs_diff_vs_xla"]
  assert set(diffs) == {"out", "dq", "dk", "dv"} and max(diffs.values()) < 1e-5, diffs
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(result))


def test_packed_prompts_take_the_fewest_rows_and_count_their_flops(monkeypatch):
  """--pack-rows auto packs the synthetic batch's prompts (as data.pack_rows) into the fewest rows they fit,
  and the FLOP count is that of those rows, not of a row per example. The result records the process's
  malloc tunables (they move CPU timings), and no empty ones."""
  from pixrec_jax import flops
  from pixrec_jax.data import packing

  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.setenv("XLA_FLAGS", "")
  args = ["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1", "--batch", "8",
          "--warmup", "1", "--rounds", "1", "--steps", "1", "--config.data.pack_items=False"]
  packed = train_step.main(args + ["--pack-rows", "auto"])
  assert packed["env"] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1"])
  bcfg = train_step.backbone_config(cfg)
  layout = train_step.layout_for(bcfg, max_history=cfg.data.max_history, text_only=True)
  lengths = train_step.synthetic_batch(layout, batch=8, vocab=bcfg.text.vocab_size, image_token=0)["full_mask"].sum(1)
  assert packed["pack_rows"] == packing.fewest_rows(lengths, layout.seq_len) < 8
  plain = flops.train_flops(bcfg, flops.step_shapes(layout, 8), proj_dim=cfg.pixrec.proj_dim, text_only=True)
  rows = flops.train_flops(bcfg, flops.step_shapes(layout, 8, full_rows=packed["pack_rows"]),
                           proj_dim=cfg.pixrec.proj_dim, text_only=True)
  assert rows["decoder_full"] == plain["decoder_full"] * packed["pack_rows"] / 8
  assert rows["decoder_item"] == plain["decoder_item"] and np.isfinite(packed["loss"])


def test_packed_items_take_rows_too_and_leave_no_item_pass():
  """--config.data.pack_items=True packs the items read alone into the rows as well: the fewest rows for
  prompts and items together, the same loss as a separate item pass, and no item-pass FLOPs."""
  from pixrec_jax import flops
  from pixrec_jax.data import packing

  base = ["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1",
          "--config.data.pack_items=False"]
  cfg, _ = config_lib.parse_args(base)
  bcfg = train_step.backbone_config(cfg)
  layout = train_step.layout_for(bcfg, max_history=cfg.data.max_history, text_only=True)
  batch = train_step.synthetic_batch(layout, batch=8, vocab=bcfg.text.vocab_size, image_token=0)
  rows = packing.fewest_rows(packing.segment_lengths(batch["full_mask"], batch["item_mask"]), layout.seq_len)
  args = base + ["--batch", "8", "--warmup", "1", "--rounds", "1", "--steps", "1"]
  apart = train_step.main(args + ["--pack-rows", "auto"])
  # A row count, not auto: at these text-only shapes the items do not pay (packing.items_pay), and auto
  # leaves them apart, as the next assertion shows.
  together = train_step.main(args + ["--pack-rows", str(rows), "--config.data.pack_items=True"])
  assert together["pack_items"] and not apart["pack_items"]
  auto = train_step.main(args + ["--pack-rows", "auto", "--config.data.pack_items=True"])
  assert not auto["pack_items"] and auto["pack_rows"] == apart["pack_rows"]
  assert not packing.items_pay(rows, apart["pack_rows"], batch=8, seq_len=layout.seq_len, item_len=layout.item_len)
  assert together["pack_rows"] == rows >= apart["pack_rows"]
  np.testing.assert_allclose(together["loss"], apart["loss"], rtol=1e-5)
  shapes = flops.step_shapes(layout, 8, full_rows=together["pack_rows"], items_packed=True)
  count = flops.train_flops(bcfg, shapes, proj_dim=cfg.pixrec.proj_dim, text_only=True)
  assert count["decoder_item"] == 0 and together["tflop_per_step"] == round(count["total"] / 1e12, 4)


@pytest.mark.parametrize("interleave", [False, True])
def test_torch_reference_runs_the_same_batch_right_after_or_between_our_rounds(interleave, capsys):
  """--torch runs bench/torch_reference.py on the spec after ours; --interleave runs it alongside, a round of
  its after each of ours. Either way the ratio is ours over its examples/s from the median step times, and
  the reference starts from the same loss on the same batch (its random init differs, so only roughly)."""
  args = ["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1", "--batch", "4",
          "--warmup", "1", "--rounds", "3", "--steps", "1", "--interleave" if interleave else "--torch"]
  result = train_step.main(args)
  out = capsys.readouterr().out.strip().splitlines()
  theirs = json.loads(out[-3])  # the reference's own line, then the ratio, then ours
  assert json.loads(out[-1]) == json.loads(json.dumps(result))
  assert theirs["bench"] == "torch_reference" and theirs["rounds"] == 3 and theirs["interleaved"] == interleave
  assert result["ratio_vs_torch"] == pytest.approx(
      result["batch"] / result["step_s"] / (theirs["batch"] / theirs["torch_step_s"]), rel=1e-3)
  assert np.isfinite(theirs["torch_loss"]) and np.isfinite(result["loss"])
  if interleave:  # a round's ratio each, their median the reported one's neighbourhood
    ratios = result["round_ratios_vs_torch"]
    assert len(ratios) == 3 and min(ratios) <= result["ratio_vs_torch"] * 1.001 and all(r > 0 for r in ratios)
    assert result["paired_ratio_vs_torch"] == sorted(ratios)[1]
  else:
    assert "round_ratios_vs_torch" not in result and "paired_ratio_vs_torch" not in result


def test_matmul_rate_times_the_largest_mlp_and_holds_the_step_against_it(capsys):
  """--matmul-rate times the three matmuls of the backbone's largest MLP projection (SigLIP's 768 -> 3072 in
  smolvlm_256m, not its decoder's 576 -> 1536) and reports their joint rate, the FLOPs of all three over
  their summed times, and the step's TFLOP/s as a fraction of it."""
  smolvlm, _ = config_lib.parse_args(["--config", "configs/smolvlm_256m.py"])
  assert train_step.matmul_shape(train_step.backbone_config(smolvlm)) == (3072, 768, 3072)
  args = ["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1", "--batch", "4",
          "--warmup", "1", "--rounds", "1", "--steps", "1", "--matmul-rate"]
  result = train_step.main(args)
  rate = result["matmul"]
  assert rate["shape"] == [3072, 128, 256] and rate["dtype"] == "float32"  # the demo decoder's MLP, text only
  assert set(rate["tflops_each"]) == {"x @ W", "dy @ W.T", "x.T @ dy"}
  joint = 3 / sum(1 / r for r in rate["tflops_each"].values())  # equal FLOPs each: the harmonic mean
  assert rate["tflops"] == pytest.approx(joint, rel=1e-4)
  # tflops_per_device is rounded to 3 decimals, of_matmul_rate (from the unrounded one) too
  rounding = 5e-4 / rate["tflops"] + 5e-4
  assert result["of_matmul_rate"] == pytest.approx(result["tflops_per_device"] / rate["tflops"], abs=rounding)
  assert "of that" in capsys.readouterr().out


def test_profile_writes_a_perfetto_trace_of_the_steps_kernels(tmp_path):
  """--profile traces the step into the folder, with a Perfetto JSON trace beside XProf's whose events are
  the step's XLA kernels (what BENCHMARKS.md's op-time sums read)."""
  import gzip

  args = ["--config", "configs/demo.py:text_only", "--config.model.text.num_hidden_layers=1", "--batch", "4",
          "--warmup", "1", "--rounds", "1", "--steps", "1", "--profile", str(tmp_path), "--profile-steps", "1"]
  train_step.main(args)
  (trace,) = tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz")
  assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
  events = json.load(gzip.open(trace))["traceEvents"]
  names = {e["name"] for e in events if e.get("ph") == "X"}
  assert any("fusion" in n for n in names) and any("train_step" in n for n in names), sorted(names)[:20]


@pytest.mark.parametrize("form", ["auto", "select"])
def test_optimizer_update_bench_applies_every_update_it_times(capsys, form):
  result = optimizer_update.main(["--config", "configs/demo.py", "--warmup", "1", "--rounds", "2", "--steps", "1",
                                  "--config.model.text.num_hidden_layers=1", "--config.model.vision.num_hidden_layers=1",
                                  "--form", form])
  assert result["updates_applied"] == 3 and result["update_s"] > 0 and result["trainable_params"] > 10**5
  assert result["form"] == {"auto": "cond", "select": "select"}[form]  # auto on the CPU: the cond
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == result


def test_length_buckets_bench_runs_the_same_batches_cut_and_uncut(capsys):
  """bench/length_buckets.py: both runs train on the same windows (the same final loss); the cut one compiles
  more shapes and reads a larger share of real tokens."""
  result = _bench_module("length_buckets").main([
      "--config", "configs/demo.py:paper", "--steps", "8", "--config.data.synthetic.num_users=60",
      "--config.model.text.num_hidden_layers=1", "--config.model.vision.num_hidden_layers=1"])
  static, cut = result["static"], result["cut"]
  assert (static["length_buckets"], cut["length_buckets"], static["shapes"]) == (0, 4, 1)
  assert cut["shapes"] > 1 and cut["real_token_share"] > static["real_token_share"]
  assert cut["real_image_share"] > static["real_image_share"]
  np.testing.assert_allclose(cut["final_loss"], static["final_loss"], rtol=1e-4)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_train_step_bench_cuts_its_batch_as_training_does_with_length_buckets():
  """data.length_buckets (smolvlm_256m:paper sets it): the synthetic batch is cut as the pipeline cuts one, the
  FLOPs and the recorded lengths are the cut batch's, and the loss is the uncut batch's."""
  args = ["--config", "configs/demo.py:paper", "--config.model.text.num_hidden_layers=1",
          "--config.model.vision.num_hidden_layers=1", "--batch", "1", "--warmup", "1", "--rounds", "1", "--steps", "1",
          "--config.data.image_budget=3"]
  static, cut = (train_step.main(args + [f"--config.data.length_buckets={k}"]) for k in (0, 4))
  assert (static["length_buckets"], cut["length_buckets"]) == (0, 4)
  assert cut["seq_len"] < static["seq_len"] and cut["item_len"] <= static["item_len"]
  assert cut["tflop_per_step"] < static["tflop_per_step"]
  np.testing.assert_allclose(cut["loss"], static["loss"], rtol=1e-5)


def test_feature_cache_bench_trains_the_same_batches_from_pixels_and_from_the_table(capsys):
  """bench/feature_cache.py: both runs train on the same windows (the same final loss); the cached one encodes
  the table first and says how long that took."""
  result = _bench_module("feature_cache").main([
      "--config", "configs/demo.py:paper", "--steps", "6", "--config.data.synthetic.num_users=60",
      "--config.model.text.num_hidden_layers=1", "--config.model.vision.num_hidden_layers=1", "--eval-items", "5"])
  pixels, cached = result["pixels"], result["cached"]
  assert pixels["eval_items"] == cached["eval_items"] == 5 and pixels["eval_s"] > 0 and cached["eval_s"] > 0
  assert result["eval_max_abs_difference"] < 1e-5  # the catalogue pass reads the table and embeds alike
  assert (pixels["cache_image_features"], cached["cache_image_features"]) == (None, "connector")
  assert pixels["encode_s"] is None and cached["encode_s"] > 0 and result["steady_speedup"] > 0
  np.testing.assert_allclose(cached["final_loss"], pixels["final_loss"], rtol=1e-5)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
