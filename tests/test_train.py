"""The train step, trainable-parameter selection and the main job end to end (tiny sizes)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixrec_jax import config_lib, xla_options
from pixrec_jax import sharding as shd
from pixrec_jax.data import pipeline
from pixrec_jax.models import layers
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.train import optim
from pixrec_jax.train import run
from pixrec_jax.train import trainer as trainer_lib
from pixrec_jax.train.run import train_and_evaluate
from pixrec_jax.train.trainer import Trainer
from tests.conftest import tiny_pixrec_fn


def _trainer(model_fn, trainable, lr=3e-3):
  tx, sched = optim.optimizer(lr=lr, steps=50, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
  return Trainer(model_fn, tx, trainable, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(devices=jax.devices()[:1]), sched)


def _batch(builder, splits, n=8):
  it = iter(pipeline.train_dataset(splits.train, builder, batch_size=n, seed=0))
  return pipeline.split_bookkeeping(next(it))[0]


def _paths(state):
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


@pytest.mark.parametrize("tie", [False, True])
def test_paper_mode_trains_only_heads_and_lm_head(word_tokenizer, image_builder, small_splits, tie):
  trainable = optim.trainable_filter("heads_lm_head", tied_embeddings=tie, text_only=False)
  trainer = _trainer(tiny_pixrec_fn(word_tokenizer, tie), trainable)
  state = trainer.init_state()
  roots = {p.rsplit("/", 1)[0] for p in _paths(state.params)}
  head = "backbone/text_model/embed_tokens" if tie else "backbone/lm_head"
  assert roots == {"user_proj", "item_proj", head}
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  state, _ = trainer.step(state, _batch(image_builder, small_splits))
  for (path, before), (_, after) in zip(nnx.to_flat_state(frozen_before), nnx.to_flat_state(state.frozen)):
    assert np.array_equal(np.asarray(before[...]), np.asarray(after[...])), path


def test_frozen_vision_and_text_only_freeze_the_vision_tower(word_tokenizer):
  fn = tiny_pixrec_fn(word_tokenizer, False)
  frozen_vision = _trainer(fn, optim.trainable_filter("frozen_vision", tied_embeddings=False, text_only=False))
  paths = _paths(frozen_vision.init_state().params)
  assert not any(p.startswith("backbone/vision_model") for p in paths)
  assert any(p.startswith("backbone/connector") for p in paths)
  text_only = _trainer(tiny_pixrec_fn(word_tokenizer, False, text_only=True),
                       optim.trainable_filter("all", tied_embeddings=False, text_only=True))
  paths = _paths(text_only.init_state().params)
  assert not any(p.startswith(("backbone/vision_model", "backbone/connector")) for p in paths)
  with pytest.raises(ValueError, match="train.trainable must be one of"):
    optim.trainable_filter("lora", tied_embeddings=False, text_only=False)


def test_train_step_fits_a_fixed_batch(word_tokenizer, image_builder, small_splits):
  trainer = _trainer(tiny_pixrec_fn(word_tokenizer, False), nnx.Param, lr=1e-2)
  state = trainer.init_state()
  batch = _batch(image_builder, small_splits)
  losses = []
  for _ in range(25):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 25
  assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("scale", [0.01, 100.0])  # below and above the clipping norm
def test_clip_by_global_norm_is_optax_s_with_or_without_the_norm_given(scale):
  """optax's result: unchanged to the bit below the threshold, within a rounding above it (ours multiplies by
  one factor, max_norm / norm, where optax divides each element by the norm and multiplies by max_norm)."""
  grads = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3) * scale, "b": np.full(3, -scale, np.float32)}
  ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  expected, _ = theirs.update(grads, theirs.init(grads))
  for given in (None, optax.tree.norm(grads)):
    got, state = ours.update(grads, ours.init(grads), grad_norm=given)
    assert state == theirs.init(grads)  # the same (empty) state: checkpoints load either way
    for key in grads:
      if scale < 1:
        np.testing.assert_array_equal(got[key], grads[key])
      else:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-7, atol=0)
    if scale > 1:
      assert float(optax.tree.norm(got)) == pytest.approx(1.0, rel=1e-6)
  assert scale < 1 or not np.array_equal(expected["a"], grads["a"])  # the large case did clip


def test_global_norm_is_optax_s_and_reads_each_leaf_once_on_cpu():
  """optim.global_norm equals optax.tree.norm (to float32 rounding) for leaves of any size and dtype; on the
  CPU its compiled form writes no array the size of a leaf (optax's writes each leaf's squares, then reduces
  them in XLA's slow windows)."""
  rng = np.random.default_rng(0)
  tree = {"w": rng.standard_normal((512, 384)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
          "s": np.float32(3.0), "e": np.zeros((0, 4), np.float32), "odd": rng.standard_normal((5, 3, 11)),
          "half": jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)}
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  assert float(jax.jit(optim.global_norm)(tree)) == pytest.approx(want, rel=1e-6)
  assert float(optim.global_norm({"a": np.float32(-2.0)})) == 2.0

  def written(fn):  # element counts of the arrays the compiled norm of a (4096, 256) leaf writes
    hlo = jax.jit(fn, compiler_options=xla_options.compiler_options()).lower({"w": jnp.ones((4096, 256))})
    shapes = re.findall(r"= f32\[([\d,]+)\]\S* fusion\(", hlo.compile().as_text())
    return [int(np.prod([int(d) for d in s.split(",")])) for s in shapes]

  assert max(written(optim.global_norm)) <= 4096 * 256 // 4
  assert max(written(optax.tree.norm)) == 4096 * 256  # what the check above would catch


def test_global_norm_takes_halves_where_the_models_sums_do(monkeypatch):
  """optim.global_norm makes layers.halved_sums' choice: halves on one CPU device, optax's form where the
  model's sums are plain (a mesh of several devices, whose shards halves would slice across)."""
  tree = {"w": jnp.ones((4096, 256))}
  # A fresh function each time: jax.jit of the same one would reuse its first trace.
  sliced = lambda: "slice" in jax.jit(lambda t: optim.global_norm(t)).lower(tree).as_text()
  assert layers.halved_sums() and sliced()
  monkeypatch.setattr(layers, "halved_sums", lambda: False)
  assert not sliced() and float(optim.global_norm(tree)) == pytest.approx(float(optax.tree.norm(tree)), rel=1e-6)


def test_clip_fuses_into_the_optimiser_passes():
  """The clip is one scalar factor that XLA fuses into AdamW's passes over the gradient: the compiled update
  writes the two moments and the parameter, not a clipped copy of the gradient first (optax's per-element
  division made XLA write that copy: smolvlm_256m's update 536 / 528 -> 453 / 456 ms on the CPU, BENCHMARKS.md)."""
  tx = optax.chain(optim.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  tx = optax.with_extra_args_support(tx)
  params = {"w": jnp.ones((64, 48), jnp.float32)}

  def update(params, grads, opt_state, grad_norm):  # the norm from outside, as the trainer hands it over
    updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
    return optax.apply_updates(params, updates), opt_state

  hlo = jax.jit(update).lower(params, params, tx.init(params), jnp.float32(2.0)).compile().as_text()
  written = re.findall(r"= f32\[64,48\]\S* fusion\(", hlo)
  assert len(written) == 3, hlo  # the first moment, the second and the parameter


@pytest.mark.parametrize("under_cond", [True, False])
def test_update_is_the_optimiser_step_and_skips_a_nonfinite_gradient(word_tokenizer, under_cond):
  """Both forms of the update (a lax.cond on the non-finite check, the CPU's; new against old values
  selected leaf by leaf, the GPU's and TPU's) apply the optimiser's step and keep every old value on a
  NaN gradient; only the cond form compiles to an XLA conditional."""
  trainer = _trainer(tiny_pixrec_fn(word_tokenizer, False), nnx.Param)
  assert trainer.update_under_cond  # these tests run on the CPU
  trainer.update_under_cond = under_cond
  state = trainer.init_state()
  leaves, treedef = jax.tree.flatten(state.params)
  rng = np.random.default_rng(0)
  grads = jax.tree.unflatten(treedef, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
  new, metrics = trainer._update(state, {"loss": np.float32(1.0)}, grads)
  # What the optimiser does on its own (optax computing the norm itself, no cond).
  updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
  for got, want in zip(jax.tree.leaves((new.params, new.opt_state)),
                       jax.tree.leaves((optax.apply_updates(state.params, updates), opt_state))):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
  assert int(new.nonfinite_steps) == 0 and int(new.step) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), leaves))

  bad = jax.tree.unflatten(treedef, [np.full(x.shape, np.nan, np.float32) for x in leaves])
  skipped, metrics = trainer._update(new, {"loss": np.float32(1.0)}, bad)
  for got, want in zip(jax.tree.leaves((skipped.params, skipped.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(got, want)
  assert int(skipped.nonfinite_steps) == 1 and int(skipped.first_nonfinite_step) == 2 and int(skipped.step) == 2
  hlo = jax.jit(trainer._update).lower(new, {"loss": np.float32(1.0)}, bad).as_text()
  assert ("stablehlo.case" in hlo or "stablehlo.if" in hlo) == under_cond


def test_only_the_cpu_updates_under_a_conditional():
  """XLA:GPU copies a conditional's predicate to the host and waits for the stream: the step's update
  selects there instead (and on TPUs, where nothing was timed with the cond)."""
  assert trainer_lib.update_under_cond("cpu")
  assert not trainer_lib.update_under_cond("gpu") and not trainer_lib.update_under_cond("tpu")


def test_update_takes_an_optimiser_without_extra_arguments(word_tokenizer):
  model_fn = tiny_pixrec_fn(word_tokenizer, False)
  trainer = Trainer(model_fn, optax.sgd(0.1), nnx.Param, LossWeights(0.3, 0.4, 0.2),
                    shd.make_mesh(devices=jax.devices()[:1]), None)
  state = trainer.init_state()
  grads = jax.tree.map(np.ones_like, state.params)
  new, _ = trainer._update(state, {"loss": np.float32(1.0)}, grads)
  for got, old in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(got, np.asarray(old) - 0.1, rtol=1e-6, atol=1e-6)


def _tiny_cfg(*options, steps=6):
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py" + (":" + ",".join(options) if options else "")])
  for key, value in {"data.synthetic.num_users": "60", "data.synthetic.num_groups": "12", "train.steps": str(steps),
                     "train.batch_size": "8", "train.warmup_steps": "2", "train.log_every": "3",
                     "model.text.num_hidden_layers": "1", "model.vision.num_hidden_layers": "1",
                     "eval.batch_size": "32"}.items():
    config_lib.override(cfg, key, value)
  return cfg


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
  """main_runs(options) -> (workdir, result): the main job on the tiny config, run once per option set and
  shared by the tests that read it."""
  done = {}

  def get(options):
    if options not in done:
      workdir = tmp_path_factory.mktemp("main")
      cfg = _tiny_cfg(*(o for o in options if o != "unpacked"))
      if "unpacked" in options:  # a row per example (the demo's default packs, rows chosen from the data)
        config_lib.override(cfg, "data.pack_rows", "0")
        config_lib.override(cfg, "data.pack_items", "False")
      done[options] = workdir, train_and_evaluate(cfg, workdir)
    return done[options]

  return get


@pytest.mark.parametrize("options", [(), ("text_only", "unpacked")])
def test_main_job_writes_metrics_for_both_splits(main_runs, options):
  workdir, out = main_runs(options)
  written = json.loads((workdir / "metrics.json").read_text())
  keys = {"recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr"}
  for split in ("valid", "test"):
    assert set(written[split]) == keys
    assert all(0.0 <= v <= 1.0 for v in written[split].values())
    assert written[split] == pytest.approx(out[split])
    assert written["report"]["splits"][split]["users"] == 60
    assert written["report"]["splits"][split]["mask_history"] is True
  assert written["report"]["text_only"] == bool(options)
  # Packed: fewer rows than the batch's 8 prompts, a multiple of the data-parallel devices (1 here); the
  # distinct images in fewer rows than the batch's 48 image slots (none without images).
  packed, images = "unpacked" not in options, "text_only" not in options
  assert (0 < written["report"]["pack_rows"] < 8) == packed
  assert (0 < written["report"]["image_budget"] < 48) == images
  log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [3, 6]
  assert all(np.isfinite(r["loss"]) for r in log)


def test_two_runs_with_one_seed_give_identical_metrics(main_runs, tmp_path):
  _, a = main_runs(())
  b = train_and_evaluate(_tiny_cfg(), tmp_path)
  assert a["test"] == b["test"] and a["valid"] == b["valid"]
  assert a["report"]["final_train_metrics"] == b["report"]["final_train_metrics"]


def test_items_with_identical_text_tie_exactly_in_text_only_ranking(word_tokenizer, text_builder, small_dataset):
  from pixrec_jax.eval import ranking

  trainer = _trainer(tiny_pixrec_fn(word_tokenizer, False, text_only=True),
                     optim.trainable_filter("all", tied_embeddings=False, text_only=True))
  state = trainer.init_state()
  keys = [(text_builder.item_texts[i], None) for i in range(small_dataset.num_items)]
  emb = ranking.catalog_embeddings(trainer.graphdef, (state.params, state.frozen), text_builder, keys, trainer.mesh,
                                   ranking.EvalSettings(batch_size=16, progress=False))
  assert emb.shape[0] == small_dataset.num_items
  by_text = {}
  for i, text in enumerate(text_builder.item_texts):
    by_text.setdefault(text, []).append(i)
  twins = [ids for ids in by_text.values() if len(ids) > 1]
  assert twins, "the synthetic catalogue has variants sharing a text"
  for ids in twins:
    assert all(np.array_equal(emb[ids[0]], emb[i]) for i in ids)
  assert len({emb[ids[0]].tobytes() for ids in by_text.values()}) == len(by_text)


def test_bfloat16_on_cpu_points_to_float32():
  # XLA:CPU is slower in bfloat16 than in float32 (BENCHMARKS.md); GPUs and float32 get no note.
  assert run.cpu_dtype_note("float32", "cpu") is None
  assert run.cpu_dtype_note("bfloat16", "gpu") is None and run.cpu_dtype_note("bfloat16", "tpu") is None
  assert "--config.model.dtype=float32" in run.cpu_dtype_note("bfloat16", "cpu")


def test_cpu_malloc_note_only_where_huge_pages_are_on_request_and_unused(tmp_path):
  """A CPU run of a real-resolution VLM is told about glibc.malloc.hugetlb when the kernel hands out huge pages
  on request and the process did not ask; not on accelerators, for the 32 px demo, when GLIBC_TUNABLES asks
  already, or when the kernel gives them always, never, or says nothing."""
  mode = tmp_path / "enabled"
  mode.write_text("always [madvise] never\n")
  note = lambda platform="cpu", size=512, env=None, path=mode: run.cpu_malloc_note(platform, size, env or {}, str(path))
  assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in note()
  assert note(env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is not None
  assert note(platform="gpu") is None and note(size=32) is None and note(size=0) is None
  assert note(env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}) is None
  for line in ("[always] madvise never\n", "always madvise [never]\n"):
    mode.write_text(line)
    assert note() is None
  assert note(path=tmp_path / "absent") is None
