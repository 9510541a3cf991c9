"""Examples/s, TFLOP/s per device and MFU of the PixRec train step for a config, batch and mesh.

The step is the one training runs (pixrec_jax.train.trainer, host -> device
transfer of the batch included), on a synthetic batch with the shapes training
with that config has: the static layout of the synthetic catalogue's prompts
(history 1..data.max_history items, `--item-tokens` text tokens per item, the
backbone's image tokens), random token ids and pixels. Timing: `--warmup` steps
(compilation), then `--rounds` rounds of `--steps` steps each, the device synced
once per round; the step time is the median round's mean. No grain,
tensorflow-datasets or PIL is imported, so it runs wherever jax, flax, optax and
ml_collections do.

`--spec-out DIR` writes the batch and the settings for bench/torch_reference.py;
`--torch` runs that reference right after (same process tree, same machine) and
reports ours / theirs. `--interleave` (CPU) runs it alongside instead, a round of
ours then a round of its (both processes alive, the reference warmed up first), so
that a drift in a shared machine's speed falls on both alike; it adds each round's
ratio and their median (`paired_ratio_vs_torch`). The last line is one
JSON object of the figures. `--matmul-rate` also times XLA's matmuls of the
backbone's largest linear layer alone and gives the step's TFLOP/s as a fraction of
their rate (on a CPU, where MFU has no peak to divide by).

  python bench/train_step.py --config configs/demo.py --batch 32 --torch
  python bench/train_step.py --config configs/smolvlm_256m.py --batch 16 --config.model.attention=cudnn
  python bench/train_step.py --config configs/demo.py --config.data.pack_rows=24 --torch
  python bench/train_step.py --config configs/demo.py --config.data.pack_rows=24 --interleave --rounds 5
  python bench/train_step.py --config configs/smolvlm_256m.py --batch 1 --config.data.image_budget=3 \
      --config.model.dtype=float32 --matmul-rate

`--config.data.pack_rows=R` packs the batch's full prompts into R rows (pixrec_jax/data/packing.py); the
PyTorch reference still runs a row per prompt, as the paper's code does. With train.cache_image_features
(the `:paper` option sets it) our step reads the batch's packed image rows as the frozen tower's features,
computed once before the timed steps (as training does for the catalogue: pixrec_jax/data/features.py), and
the reference encodes the pixels every step, as the paper's code does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# The synthetic catalogue's prompt sizes (its tokenizer): the history intro, the "next item" phrases and the
# separator take 51 tokens, an item text up to 13, and no BOS. tests/test_bench.py checks the layout below
# against PromptBuilder.plan on that catalogue.
PROMPT_TOKENS = 51
ITEM_TOKENS = 13
SYNTHETIC_VOCAB = 96
SYNTHETIC_IMAGE_TOKEN = 3
# Environment variables each result records: XLA flags, and glibc malloc tunables (on CPU,
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1 moves the smolvlm_256m step by 13%: BENCHMARKS.md).
ENV_RECORDED = ("XLA_FLAGS", "GLIBC_TUNABLES")


def _round_up(n: int, multiple: int = 8) -> int:
  return -(-n // multiple) * multiple


def layout_for(bcfg, *, max_history: int, text_only: bool, item_tokens: int = ITEM_TOKENS,
               prompt_tokens: int = PROMPT_TOKENS):
  """The examples.Layout PromptBuilder.plan gives for the synthetic catalogue (one tile per image)."""
  from pixrec_jax.data import examples  # pylint: disable=import-outside-toplevel

  style = examples.prompt_style(bcfg.model_type)
  image_seq_len = 0 if text_only or not bcfg.is_vlm else bcfg.image_seq_len
  block = 0 if not image_seq_len else image_seq_len + (3 if style == "idefics3" else 0)
  per_item = item_tokens + block + 2
  user = prompt_tokens + max_history * per_item
  return examples.Layout(max_history=max_history, max_item_tokens=item_tokens, seq_len=_round_up(user + per_item),
                         item_len=_round_up(per_item), image_seq_len=image_seq_len,
                         image_size=bcfg.vision.image_size if bcfg.is_vlm else 0, style=style)


def synthetic_batch(layout, *, batch: int, vocab: int, image_token: int, seed: int = 0,
                    image_budget: int = 0) -> dict[str, np.ndarray]:
  """A training batch of `layout`'s shapes: histories of 1..max_history items as PixRec's windows draw them,
  every item with its text and (if the layout has images) one image, all distinct. image_budget > 0 packs
  the images as the pipeline does (pipeline.pack_images), first trimming the longest histories to fit;
  -1 (data.image_budget=-1, chosen from the data): this batch's images, rounded up to a multiple of 8 (at
  most the batch's image slots)."""
  rng = np.random.default_rng(seed)
  histories = [int(h) for h in rng.integers(1, layout.max_history + 1, batch)]
  if image_budget < 0:  # as pixrec_jax.train.run.setup chooses it, from this one batch's images (all distinct)
    from pixrec_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    image_budget = pipeline.choose_image_budget(np.array([[sum(histories) + batch]]),
                                                slots=batch * layout.example_image_slots)
  while image_budget and sum(histories) + batch > image_budget:
    longest = max(range(batch), key=lambda j: (histories[j], -j))
    if histories[longest] == 1:
      raise ValueError(f"data.image_budget={image_budget} is too small for {batch} examples with images")
    histories[longest] -= 1
  t = layout.image_seq_len
  slots = layout.example_image_slots
  words = lambda n: [int(x) for x in (rng.integers(image_token + 1, vocab, n) if image_token + 1 < vocab
                                      else rng.integers(0, image_token, n))]
  marks = layout.style == "idefics3"  # <fake_token_around_image> <global-img> ... <fake_token_around_image>
  image = [] if layout.text_only else [0, 0] * marks + [image_token] * t + [0] * marks
  out = {k: [] for k in ("full_ids", "full_mask", "user_mask", "target_mask", "nig_positions", "nig_labels",
                         "nig_weights", "item_ids", "item_mask", "images", "image_valid", "target_slot")}

  def pad(ids, length):
    a, m = np.zeros(length, np.int32), np.zeros(length, np.int32)
    a[:len(ids)], m[:len(ids)] = ids, 1
    return a, m

  for history in histories:
    user = words(PROMPT_TOKENS - 7 * (layout.max_history - history))
    for _ in range(history):
      user += words(layout.max_item_tokens) + image
    text = words(layout.max_item_tokens)
    full, mask = pad(user + text + image, layout.seq_len)
    user_mask = np.zeros_like(mask)
    user_mask[:len(user)] = 1
    k = layout.max_item_tokens
    out["full_ids"].append(full)
    out["full_mask"].append(mask)
    out["user_mask"].append(user_mask)
    out["target_mask"].append(mask - user_mask)
    out["nig_positions"].append(np.arange(len(user) - 1, len(user) - 1 + k, dtype=np.int32))
    out["nig_labels"].append(np.asarray(text, np.int32))
    out["nig_weights"].append(np.ones(k, np.float32))
    item, item_mask = pad(text + image, layout.item_len)
    out["item_ids"].append(item)
    out["item_mask"].append(item_mask)
    if slots:
      pixels = np.zeros((slots, 3, layout.image_size, layout.image_size), np.float32)
      pixels[:history + 1] = rng.standard_normal((history + 1, 3, layout.image_size, layout.image_size))
      out["images"].append(pixels)
      out["image_valid"].append(np.arange(slots) < history + 1)
      out["target_slot"].append(np.int32(history))
  batch_arrays = {k: np.stack(v) for k, v in out.items() if v}
  if image_budget and slots:
    # As pipeline.pack_images gives them: uint8 rows and the table that makes them floats on the device
    # (here SmolVLM's and PaliGemma's processors' x / 127.5 - 1).
    valid = batch_arrays["image_valid"]
    packed = np.zeros((image_budget,) + batch_arrays["images"].shape[2:], np.uint8)
    packed[:valid.sum()] = rng.integers(0, 256, (int(valid.sum()),) + packed.shape[1:], dtype=np.uint8)
    index = np.zeros(valid.shape, np.int32)
    index[valid] = np.arange(valid.sum())
    batch_arrays["images"], batch_arrays["image_index"] = packed, index
    lut = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    batch_arrays["pixel_lut"] = np.tile((lut - np.float32(0.5)) / np.float32(0.5), (3, 1))
  batch_arrays["target_item"] = rng.permutation(10 * batch)[:batch].astype(np.int32)
  return batch_arrays


def backbone_config(cfg):
  """The config's backbone, with the synthetic tokenizer's vocabulary where the config names none."""
  from pixrec_jax.models import zoo  # pylint: disable=import-outside-toplevel

  model = cfg.model
  with model.unlocked():
    if "vocab_size" not in model.text:
      model.text.vocab_size = SYNTHETIC_VOCAB
      model.text.pad_token_id = 0
    if "vision" in model and model.get("image_token_id") is None:
      model.image_token_id = SYNTHETIC_IMAGE_TOKEN
  return zoo.backbone_config(model)


def cached_batch(trainer, state, batch: dict) -> tuple[dict, str]:
  """(batch, what is cached) as train.cache_image_features gives it to the step: its packed pixel rows replaced
  by the frozen part of the image path's output (pixrec_jax.data.features; "connector": the tower's and the
  connector's, "vision": the tower's), computed here once, outside the timed steps."""
  import jax  # pylint: disable=import-outside-toplevel

  from pixrec_jax.data import features  # pylint: disable=import-outside-toplevel
  from pixrec_jax.recsys.model import decode_pixels  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel

  level = run.frozen_image_path(trainer)
  if not level:
    raise SystemExit("train.cache_image_features needs a frozen vision tower: use train.trainable=heads_lm_head "
                     "or frozen_vision, or set it False")

  def encode(state, images, lut):  # what the job's table holds (run.encode_features)
    return run.features_fn(level)(trainer.model(state), {"pixels": decode_pixels(images, lut)})

  with jax.set_mesh(trainer.mesh):
    rows = np.asarray(jax.device_get(jax.jit(encode)(state, batch["images"], batch["pixel_lut"])))
  out = {k: v for k, v in batch.items() if k not in ("images", "pixel_lut")}
  out[features.IMAGE_FEATURES if level == "connector" else features.VISION_FEATURES] = rows
  return out, level


def build_trainer(cfg, bcfg, text_only: bool, runtime: dict | None = None):
  """The Trainer pixrec_jax.train.run.setup builds (without its data and grain); `runtime` overrides
  Runtime fields the config sets."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from pixrec_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from pixrec_jax.models.backbone import Backbone  # pylint: disable=import-outside-toplevel
  from pixrec_jax.models.config import Runtime  # pylint: disable=import-outside-toplevel
  from pixrec_jax.recsys.losses import LossWeights  # pylint: disable=import-outside-toplevel
  from pixrec_jax.recsys.model import HeadsConfig, PixRec  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import optim  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

  # Every Runtime switch the config's model section sets (dtype, attention, and any added later).
  fields = {f.name for f in dataclasses.fields(Runtime)}
  rt = Runtime(**{**{k: cfg.model[k] for k in fields if k in cfg.model}, **(runtime or {})})
  heads = HeadsConfig(proj_dim=cfg.pixrec.proj_dim, pooling=cfg.pixrec.pooling, text_only=text_only)
  weights = LossWeights(alpha=cfg.pixrec.alpha, beta=cfg.pixrec.beta, temperature=cfg.pixrec.temperature)
  model_fn = lambda: PixRec(Backbone(bcfg, rt, rngs=nnx.Rngs(cfg.seed)), heads, rngs=nnx.Rngs(cfg.seed + 1))
  tx, sched = optim.optimizer(lr=cfg.train.lr, steps=max(cfg.train.steps, 1), warmup_steps=cfg.train.warmup_steps,
                              weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm, b1=cfg.train.b1,
                              b2=cfg.train.b2)
  trainable = optim.trainable_filter(cfg.train.trainable, tied_embeddings=bcfg.text.tie_word_embeddings,
                                     text_only=text_only)
  mesh = shd.make_mesh(**cfg.mesh.to_dict())
  return Trainer(model_fn, tx, trainable, weights, mesh, sched), rt


def time_rounds(step, warmup: int, rounds: int, steps: int, sync, timed_step=None,
                counts: dict | None = None, between=None) -> tuple[float, float, float]:
  """(median seconds per step over rounds, seconds of the warm-up, median CPU seconds of this process per
  step). `step()` runs one step (`timed_step()`, if given, in the timed rounds); `sync()` waits. On a
  shared CPU the process's CPU time is the steadier measure of work: other processes' load stretches wall
  time, not it. `counts`, if given, receives "minor_faults_per_step": the page faults of the timed rounds
  (memory mapped afresh: pixrec_jax.host_memory), and "round_s": each round's seconds per step.
  `between()`, if given, runs after each timed round, outside its time (the reference's round, interleaved)."""
  start = time.perf_counter()
  for _ in range(warmup):
    step()
  sync()
  warm = time.perf_counter() - start
  times, cpu = [], []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(rounds):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      (timed_step or step)()
    sync()
    times.append((time.perf_counter() - start) / steps)
    cpu.append((time.process_time() - start_cpu) / steps)
    if between is not None:
      faults -= resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      between()
      faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  if counts is not None:
    counts["minor_faults_per_step"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                                            / max(1, rounds * steps))
    counts["round_s"] = times
  return statistics.median(times), warm, statistics.median(cpu)


MATMUL_TOKENS = 3072  # rows of the matmuls --matmul-rate times (SigLIP's 3 tiles of 1024 patches)


def matmul_shape(bcfg, tokens: int = MATMUL_TOKENS) -> tuple[int, int, int]:
  """(tokens, hidden, intermediate): the backbone's largest MLP projection (vision tower's or decoder's) at
  `tokens` rows, the linear layer whose matmuls `matmul_rate` times."""
  mlps = [(c.hidden_size, c.intermediate_size) for c in (bcfg.text, bcfg.vision) if c is not None]
  return (tokens, *max(mlps, key=lambda mlp: mlp[0] * mlp[1]))


def matmul_rate(shape: tuple[int, int, int], dtype, rounds: int = 5, iters: int = 3) -> dict:
  """TFLOP/s of XLA's three matmuls of one linear layer of `shape` (tokens, in, out) on the default device:
  the forward x @ W, the input gradient dy @ W.T and the weight gradient x.T @ dy, each jitted alone with
  the step's XLA options (pixrec_jax.xla_options) and timed as the step is (`time_rounds`: a warm-up call,
  then the median of `rounds` rounds of `iters` calls); "tflops" is their FLOPs over their summed times. On
  a CPU, which has no peak in pixrec_jax.flops, it is what the step's TFLOP/s can be held against: how much
  of the step is not matmul at the rate XLA's matmuls run (BENCHMARKS.md)."""
  import jax  # pylint: disable=import-outside-toplevel
  from pixrec_jax import xla_options  # pylint: disable=import-outside-toplevel

  m, k, n = shape
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x, w, dy = (jax.random.normal(key, s, dtype) for key, s in ((kx, (m, k)), (kw, (k, n)), (kd, (m, n))))
  forms = {"x @ W": lambda x, w, dy: x @ w, "dy @ W.T": lambda x, w, dy: dy @ w.T,
           "x.T @ dy": lambda x, w, dy: x.T @ dy}
  seconds = {}
  for name, form in forms.items():
    fn, out = jax.jit(form, compiler_options=xla_options.compiler_options()), [None]  # the step's options

    def call(fn=fn, out=out):
      out[0] = fn(x, w, dy)

    seconds[name], _, _ = time_rounds(call, 1, rounds, iters, lambda out=out: jax.block_until_ready(out[0]))
  flop = 2 * m * k * n
  return {"shape": [m, k, n], "dtype": str(jax.numpy.dtype(dtype)),
          "tflops": round(len(forms) * flop / sum(seconds.values()) / 1e12, 6),
          "tflops_each": {name: round(flop / s / 1e12, 6) for name, s in seconds.items()}}


class InterleavedReference:
  """bench/torch_reference.py --serve as a child process: built and warmed up on start, then a round of
  the spec's steps each time `round()` is called; `finish()` ends it and returns its figures (its last
  line). Its other output is printed as it comes."""

  def __init__(self, script: pathlib.Path, spec_dir: pathlib.Path):
    self.proc = subprocess.Popen([sys.executable, str(script), "--spec", str(spec_dir), "--serve"], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    self.round_s = []
    self._read("ready")

  def _read(self, key: str) -> dict:
    """Print the reference's lines up to the JSON object that holds `key`, and return that object."""
    for line in self.proc.stdout:
      if line.startswith("{"):
        message = json.loads(line)
        if key in message:
          return message
      print(line, end="")
    raise SystemExit(f"bench/torch_reference.py --serve ended (exit code {self.proc.wait()}) before its {key!r} line")

  def round(self) -> None:
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    self.round_s.append(self._read("round_s")["round_s"])

  def finish(self) -> dict:
    self.proc.stdin.close()
    theirs = self._read("torch_step_s")
    print(json.dumps(theirs))
    if self.proc.wait():
      raise SystemExit(f"bench/torch_reference.py --serve failed (exit code {self.proc.returncode})")
    return theirs


def write_spec(path: pathlib.Path, cfg, bcfg, batch: dict, text_only: bool, args, result: dict) -> None:
  """What bench/torch_reference.py needs to run the same step: the batch and the settings."""
  path.mkdir(parents=True, exist_ok=True)
  np.savez(path / "batch.npz", **batch)
  spec = {
      "hf_config": bcfg.to_hf_dict(), "model_type": bcfg.model_type, "text_only": text_only,
      "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
      "alpha": cfg.pixrec.alpha, "beta": cfg.pixrec.beta, "temperature": cfg.pixrec.temperature,
      "pooling": cfg.pixrec.pooling, "proj_dim": cfg.pixrec.proj_dim, "trainable": cfg.train.trainable,
      "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "b1": cfg.train.b1, "b2": cfg.train.b2,
      "clip_norm": cfg.train.clip_norm, "seed": cfg.seed,
      "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps, "ours": result,
  }
  (path / "spec.json").write_text(json.dumps(spec, indent=1))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's train.batch_size)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2, help="steps before timing (the first compiles)")
  parser.add_argument("--item-tokens", type=int, default=ITEM_TOKENS, help="text tokens per item")
  parser.add_argument("--platform", default="", help="jax platform (cpu, gpu, tpu); default: jax's choice")
  parser.add_argument("--pack-rows", default="", help="pack the full prompts into this many rows (as "
                      "--config.data.pack_rows); auto: the fewest this batch's prompts fit")
  parser.add_argument("--spec-out", default="", help="write the batch and settings for bench/torch_reference.py")
  parser.add_argument("--torch", action="store_true", help="run bench/torch_reference.py after ours, print the ratio")
  parser.add_argument("--interleave", action="store_true", help="run the reference alongside ours instead (CPU): "
                      "a round of ours, then a round of the reference's, --rounds times; implies --torch")
  parser.add_argument("--scan-layers", action="store_true", help="scan over layers, where this tree's Runtime can")
  parser.add_argument("--remat", default="", help="a remat policy name, where this tree's Runtime has remat")
  parser.add_argument("--profile", default="", help="after timing, trace --profile-steps steps with jax.profiler "
                      "into this folder (open it with TensorBoard's or XProf's profile plugin; the "
                      "perfetto_trace.json.gz beside it opens in ui.perfetto.dev)")
  parser.add_argument("--resident", action="store_true", help="also time the step on a batch already on the "
                      "devices (reported as resident_examples_per_s): what the host -> device copy costs")
  parser.add_argument("--matmul-rate", action="store_true", help="also time XLA's three matmuls of the "
                      "backbone's largest MLP projection at 3072 rows, alone (matmul_rate), and report the step's "
                      "TFLOP/s as a fraction of theirs: the CPU's stand-in for MFU")
  parser.add_argument("--profile-steps", type=int, default=2, help="steps traced with --profile")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  args.torch = args.torch or args.interleave

  import jax  # pylint: disable=import-outside-toplevel
  if args.platform:
    jax.config.update("jax_platforms", args.platform)
  from pixrec_jax import config_lib, flops, host_memory  # pylint: disable=import-outside-toplevel

  cfg, _ = config_lib.parse_args(["--config", args.config, *rest])
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax's CPU client
  batch_size = args.batch or cfg.train.batch_size
  text_only = bool(cfg.pixrec.text_only)
  bcfg = backbone_config(cfg)
  layout = layout_for(bcfg, max_history=cfg.data.max_history, text_only=text_only, item_tokens=args.item_tokens)
  image_budget = 0 if text_only else cfg.data.get("image_budget", 0)
  cache = bool(cfg.train.get("cache_image_features", False)) and not text_only
  if cache and not image_budget:  # the table's rows travel packed: every slot of the batch (as run.setup does)
    image_budget = batch_size * layout.example_image_slots
  batch = synthetic_batch(layout, batch=batch_size, vocab=bcfg.text.vocab_size,
                          image_token=bcfg.image_token_id or 0, seed=cfg.seed, image_budget=image_budget)
  image_budget = batch["images"].shape[0] if "image_index" in batch else 0  # resolved (-1; no images: 0)
  length_buckets = cfg.data.get("length_buckets", 0)
  cut = lambda b: b
  if length_buckets:  # as the training pipeline cuts its batches, after packing (data.buckets)
    from pixrec_jax.data import buckets  # pylint: disable=import-outside-toplevel
    cut = lambda b: buckets.trim(b, length_buckets)
  # What the PyTorch reference runs: a row per prompt, as the paper's code pads them (cut, the same lengths).
  plain_batch = cut(batch)
  pack_rows = cfg.data.get("pack_rows", 0)
  if args.pack_rows:
    pack_rows = -1 if args.pack_rows == "auto" else int(args.pack_rows)
  pack_items = bool(cfg.data.get("pack_items", False))
  if pack_items and not pack_rows:
    raise ValueError("data.pack_items needs data.pack_rows (or --pack-rows)")
  if pack_rows:
    from pixrec_jax.data import packing  # pylint: disable=import-outside-toplevel
    lengths = packing.segment_lengths(batch["full_mask"], batch["item_mask"] if pack_items else None)
    if pack_rows < 0:  # auto, or data.pack_rows=-1 (chosen from the data): here, this batch's fewest rows
      pack_rows = packing.fewest_rows(lengths, layout.seq_len)
      alone = packing.fewest_rows(lengths[:batch_size], layout.seq_len) if pack_items else pack_rows
      if not packing.items_pay(pack_rows, alone, batch=batch_size, seq_len=layout.seq_len,
                               item_len=layout.item_len):  # as pixrec_jax.train.run.setup
        print(f"the items stay apart: {pack_rows} rows with them read more tokens than {alone} and the item pass")
        pack_rows, pack_items = alone, False
        lengths = lengths[:batch_size]
    plan = packing.plan_rows(lengths, pack_rows, layout.seq_len)
    if plan is None:
      raise ValueError(f"data.pack_rows={pack_rows} rows cannot hold this batch's prompts"
                       f"{' and items' if pack_items else ''}; it needs {packing.fewest_rows(lengths, layout.seq_len)}")
    batch = packing.pack_rows(batch, plan, items=pack_items)
  batch = cut(batch)
  from pixrec_jax.models.config import Runtime  # pylint: disable=import-outside-toplevel
  known = {f.name for f in dataclasses.fields(Runtime)}
  runtime = {k: v for k, v in (("scan_layers", args.scan_layers or None), ("remat", args.remat or None)) if v}
  for k in sorted(set(runtime) - known):
    print(f"this tree's Runtime has no {k!r}; running without it")
    del runtime[k]
  trainer, rt = build_trainer(cfg, bcfg, text_only, runtime)
  reused = host_memory.retain(jax.devices()[0].platform)  # applies only where prepare did
  # Random weights of the real shapes: the model's own initialisers compile for minutes at full size and
  # the values do not change the step's speed (tests/test_random_state.py checks the state).
  state = [trainer.random_state(cfg.seed)]
  metrics = [None]
  cached = ""
  if cache:
    batch, cached = cached_batch(trainer, state[0], batch)

  def step():
    state[0], metrics[0] = trainer.step(state[0], batch)

  def guarded_step():
    # No device-to-host transfer inside the timed steps: a hidden sync would fail here, not just slow down.
    with jax.transfer_guard_device_to_host("disallow"):
      step()

  counts = {}
  spec_dir = None
  if args.spec_out or args.torch:
    spec_dir = pathlib.Path(args.spec_out or tempfile.mkdtemp(prefix="pixrec_torch_ref_"))
  script = pathlib.Path(__file__).with_name("torch_reference.py")
  reference = None
  if args.interleave:
    if jax.devices()[0].platform != "cpu":
      raise SystemExit(f"--interleave keeps the reference alive beside ours: on {jax.devices()[0].platform} both "
                       "would hold device memory at once; use --torch (the reference right after ours)")
    write_spec(spec_dir, cfg, bcfg, plain_batch, text_only, args, {})
    reference = InterleavedReference(script, spec_dir)  # built and warmed up before our warm-up
  step_s, warm_s, cpu_s = time_rounds(step, args.warmup, args.rounds, args.steps,
                                      lambda: jax.block_until_ready((state[0], metrics[0])), timed_step=guarded_step,
                                      counts=counts, between=reference and reference.round)
  resident_s = None
  if args.resident:
    # The same step on a batch already on the devices: the difference is what the host -> device copy costs.
    resident = trainer.put_batch(batch)

    def resident_step():
      state[0], metrics[0] = trainer.step(state[0], resident)

    resident_s, _, _ = time_rounds(resident_step, 1, args.rounds, args.steps,
                                   lambda: jax.block_until_ready((state[0], metrics[0])))
  if args.profile:
    # Also a Perfetto trace (perfetto_trace.json.gz): plain JSON, for summing op times without TensorBoard.
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      for _ in range(args.profile_steps):
        step()
      jax.block_until_ready((state[0], metrics[0]))
  loss = float(jax.device_get(metrics[0]["loss"]))
  n_dev = trainer.mesh.size
  kind = jax.devices()[0].device_kind
  shapes = flops.step_shapes(layout, batch_size, images=image_budget or None, full_rows=pack_rows or None,
                             items_packed=pack_items, cached=cached)
  if length_buckets:  # this batch's own cut shapes
    shapes = flops.batch_step_shapes(layout, {k: np.shape(v) for k, v in batch.items()})
  count = flops.train_flops(bcfg, shapes, proj_dim=cfg.pixrec.proj_dim, trainable=cfg.train.trainable,
                            text_only=text_only)
  util = flops.mfu(count["total"], step_s, n_dev, kind)
  result = {
      "bench": "train_step", "config": args.config, "device": kind, "num_devices": n_dev, "platform":
      jax.devices()[0].platform, "batch": batch_size, "seq_len": shapes.seq_len, "item_len": shapes.item_len,
      "images_per_step": shapes.images, "image_budget": image_budget, "pack_rows": pack_rows, "pack_items": pack_items,
      "length_buckets": length_buckets, "cache_image_features": cached or None,
      "dtype": rt.dtype, "attention": rt.attention,
      "runtime": dataclasses.asdict(rt), "trainable": cfg.train.trainable, "step_s": round(step_s, 5),
      "warmup_s": round(warm_s, 1), "cpu_s_per_step": round(cpu_s, 4), "examples_per_s": round(batch_size / step_s, 3),
      "tflop_per_step": round(count["total"] / 1e12, 4), "tflops_per_device": round(util["tflops_per_device"], 3),
      "mfu": None if util["mfu"] is None else round(util["mfu"], 4), "loss": loss,
      # Process-wide settings that move these timings (the PyTorch reference, a child process, inherits them).
      "env": {k: os.environ[k] for k in ENV_RECORDED if os.environ.get(k)},
      "cpu_step_memory_reused": reused,  # pixrec_jax.host_memory (config cpu.reuse_step_memory)
      "minor_faults_per_step": counts["minor_faults_per_step"],
  }
  if args.matmul_rate:
    result["matmul"] = matmul_rate(matmul_shape(bcfg), rt.dtype)
    result["of_matmul_rate"] = round(util["tflops_per_device"] / result["matmul"]["tflops"], 3)
  if resident_s is not None:
    result["resident_examples_per_s"] = round(batch_size / resident_s, 3)
    print(f"on a device-resident batch: {resident_s * 1e3:.1f} ms, {result['resident_examples_per_s']:.2f} examples/s")
  rows = f" in {pack_rows} packed rows" + (" with their items" if pack_items else "") if pack_rows else ""
  print(f"{args.config}: batch {batch_size}{rows}"
        + f", seq {shapes.seq_len}/{shapes.item_len}{' (cut)' * bool(length_buckets)}, {shapes.images} images/step"
        + (f" (cached {cached} features)" if cached else "") + ", "
        f"{rt.dtype} compute, {rt.attention} attention on {n_dev} x {kind}")
  print(f"step {step_s * 1e3:.1f} ms (median of {args.rounds} x {args.steps}), {result['examples_per_s']:.2f} "
        f"examples/s, {result['tflops_per_device']:.2f} TFLOP/s per device"
        + ("" if util["mfu"] is None else f", MFU {util['mfu']:.1%}"))
  if args.matmul_rate:
    rate = result["matmul"]
    print(f"XLA's matmuls of a {' x '.join(map(str, rate['shape']))} linear layer alone: {rate['tflops']:.3f} "
          f"TFLOP/s ({rate['dtype']}); the step at {result['of_matmul_rate']:.0%} of that")
  if spec_dir is not None:
    write_spec(spec_dir, cfg, bcfg, plain_batch, text_only, args, result)
    if args.torch:
      del state[0], metrics[0]
      if reference is not None:
        theirs = reference.finish()
        # Each round's ratio of examples/s: ours, against the reference's round right after it.
        result["round_ratios_vs_torch"] = [round(batch_size / o / (theirs["batch"] / t), 3)
                                           for o, t in zip(counts["round_s"], reference.round_s)]
        # The paired estimate: the median of those ratios. Each pair met the machine in the same minute, so a
        # slow spell that stretches both rounds cancels in it; in the ratio of medians it need not.
        result["paired_ratio_vs_torch"] = round(statistics.median(result["round_ratios_vs_torch"]), 3)
        result["interleaved"] = True
      else:
        proc = subprocess.run([sys.executable, str(script), "--spec", str(spec_dir)], check=True, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(proc.stdout, end="")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
      result["torch_examples_per_s"] = theirs["torch_examples_per_s"]
      # From the step times and batches: examples/s are rounded, coarsely for steps of seconds.
      result["ratio_vs_torch"] = round(batch_size / step_s / (theirs["batch"] / theirs["torch_step_s"]), 3)
      result["torch_cpu_s_per_step"] = theirs["torch_cpu_s_per_step"]
      print(f"ours / PyTorch reference: {result['ratio_vs_torch']:.2f}x"
            + (f" (the median of the rounds' ratios: {result['paired_ratio_vs_torch']:.2f}x)"
               if "paired_ratio_vs_torch" in result else ""))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
