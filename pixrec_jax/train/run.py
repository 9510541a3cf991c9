"""The main job, top to bottom: data, tokenizer, model, mesh, train, evaluate, report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixrec_jax import config_lib, flops, host_memory
from pixrec_jax import sharding as shd
from pixrec_jax.convert import hf
from pixrec_jax.data import processors
from pixrec_jax.data import buckets, catalog, examples, features, images, packing, paper_format, pipeline, synthetic
from pixrec_jax.eval import baselines, ranking, report
from pixrec_jax.eval import bm25, generative
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models import lora, zoo
from pixrec_jax.models.config import BackboneConfig, Runtime
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import checkpoint, optim
from pixrec_jax.train.trainer import Trainer


class NonFiniteLossError(RuntimeError):
  pass


def load_data(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> catalog.Dataset:
  if cfg.data.source == "synthetic":
    path = pathlib.Path(cfg.data.path) if cfg.data.path else workdir / "data"
    options = synthetic.SyntheticOptions(**{k: (tuple(v) if isinstance(v, list) else v)
                                            for k, v in cfg.data.synthetic.to_dict().items()})
    return synthetic.generate(path, options)
  if cfg.data.source == "dataset":
    if not cfg.data.path:
      raise ValueError("data.source='dataset' needs data.path: a processed dataset folder")
    return catalog.load_dataset(cfg.data.path)
  if cfg.data.source == "paper":
    if not cfg.data.input or not pathlib.Path(cfg.data.input).is_file():
      raise FileNotFoundError(f"data.input={cfg.data.input!r} does not exist; set --config.data.input to "
                              "the paper authors' <Category>.jsonl")
    path = pathlib.Path(cfg.data.path) if cfg.data.path else workdir / "data"
    paper = cfg.data.paper
    dataset = paper_format.convert(cfg.data.input, path, corpus=paper.corpus or None, images=paper.images or None,
                                   tokenizer=paper.tokenizer)
    if paper_format.item_template(dataset) != cfg.data.template:
      raise ValueError(f"{dataset.path} reproduces its item texts with the template "
                       f"{paper_format.item_template(dataset)!r}; set --config.data.template to it")
    return dataset
  raise ValueError(f"data.source must be 'synthetic', 'dataset' or 'paper', got {cfg.data.source!r}")


def load_tokenizer(cfg: ml_collections.ConfigDict, dataset: catalog.Dataset):
  path = cfg.model.path or dataset.tokenizer_path
  if not path:
    raise ValueError("no tokenizer: set model.path to a local Hugging Face checkpoint directory "
                     "(the dataset ships none)")
  return processors.load_tokenizer(path)


def image_spec(cfg: ml_collections.ConfigDict, bcfg: BackboneConfig) -> images.ImageSpec:
  """The checkpoint's image processing (model.path), or (random init) one tile at the tower's size."""
  if not cfg.model.path:
    return processors.default_image_spec(bcfg.model_type, bcfg.vision.image_size)
  return processors.image_spec_for(cfg.model.path, tile_size=bcfg.vision.image_size,
                                   image_seq_len=bcfg.image_seq_len, max_tiles=cfg.data.get("max_image_tiles", 0))


def load_pretrained_backbone(trainer: Trainer, state, path: str):
  """Overwrites the randomly initialised backbone in `state` with a checkpoint's weights, in place on
  each parameter's sharding."""
  reader = hf.CheckpointReader(path)
  model = trainer.model(state)
  cfg = model.backbone.cfg
  abstract = nnx.state(model.backbone)
  hf.load_state(reader, cfg, model.backbone.runtime, abstract,
                shardings=jax.tree.map(lambda v: v.replace(v[...].sharding), abstract,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))
  nnx.update(model.backbone, abstract)
  _, params, frozen = nnx.split(model, trainer.trainable, ...)
  return state._replace(params=params, frozen=frozen)


def _format_table(results: dict[str, dict[str, float]], reports: dict | None = None) -> str:
  """Metrics by split (and protocol), with users/s where the reports have it."""
  keys = list(next(iter(results.values())))
  speed = lambda split: (reports or {}).get(split, {}).get("users_per_second")
  head = "| split | " + " | ".join(keys) + " | users/s |"
  rule = "|" + "---|" * (len(keys) + 2)
  rows = [f"| {split} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " | "
          + (f"{speed(split):.1f}" if speed(split) else "") + " |" for split, m in results.items()]
  return "\n".join([head, rule] + rows)


def _to_python(x: Any) -> Any:
  return x.item() if hasattr(x, "item") else x


@dataclasses.dataclass
class Job:
  """Everything the stages of the main job share."""

  cfg: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: catalog.Dataset
  splits: catalog.Splits
  builder: examples.PromptBuilder
  mesh: Any
  trainer: Trainer
  steps: int
  text_only: bool
  pack_rows: int = 0  # data.pack_rows, resolved (-1: chosen from the data)
  pack_items: bool = False  # data.pack_items: the item pass packed into those rows too
  image_budget: int = 0  # data.image_budget, resolved (-1: chosen from the data; 0 without images)
  length_buckets: int = 0  # data.length_buckets: each batch cut to the lengths it uses (data.buckets)
  # train.cache_image_features: the frozen part of the image path whose output a table gives the step
  # (data.features): "connector" (the tower and the connector) or "vision" (the tower alone); "" off.
  feature_cache: str = ""
  features_table: features.FeatureTable | None = None  # its table, once train() has encoded it

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


# Global batches whose prompt lengths choose data.pack_rows=-1's row count.
PACK_SAMPLE_BATCHES = 64


def setup(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, training: bool = True) -> Job:
  """Data, tokenizer, prompt layout, mesh, model and optimiser. training=False (a trained model restored to
  rank, recommend or export): the training batches' packing (data.image_budget, data.pack_rows) is left
  unresolved, 0, as nothing will draw them."""
  config_lib.check_required(cfg)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

  dataset = load_data(cfg, workdir)
  splits = catalog.dataset_splits(dataset)
  tokenizer = load_tokenizer(cfg, dataset)
  bcfg = zoo.backbone_config(cfg.model, tokenizer)
  text_only = bool(cfg.pixrec.text_only)
  item_texts = [dataset.item_text(i, cfg.data.template) for i in range(dataset.num_items)]
  image_size = bcfg.vision.image_size if bcfg.is_vlm else 0
  spec = image_spec(cfg, bcfg) if bcfg.is_vlm and not text_only else None
  layout = examples.PromptBuilder.plan(tokenizer, item_texts, max_history=cfg.data.max_history,
                                       image_seq_len=0 if text_only else bcfg.image_seq_len, image_size=image_size,
                                       max_image_tiles=spec.tile_budget if spec else 0,
                                       max_item_tokens=cfg.data.max_item_tokens,
                                       style=examples.prompt_style(bcfg.model_type))
  store = None
  if spec:
    paths = [dataset.image_path(i) for i in range(dataset.num_items)]
    store = images.ImageStore(paths, spec)
  builder = examples.PromptBuilder(tokenizer, item_texts, store, layout)

  mesh = shd.make_mesh(**cfg.mesh.to_dict())
  dp = shd.data_parallel_size(mesh)
  accum = cfg.train.get("grad_accum_steps", 1)
  # The first training batches, drawn once for whichever of the two -1 settings needs them.
  sampled = functools.cache(lambda: pipeline.sampled_examples(splits.train, builder, batch_size=cfg.train.batch_size,
                                                              seed=cfg.seed, batches=PACK_SAMPLE_BATCHES))
  image_budget = cfg.data.get("image_budget", 0) if training else 0
  if image_budget < 0:
    if image_budget != -1:
      raise ValueError(f"data.image_budget={image_budget}: use a row count, 0 (every image slot) or -1 (chosen "
                       "from the data)")
    image_budget = 0
    if spec:
      _, shards = shd.process_batch_shard(mesh, cfg.train.batch_size)
      tiles = pipeline.sampled_image_tiles(sampled(), builder, shards=shards)
      slots = cfg.train.batch_size * layout.example_image_slots
      image_budget = pipeline.choose_image_budget(tiles, slots=slots // shards, devices=dp)
      if jax.process_index() == 0:
        print(f"pixrec_jax: data.image_budget=-1 encodes {image_budget} image rows a batch of {cfg.train.batch_size} "
              f"(at most {int(tiles.max())} distinct tiles in a host's block of the first {PACK_SAMPLE_BATCHES} "
              f"batches; {slots} image slots unpacked)", flush=True)
  elif image_budget and not spec:
    raise ValueError(f"data.image_budget={image_budget} is set but the prompts have no images "
                     f"({'pixrec.text_only' if text_only else 'a text-only backbone'}): use 0 or -1")
  cache_features = bool(cfg.train.get("cache_image_features", False)) and training
  if cache_features and not spec:
    raise ValueError("train.cache_image_features caches image features, but the prompts have no images "
                     f"({'pixrec.text_only' if text_only else 'a text-only backbone'}): set it False")
  if cache_features and not image_budget:
    # The table's rows travel packed (pipeline.pack_images): every image slot of the batch, as many rows as
    # the unpacked batch has slots, so that nothing is dropped; data.image_budget=-1 packs them closer.
    _, shards = shd.process_batch_shard(mesh, cfg.train.batch_size)
    multiple = math.lcm(dp, shards)
    image_budget = -(-cfg.train.batch_size * layout.example_image_slots // multiple) * multiple
  if image_budget % dp:
    raise ValueError(f"data.image_budget={image_budget} rows do not split evenly over {dp} data-parallel devices")
  pack_rows = cfg.data.get("pack_rows", 0) if training else 0
  pack_items = bool(cfg.data.get("pack_items", False)) and training
  if pack_items and not pack_rows:
    raise ValueError("data.pack_items packs the item pass into the full pass's packed rows: set data.pack_rows too "
                     "(a row count, or -1)")
  if pack_rows < 0:
    if pack_rows != -1:
      raise ValueError(f"data.pack_rows={pack_rows}: use a row count, 0 (no packing) or -1 (chosen from the data)")
    lengths = pipeline.sampled_prompt_lengths(sampled(), items=pack_items)
    choose = lambda x: packing.choose_rows(x, layout.seq_len, groups=accum, multiple=math.lcm(dp, jax.process_count()))
    pack_rows = choose(lengths)
    prompts = lengths[:, :cfg.train.batch_size]
    items_note = ""
    if pack_items:
      alone = choose(prompts)
      if not packing.items_pay(pack_rows, alone, batch=cfg.train.batch_size, seq_len=layout.seq_len,
                               item_len=layout.item_len):
        items_note = (f"; its items apart, as in {pack_rows} rows with them the decoder would read more tokens than "
                      f"{alone} rows and the item pass (data.pack_items off)")
        pack_rows, pack_items = alone, False
    if jax.process_index() == 0:
      real = 100 * prompts.sum() / (prompts.size * layout.seq_len)
      print(f"pixrec_jax: data.pack_rows=-1 packs batches of {cfg.train.batch_size} prompts "
            f"{'and their items ' if pack_items else ''}into {pack_rows} row{'s' * (pack_rows != 1)} ({real:.0f}% of the unpacked prompts' "
            f"tokens are real in the first {PACK_SAMPLE_BATCHES} batches){items_note}", flush=True)
  if pack_rows:
    if pack_rows % dp:
      raise ValueError(f"data.pack_rows={pack_rows} rows do not split evenly over {dp} data-parallel devices")
    segments = cfg.train.batch_size * (2 if pack_items else 1)  # prompts (and items)
    if pack_rows > segments:
      raise ValueError(f"data.pack_rows={pack_rows} is more rows than {'prompts and items' if pack_items else 'examples'}"
                       f" (train.batch_size={cfg.train.batch_size}): packing would add padding; use at most {segments}")
    if pack_rows % (jax.process_count() * accum):
      raise ValueError(f"data.pack_rows={pack_rows} rows do not split evenly over {jax.process_count()} processes x "
                       f"train.grad_accum_steps={accum} microbatches")
  length_buckets = resolve_length_buckets(cfg.data.get("length_buckets", 0) if training else 0,
                                         jax.process_count(), jax.process_index())
  batch_size = cfg.train.batch_size
  if batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={batch_size} is not divisible by {jax.process_count()} processes")
  steps = cfg.train.steps
  if cfg.train.epochs > 0:
    steps = int(math.ceil(cfg.train.epochs * len(splits.train) / batch_size))
  rt = Runtime.from_config(cfg.model)
  platform = mesh.devices.flat[0].platform
  reused = host_memory.retain(platform)  # after host_memory.prepare at the entry point (pixrec_jax.main)
  image_size = 0 if text_only or not bcfg.is_vlm else bcfg.vision.image_size
  for note in (cpu_dtype_note(rt.dtype, platform), None if reused else cpu_malloc_note(platform, image_size)):
    if note and jax.process_index() == 0:
      print(f"pixrec_jax: {note}", flush=True)
  heads = HeadsConfig(proj_dim=cfg.pixrec.proj_dim, pooling=cfg.pixrec.pooling, text_only=text_only)
  weights = LossWeights(alpha=cfg.pixrec.alpha, beta=cfg.pixrec.beta, temperature=cfg.pixrec.temperature)
  adapters = lora.LoRAConfig.from_config(cfg.get("lora"))
  adapters.validate()
  model_fn = lambda: lora.apply(PixRec(Backbone(bcfg, rt, rngs=nnx.Rngs(cfg.seed)), heads, rngs=nnx.Rngs(cfg.seed + 1)),
                                adapters, rngs=nnx.Rngs(cfg.seed + 2))
  tx, sched = optim.optimizer(lr=cfg.train.lr, steps=steps, warmup_steps=cfg.train.warmup_steps,
                              weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm,
                              b1=cfg.train.b1, b2=cfg.train.b2)
  trainable = optim.trainable_filter(cfg.train.trainable, tied_embeddings=bcfg.text.tie_word_embeddings,
                                     text_only=text_only, lora=adapters.enabled)
  if batch_size % accum:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum_steps={accum}")
  trainer = Trainer(model_fn, tx, trainable, weights, mesh, sched, grad_accum_steps=accum,
                    freeze=cfg.train.get("freeze", ()), seed=cfg.seed)
  feature_cache = ""
  if cache_features:
    feature_cache = frozen_image_path(trainer)
    if not feature_cache:
      raise ValueError(f"train.cache_image_features needs a frozen vision tower, and with train.trainable="
                       f"{cfg.train.trainable!r}{' and LoRA adapters on it' if adapters.enabled else ''} it trains: "
                       "use train.trainable=heads_lm_head (the paper's mode) or frozen_vision, or set it False")
    if jax.process_index() == 0:
      what = "vision tower and connector" if feature_cache == "connector" else "vision tower"
      print(f"pixrec_jax: train.cache_image_features: the frozen {what} encode each catalogue image tile once, "
            f"before training; batches carry their tiles' features in {image_budget} rows a step", flush=True)
  elif not training and spec and cfg.train.get("cache_image_features", False):
    feature_cache = frozen_image_path(trainer)  # a reopened run reads the table its training left (saved_feature_table)
  return Job(cfg, workdir, dataset, splits, builder, mesh, trainer, steps, text_only, pack_rows, pack_items,
             image_budget, length_buckets, feature_cache)


def frozen_image_path(trainer: Trainer) -> str:
  """How much of the image path is frozen, from the trainable parameters: "connector" (the vision tower
  and the connector: their output is a constant of each tile), "vision" (the tower only), or "" (the
  tower trains, LoRA adapters on it included)."""
  names = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]]
  trains = lambda part: any(name.startswith(f"['backbone']['{part}']") for name in names)
  if trains("vision_model"):
    return ""
  return "vision" if trains("connector") else "connector"


FEATURES_DIR = "features"  # WORKDIR/features: train.cache_image_features' table


def features_fn(level: str):
  """fn(model, {"pixels": (N, C, H, W)}) -> the rows a feature table of `level` (Job.feature_cache) holds."""
  return _tile_features if level == "connector" else _tile_vision_features


def _tile_features(model: PixRec, batch: dict) -> jax.Array:
  return model.backbone.image_features(batch["pixels"])


def _tile_vision_features(model: PixRec, batch: dict) -> jax.Array:
  return model.backbone.vision_model(batch["pixels"], None)


def feature_table(job: Job, counts: np.ndarray | None = None) -> features.FeatureTable:
  """train.cache_image_features' table as the job lays it out (data.features), not yet written: rows in item
  order, each item's tiles in the order of its image slots, in the step's compute dtype; in WORKDIR/features,
  one file a process. counts: each item's tile count, as a saved table records it (saved_feature_table);
  default: from the catalogue's images (features.catalog_tiles, which reads every image)."""
  if counts is None:
    _, counts = features.catalog_tiles(job.builder.images, job.dataset.num_items)
  first = features.first_rows(counts)
  if not counts.any():
    raise ValueError(f"train.cache_image_features: no item of {job.dataset.path} has an image")
  fn, size = features_fn(job.feature_cache), job.builder.images.spec.size
  abstract = job.trainer.abstract_state
  shape = jax.eval_shape(lambda s, x: fn(nnx.merge(job.trainer.graphdef, *s), {"pixels": x}),
                         (abstract.params, abstract.frozen), jax.ShapeDtypeStruct((1, 3, size, size), jnp.float32))
  return features.FeatureTable(str(_table_path(job)), _table_key(job), first, counts, tuple(shape.shape[1:]),
                               np.dtype(shape.dtype))


def _table_fingerprint(job: Job) -> str:
  """What a feature table depends on: the config (less the groups that leave the weights alone), the
  dataset's files, the checkpoint's weight files (names, sizes, modification times), the cached part and
  the process count (a process's file follows the layout of its devices' blocks)."""
  files = []
  if job.cfg.model.path:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in pathlib.Path(job.cfg.model.path).glob("*.safetensors"))
  text = json.dumps([ranking.fingerprint(job.cfg.to_dict(), job.dataset.manifest), files, job.feature_cache,
                     jax.process_count()], default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint_path(path: str | pathlib.Path) -> pathlib.Path:
  """Beside the table at `path`: its fingerprint and tile counts, written once the table is whole."""
  return pathlib.Path(str(path) + ".json")


def _table_key(job: Job) -> str:
  """The batch field the job's table rows go to: the connector's output, or the tower's."""
  return features.IMAGE_FEATURES if job.feature_cache == "connector" else features.VISION_FEATURES


def _table_path(job: Job) -> pathlib.Path:
  return job.workdir / FEATURES_DIR / f"{_table_key(job)}.process{jax.process_index()}.npy"


def saved_feature_table(job: Job) -> features.FeatureTable | None:
  """The job's feature table as WORKDIR/features holds it, when it is whole and was written under this job's
  fingerprint (a resumed run, a rerun of the same config, or a model reopened from the run: `restore_trained`,
  recommend's catalogue and users; the frozen weights are the same); else None. Its tile counts come from the
  fingerprint's file, so finding it reads no image. Several processes take it only if every one can, as
  encoding is collective."""
  if not job.feature_cache:
    return None
  table = None
  try:
    saved = json.loads(_fingerprint_path(_table_path(job)).read_text())
    counts = np.asarray(saved["counts"], np.int64)
    ok = saved["fingerprint"] == _table_fingerprint(job) and counts.shape == (job.dataset.num_items,)
    table = feature_table(job, counts) if ok else None
    ok = ok and table.rows() is not None  # shape and dtype checked
  except (OSError, ValueError, KeyError, TypeError):
    ok = False
  if jax.process_count() > 1:
    ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
  return table if ok else None


def encode_features(job: Job, params, frozen) -> features.FeatureTable:
  """feature_table(job), written: every catalogue image tile through the frozen part of the image path
  (job.feature_cache, from the weights `frozen`), once; then its fingerprint and tile counts beside it
  (saved_feature_table)."""
  table = feature_table(job)
  _fingerprint_path(table.path).unlink(missing_ok=True)  # until the table is whole again
  store = job.builder.images
  keys = [(item, tile) for item in np.flatnonzero(table.counts) for tile in range(int(table.counts[item]))]
  fn = features_fn(job.feature_cache)
  graphdef, states = job.trainer.graphdef, (params, frozen)
  out = table.create()

  def make(tiles, block):
    for start in range(0, len(tiles), block):
      chunk = tiles[start:start + block]
      yield {"pixels": np.stack([store.get(int(item)).pixels[tile] for item, tile in chunk]),
             "valid": np.ones(len(chunk), bool)}

  # As many tiles a batch as the train step's image rows (a multiple of the data-parallel devices): what fits
  # wherever the step does (the step also keeps their activations for a backward pass). On the CPU one tile a
  # device: there a larger batch is slower (2 cores, 100 of smolvlm_256m's 512 px tiles: 361 s in batches of
  # 128, 157-166 s in 6s, 134 s in 2s, 126 s one at a time).
  dp = shd.data_parallel_size(job.mesh)
  cpu = job.mesh.devices.flat[0].platform == "cpu"
  settings = dataclasses.replace(eval_settings(job), batch_size=dp if cpu else job.image_budget)
  row = 0
  for rows in ranking.embedded_batches(fn, graphdef, states, keys, make, job.mesh, settings, "encode image tiles"):
    rows = rows[:len(keys) - row]  # the last batch's padding
    out[row:row + len(rows)] = rows
    row += len(rows)
  out.flush()
  del out
  _fingerprint_path(table.path).write_text(json.dumps({"fingerprint": _table_fingerprint(job),
                                                       "counts": table.counts.tolist()}))
  return table


def resolve_length_buckets(value: Any, process_count: int, process_index: int) -> int:
  """data.length_buckets as the run applies it: checked, and 0 (with a notice from process 0) where several
  processes would each cut their own block of the batch (data.buckets) and disagree on the shapes."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"data.length_buckets={value!r}: use 0 (static shapes) or a number of sizes per axis")
  if value and process_count > 1:
    if process_index == 0:
      print(f"pixrec_jax: data.length_buckets={value} is off in this run: each host would cut its own block of the "
            f"batch, and the {process_count} processes would disagree on the shapes. Every batch keeps the layout's "
            "shapes (the results are the same; data.pack_rows and data.image_budget pack large batches)", flush=True)
    return 0
  return value


THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"  # e.g. "always [madvise] never"


def cpu_malloc_note(platform: str, image_size: int, environ=None, thp_mode_file: str = THP_MODE_FILE) -> str | None:
  """What to tell a user who trains a real-resolution VLM on CPU where malloc could use huge pages and does not
  (None: nothing). The kernel gives transparent huge pages on request ("madvise" mode) and glibc's malloc asks
  only with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, read at process start, so a library cannot set it; the
  smolvlm_256m step is 13% faster with it and the 32 px demo's 7% slower (BENCHMARKS.md), hence images of
  at least 224 px only. The main job asks only when it does not keep the step's memory itself
  (cpu.reuse_step_memory=False: host_memory), which removes the page faults huge pages make fewer."""
  environ = os.environ if environ is None else environ
  if platform != "cpu" or image_size < 224 or "hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return None
  try:
    enabled = pathlib.Path(thp_mode_file).read_text()
  except OSError:
    return None
  if "[madvise]" not in enabled:  # "[always]": every allocation gets them already; "[never]": none can
    return None
  return ("this kernel gives transparent huge pages to memory that asks for them, and glibc's malloc asks when "
          "the process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in its environment: smolvlm_256m's CPU "
          "step ran 13% faster with it on a 2-core Xeon (BENCHMARKS.md)")


def cpu_dtype_note(dtype: str, platform: str) -> str | None:
  """What to tell a user who trains in bfloat16 on CPU, where it is slower than float32 (None: nothing)."""
  if platform != "cpu" or dtype != "bfloat16":
    return None
  return (f"model.dtype={dtype} on CPU: XLA's CPU backend runs bfloat16 matmuls no faster than float32 ones "
          "and adds conversions (smolvlm_256m's step: 18.3 s in bfloat16, 16.6 s in float32 on a 2-core Xeon; "
          "BENCHMARKS.md); --config.model.dtype=float32 trains faster here")


def init_state(job: Job):
  state = job.trainer.init_state()
  if job.cfg.model.path:
    state = load_pretrained_backbone(job.trainer, state, job.cfg.model.path)
  return state


def _train_iterator(job: Job, features_table: features.FeatureTable | None = None):
  cfg = job.cfg
  shard, shards = shd.process_batch_shard(job.mesh, cfg.train.batch_size)  # the rows this process's devices hold
  return iter(pipeline.train_dataset(job.splits.train, job.builder, batch_size=cfg.train.batch_size // shards,
                                     seed=cfg.seed, shard_index=shard, shard_count=shards,
                                     num_workers=cfg.data.num_workers,
                                     image_budget=job.image_budget // shards,
                                     pack_rows=job.pack_rows // shards,
                                     pack_groups=cfg.train.get("grad_accum_steps", 1),
                                     pack_items=job.pack_items, length_buckets=job.length_buckets,
                                     image_multiple=shd.data_parallel_size(job.mesh), features=features_table))


def _truncate_log(path: pathlib.Path, step: int) -> None:
  """Drops the records an interrupted run logged after `step`, which the resumed run logs again."""
  if not path.is_file():
    return
  lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(kept) != len(lines):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _stop_if_nonfinite(state, step: int, ckpt: checkpoint.Checkpointer | None) -> None:
  count, first = (int(x) for x in jax.device_get((state.nonfinite_steps, state.first_nonfinite_step)))
  if count:
    if ckpt is not None:
      ckpt.wait()  # saves still in flight hold earlier, finite states: let them commit
    saved = ckpt.latest_step() if ckpt is not None else None
    where = f"the latest checkpoint is step {saved}" if saved is not None else "no checkpoint was written"
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {first} ({count} such step(s) by step {step}); stopped without "
        f"saving a checkpoint after it ({where}). Lower train.lr, check the data, or set "
        "--config.train.nonfinite=skip to skip such updates")


def validate(job: Job, state) -> dict[str, float]:
  """Validation metrics ("valid/recall@10", ...) of `state`, for keeping the best checkpoint."""
  cfg = job.cfg
  settings = dataclasses.replace(eval_settings(job), progress=False)
  states = (state.params, state.frozen)
  item_emb = ranking.catalog_embeddings(job.trainer.graphdef, states, job.builder, item_input_keys(job), job.mesh,
                                        settings)
  metrics, _ = ranking.evaluate_split(job.trainer.graphdef, states, job.builder, job.splits.valid, item_emb,
                                      job.mesh, settings, "valid")
  out = {f"valid/{k}": float(v) for k, v in metrics.items()}
  best = cfg.checkpoint.best_metric
  if best and best not in out:
    raise ValueError(f"checkpoint.best_metric={best!r} is not a validation metric; choose one of {sorted(out)}")
  return out


def checkpointer(job: Job, read_only: bool = False) -> checkpoint.Checkpointer:
  """The run's checkpoints, WORKDIR/checkpoints."""
  return checkpoint.Checkpointer(job.workdir / checkpoint.CHECKPOINT_DIR,
                                 checkpoint.CheckpointOptions.from_config(job.cfg), read_only=read_only)


def step_flops(job: Job, batch_shapes: dict | None = None) -> float | None:
  """Analytic FLOPs of one global train step (pixrec_jax.flops), of the job's batch shapes or of a batch's
  array shapes (`batch_shapes`: one cut by data.length_buckets); None for a mode it does not count."""
  bcfg = zoo.backbone_config(job.cfg.model, job.builder.tokenizer)
  if batch_shapes is None:
    shapes = flops.step_shapes(job.builder.layout, job.cfg.train.batch_size,
                               images=job.image_budget or None,
                               full_rows=job.pack_rows or None, items_packed=job.pack_items,
                               cached=job.feature_cache)
  else:
    shapes = flops.batch_step_shapes(job.builder.layout, batch_shapes)
  try:
    return flops.train_flops(bcfg, shapes, proj_dim=job.cfg.pixrec.proj_dim, trainable=job.cfg.train.trainable,
                             text_only=job.text_only)["total"]
  except ValueError:
    return None


def train(job: Job, state, ckpt: checkpoint.Checkpointer | None = None) -> tuple[Any, dict]:
  """Runs the updates from `state`'s step to job.steps; returns the state and a summary.

  With `ckpt`, saves every checkpoint.every_steps, at the last step, and at the step
  boundary after a SIGTERM, after which it returns early (summary["preempted_at_step"]).
  `state=None` resumes from ckpt's latest checkpoint: state, data iterator and
  counters as they were, and the log continues from that step, so the rest of the
  run is what the uninterrupted run would have done.
  """
  cfg = job.cfg
  batch_size = cfg.train.batch_size
  policy = checkpoint.nonfinite_policy(cfg)
  table, encode_seconds = None, None
  if job.feature_cache:
    table = saved_feature_table(job)
    if table is not None:
      if job.is_main:
        print(f"pixrec_jax: train.cache_image_features: reusing {table.path} ({table.num_rows} image tiles), "
              "written under this config, dataset and checkpoint", flush=True)
    else:  # the frozen weights: the state's, or (resuming) the checkpoint's
      start = time.perf_counter()
      if state is None:
        abstract = job.trainer.abstract_state
        params, frozen = ckpt.restore_model(ckpt.latest_step(), abstract.params, abstract.frozen,
                                            config=cfg.to_dict())
      else:
        params, frozen = state.params, state.frozen
      table = encode_features(job, params, frozen)
      del params, frozen
      encode_seconds = round(time.perf_counter() - start, 2)
      if job.is_main:
        print(f"pixrec_jax: train.cache_image_features: {table.num_rows} image tiles encoded in {encode_seconds} s "
              f"into {table.path} ({table.num_rows * table.row_nbytes / 2**20:.1f} "
              "MiB)", flush=True)
  job.features_table = table  # the run's evaluation reads it too (eval_settings)
  train_iter = _train_iterator(job, table)
  log_path = job.workdir / "train_log.jsonl"
  dropped = 0
  if state is None:
    restored = ckpt.restore(ckpt.latest_step(), job.trainer.abstract_state, data_iterator=train_iter,
                            config=cfg.to_dict())
    state, dropped = restored.state, int(restored.progress["dropped_history_items"])
    if job.is_main:
      for diff in checkpoint.config_differences(restored.config, cfg.to_dict()):
        print(f"pixrec_jax: resuming with a config that differs from the checkpoint's: {diff}", flush=True)
      _truncate_log(log_path, restored.step)
  first = int(jax.device_get(state.step))
  last = None
  preempted_at = None
  start = time.perf_counter()
  device_kind = jax.devices()[0].device_kind
  # Batch shapes -> FLOPs of a step (one shape unless data.length_buckets cuts the batches); None for a
  # train.trainable mode flops does not count, which holds for every step of the job.
  flops_of = {}
  interval_flops = 0.0  # since the last log line
  mark = (first, start)  # step and time of the last log line: TFLOP/s and MFU are per log interval
  # Without checkpoints a SIGTERM ends the process as usual: there would be nothing to resume from.
  with checkpoint.PreemptionWatch() if ckpt is not None else contextlib.nullcontext() as preemption, \
      open(log_path, "a") if job.is_main else open(os.devnull, "w") as log, \
      tqdm(initial=first, total=job.steps, desc="train", unit="step", disable=not job.is_main) as bar:
    for step in range(first + 1, job.steps + 1):
      batch, bookkeeping = pipeline.split_bookkeeping(next(train_iter))
      dropped += int(bookkeeping["dropped_history"].sum())
      key = buckets.shape_key(batch)
      if key not in flops_of:
        shapes = dict(key)
        flops_of[key] = step_flops(job, shapes if job.length_buckets else None)  # one process when cut
        if job.length_buckets and job.is_main:
          bar.write(f"pixrec_jax: step {step}: a batch of a new shape ({buckets.describe(shapes)}; data.length_buckets="
                    f"{job.length_buckets}): the step compiles for it ({len(flops_of)} shape"
                    f"{'s' * (len(flops_of) != 1)} so far)")
      interval_flops += flops_of[key] or 0.0
      state, metrics = job.trainer.step(state, batch)
      bar.update(1)
      stopping = preemption is not None and preemption.reached(step)
      if step % cfg.train.log_every == 0 or step == job.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if policy == "stop":
          _stop_if_nonfinite(state, step, ckpt)
          if not all(math.isfinite(v) for v in last.values()):
            raise NonFiniteLossError(f"non-finite training metrics at step {step}: {last}")
        now = time.perf_counter()  # after device_get above: the interval's steps have finished
        record = {"step": step, **last, "examples_per_s": (step - first) * batch_size / (now - start),
                  "dropped_history_items": dropped}
        if interval_flops:
          # The first interval includes compilation (and so does one where a new batch shape appears).
          steps_done = step - mark[0]
          record.update(flops.mfu(interval_flops / steps_done, (now - mark[1]) / steps_done, jax.device_count(),
                                  device_kind))
        mark, interval_flops = (step, now), 0.0
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{last['loss']:.4f}", nig=f"{last['nig']:.3f}", ut_acc=f"{last['ut_acc']:.2f}")
      if ckpt is not None and (step % ckpt.options.every_steps == 0 or step == job.steps or stopping):
        if policy == "stop":
          _stop_if_nonfinite(state, step, ckpt)
        scores = None
        if ckpt.options.eval_every_steps and step % ckpt.options.eval_every_steps == 0:
          scores = validate(job, state)
          log.write(json.dumps({"step": step, **scores}) + "\n")
          log.flush()
        ckpt.save(step, state, config=cfg.to_dict(), data_iterator=train_iter, metrics=scores,
                  progress={"step": step, "dropped_history_items": dropped, "seed": cfg.seed,
                            "process_count": jax.process_count()},
                  # Preempted or done: the checkpoint must be committed before the process can end.
                  wait=stopping or step == job.steps)
      if stopping:
        preempted_at = step
        break
  summary = {"train_steps": job.steps, "train_seconds": round(time.perf_counter() - start, 2),
             "final_train_metrics": last, "dropped_history_items": dropped, "pack_rows": job.pack_rows,
             "pack_items": job.pack_items, "image_budget": job.image_budget,
             "length_buckets": job.length_buckets, "batch_shapes": len(flops_of),
             "cache_image_features": job.feature_cache or None, "feature_encoding_seconds": encode_seconds}
  if preempted_at is not None:
    summary["preempted_at_step"] = preempted_at
  return state, summary


def item_input_keys(job: Job) -> list:
  """What each item's tower input is made of: its text and (with images) its image file's hash."""
  files = job.dataset.manifest.get("files", {})
  keys = []
  for i, item in enumerate(job.dataset.items):
    text = job.builder.item_texts[i]
    if job.text_only or item.image is None:
      keys.append((text, None))
    else:
      keys.append((text, files.get(item.image, item.image)))
  return keys


def eval_settings(job: Job) -> ranking.EvalSettings:
  """The job's evaluation settings; after train() has encoded a frozen tower's table (train.cache_image_features),
  the dense towers read it in place of pixels."""
  cfg = job.cfg
  return ranking.EvalSettings(batch_size=cfg.eval.batch_size, mask_history=cfg.eval.mask_history,
                              num_workers=cfg.data.num_workers, progress=job.is_main, features=job.features_table)


def catalog_embeddings(job: Job, state, settings: ranking.EvalSettings) -> np.ndarray:
  """Every catalogue item's embedding at `state`'s step; with eval.cache, read from (or computed once
  into) WORKDIR/cache, keyed by the step and a hash of the config and the dataset."""
  cache = None
  if job.cfg.eval.cache:
    cache = ranking.EmbeddingCache(job.workdir / ranking.CACHE_DIR, int(jax.device_get(state.step)),
                                   ranking.fingerprint(job.cfg.to_dict(), job.dataset.manifest))
  emb, _ = ranking.cached_catalog_embeddings(job.trainer.graphdef, (state.params, state.frozen), job.builder,
                                              item_input_keys(job), job.mesh, settings, cache, write=job.is_main)
  return emb


def evaluate(job: Job, state) -> tuple[dict, dict]:
  """Whole-catalogue ranking for each configured split by eval.protocol: dense (keyed by split),
  generative (keyed "generative/SPLIT") or both: (metrics, reports). users/s counts a split's
  own pass (for dense: its users' embeddings and ranking; the catalogue pass is shared)."""
  cfg = job.cfg
  protocol = generative.check_protocol(cfg.eval.get("protocol", "dense"))
  settings = eval_settings(job)
  states = (state.params, state.frozen)
  graphdef = job.trainer.graphdef
  if protocol != "generative":
    item_emb = catalog_embeddings(job, state, settings)
    seen = baselines.seen_items(job.splits, job.dataset.num_items)
  if protocol != "dense":
    gen_settings = dataclasses.replace(
        generative.GenerativeSettings.from_config(cfg.eval.generative, job.builder.layout.max_item_tokens,
                                                  cfg.eval.mask_history, job.is_main),
        features=job.features_table)  # the prompts' images from the run's feature table, where it has one
    index = bm25.CatalogIndex(job.builder.item_texts)
  results, reports = {}, {}
  for split in cfg.eval.splits:
    cases = {"valid": job.splits.valid, "test": job.splits.test}.get(split)
    if cases is None:
      raise ValueError(f"eval.splits entries must be 'valid' or 'test', got {split!r}")
    if protocol != "generative":
      start = time.perf_counter()
      results[split], reports[split] = ranking.evaluate_split(graphdef, states, job.builder, cases, item_emb,
                                                              job.mesh, settings, split, seen_items=seen)
      reports[split]["users_per_second"] = len(cases) / (time.perf_counter() - start)
    if protocol != "dense":
      key = f"generative/{split}"
      results[key], reports[key] = generative.evaluate_split(graphdef, states, job.builder, cases, index,
                                                             gen_settings, split, job.mesh)
  return results, reports


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains (resuming from WORKDIR/checkpoints when it holds a checkpoint) and evaluates.

  A SIGTERM during training saves a checkpoint and returns {"preempted_at_step": k}
  without evaluating; running the same command again resumes from there.
  """
  check_config_paths(cfg, "config")
  job = setup(cfg, workdir)
  with checkpointer(job) as ckpt:
    resume_from = ckpt.latest_step()
    state = init_state(job) if resume_from is None else None
    counts = job.trainer.param_counts(job.trainer.abstract_state)
    if job.is_main:
      print(f"pixrec_jax: {job.dataset.num_items} items, {len(job.splits.train)} training users, "
            f"{'text only' if job.text_only else 'text + images'}; params: {counts['trainable']:,} trainable, "
            f"{counts['frozen']:,} frozen; mesh {dict(job.mesh.shape)}; {job.steps} steps of batch "
            f"{cfg.train.batch_size}" + (f"; resuming from step {resume_from}" if resume_from is not None else ""),
            flush=True)
    state, summary = train(job, state, ckpt)
  if "preempted_at_step" in summary:
    step = summary["preempted_at_step"]
    if job.is_main:
      print(f"pixrec_jax: stopped by SIGTERM after step {step}; saved {ckpt.directory / str(step)}. "
            "Run the same command again to resume.", flush=True)
    return {"preempted_at_step": step, "report": summary}
  results, reports = evaluate(job, state) if cfg.eval.splits else ({}, {})
  out = {**results, "report": {"splits": reports, "text_only": job.text_only, **summary,
                               "split_counts": job.splits.counts, "params": counts,
                               "layout": dataclasses.asdict(job.builder.layout)}}
  if job.is_main:
    (job.workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=_to_python))
    if results:
      print(_format_table(results, reports))
    print(f"wrote {job.workdir / 'metrics.json'}")
  dense = {split: m for split, m in results.items() if not split.startswith("generative/")}
  if dense and cfg.eval.report:
    settings = eval_settings(job)
    gen = {k[len("generative/"):]: (m, reports[k]) for k, m in results.items() if k.startswith("generative/")}
    report.run_report(job, state, dense, reports, catalog_embeddings(job, state, settings), settings, gen)
    if job.is_main:
      print(f"wrote {job.workdir / report.REPORT_MD}, {report.PLOT} and {report.GALLERY}")
  return out


# Config keys that name files or folders, and what each must be when a saved run is reopened.
_PATH_KEYS = (("model.path", "dir"), ("data.path", "dir"), ("data.input", "file"))


def check_config_paths(cfg: ml_collections.ConfigDict, source: str) -> None:
  """Fails naming the key when a path in `cfg` (read from `source`) is malformed or missing.

  data.path must exist only for data.source="dataset": the other sources write it.
  """
  for key, kind in _PATH_KEYS:
    node = cfg
    for part in key.split("."):
      node = node.get(part) if isinstance(node, (dict, ml_collections.ConfigDict)) else None
    if node in (None, ""):
      continue
    if not isinstance(node, str) or "\0" in node or "\n" in node:
      raise ValueError(f"{source}: {key}={node!r} is not a path")
    path = pathlib.Path(node)
    if key == "data.path" and cfg.data.source != "dataset" and not path.exists():
      continue
    if not (path.is_dir() if kind == "dir" else path.is_file()):
      raise FileNotFoundError(f"{source}: {key}={node!r} is not an existing {'folder' if kind == 'dir' else 'file'}")


@dataclasses.dataclass
class Trained:
  """A trained model reopened from its work directory."""

  job: Job
  params: Any
  frozen: Any
  step: int
  why: str  # how the step was chosen

  def model(self) -> PixRec:
    return nnx.merge(self.job.trainer.graphdef, self.params, self.frozen)


def restore_trained(workdir: str | pathlib.Path, step: str | int = "best") -> Trained:
  """The model of checkpoint `step` ("best", "latest" or a number) of the run in `workdir`, built from
  the config saved with it (its paths checked first); the optimiser state is not read."""
  ckpt = checkpoint.open_run(workdir)
  step, why = ckpt.resolve(step)
  cfg = ml_collections.ConfigDict(ckpt.read_config(step))
  check_config_paths(cfg, f"{ckpt.directory / str(step)} config")
  job = setup(cfg, workdir, training=False)
  abstract = job.trainer.abstract_state
  params, frozen = ckpt.restore_model(step, abstract.params, abstract.frozen, config=cfg.to_dict())
  job.features_table = saved_feature_table(job)  # the frozen tower's features as training encoded them, if kept
  return Trained(job, params, frozen, step, why)
