"""Is the input pipeline or the train step the bottleneck? Both timed alone, for one config.

Builds the job as the main job does (pixrec_jax.train.run.setup), then
- loader: iterates `pipeline.train_dataset` (tokenise, images, batch; the config's
  data.num_workers) for --batches batches, nothing else running;
- step: runs --steps train steps on batches already in memory (host -> device
  transfer included, as in training), after one step to compile.
A loader/step ratio well above 1 means the pipeline keeps up with training. The
last line is one JSON object with the figures.

  python bench/loader_vs_step.py --config configs/amazon_text.py [--batches 50] [--steps 20] [--config.KEY=VALUE ...]
  python bench/loader_vs_step.py --config configs/smolvlm_256m.py --steps 0 --step-examples-per-s 150 \
      --config.train.batch_size=16 --config.data.num_workers=8   # the loader against a GPU step's rate
"""

import argparse
import json
import sys
import tempfile
import time

import jax

from pixrec_jax import config_lib
from pixrec_jax.data import pipeline
from pixrec_jax.train import run


def _time_loader(job, batches: int, warmup: int) -> tuple[float, list]:
  """Batches per second of the training pipeline alone, and the batches it made."""
  it = run._train_iterator(job)  # as training reads it
  made = [next(it) for _ in range(warmup)]  # Worker start-up and first prefetch are not throughput.
  start = time.perf_counter()
  made += [next(it) for _ in range(batches)]
  return batches / (time.perf_counter() - start), made


def _time_steps(job, batches: list, steps: int) -> tuple[float, float]:
  """(train steps per second on ready batches, seconds of the first, compiling step)."""
  state = run.init_state(job)
  inputs = [pipeline.split_bookkeeping(b)[0] for b in batches]
  start = time.perf_counter()
  state, metrics = job.trainer.step(state, inputs[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = job.trainer.step(state, inputs[(i + 1) % len(inputs)])
  jax.block_until_ready((state, metrics))
  return steps / (time.perf_counter() - start), compile_s


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--batches", type=int, default=50, help="loader batches to time")
  parser.add_argument("--steps", type=int, default=20, help="train steps to time (0: the loader alone)")
  parser.add_argument("--step-examples-per-s", type=float, default=0.0,
                      help="with --steps 0: the train step's examples/s measured elsewhere (a GPU's "
                           "bench/train_step.py), to compare the loader with")
  parser.add_argument("--warmup", type=int, default=3, help="loader batches made before timing")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  cfg, workdir = config_lib.parse_args(["--config", args.config, *rest])
  workdir = workdir or tempfile.mkdtemp(prefix="loader_vs_step_")
  if jax.process_count() != 1:
    raise SystemExit("bench/loader_vs_step.py times one host; run it single-process")

  job = run.setup(cfg, workdir)
  loader_bps, batches = _time_loader(job, args.batches, args.warmup)
  if args.steps:
    steps_ps, compile_s = _time_steps(job, batches, args.steps)
    where = f"{args.steps} steps; first step with compilation {compile_s:.1f} s"
  else:
    if args.step_examples_per_s <= 0:
      raise SystemExit("--steps 0 needs --step-examples-per-s: the train step's rate to compare the loader with")
    steps_ps, compile_s = args.step_examples_per_s / cfg.train.batch_size, None
    where = "given by --step-examples-per-s"
  result = {
      "config": args.config, "batch_size": cfg.train.batch_size, "seq_len": job.builder.layout.seq_len,
      "text_only": job.text_only, "num_workers": cfg.data.num_workers, "device": jax.devices()[0].device_kind,
      "image_budget": job.image_budget, "pack_rows": job.pack_rows,
      "loader_batches_per_s": round(loader_bps, 3),
      "loader_examples_per_s": round(loader_bps * cfg.train.batch_size, 2),
      "train_steps_per_s": round(steps_ps, 3), "loader_over_step": round(loader_bps / steps_ps, 2),
      "compile_s": None if compile_s is None else round(compile_s, 1),
  }
  print(f"loader: {loader_bps:.2f} batches/s ({args.batches} batches of {cfg.train.batch_size})")
  print(f"train step: {steps_ps:.2f} steps/s ({where})")
  print(f"loader / step: {loader_bps / steps_ps:.2f}x "
        f"({'the loader keeps up' if loader_bps > steps_ps else 'the loader is the bottleneck'})")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
