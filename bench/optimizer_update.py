"""The optimiser update alone: seconds per update of the train step's `Trainer._update` for a config.

What a train step spends after its gradients are computed: the gradient's global norm, the non-finite
check, clipping, AdamW over every trainable parameter, its moments and the parameters written back
(in place: the state is donated, as in the train step). Random gradients of the parameters' shapes; the
same trainer, parameters and settings bench/train_step.py builds. Run from another checkout's root with
`PYTHONPATH=.` to time that checkout's update with this script.

  python bench/optimizer_update.py --config configs/smolvlm_256m.py --config.model.dtype=float32
  python bench/optimizer_update.py --config configs/smolvlm_256m.py --form select   # the other form

The last line is one JSON object: {"update_s", "cpu_s_per_update", "trainable_params", "updates_applied",
"form", ...}; updates_applied counts the updates not skipped as non-finite (all of them: warmup + rounds x steps).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_step  # pylint: disable=wrong-import-position  # bench/train_step.py: the same trainer


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="CONFIG.py[:ARGS], as for pixrec_jax.main")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
  parser.add_argument("--steps", type=int, default=3, help="updates per timed round")
  parser.add_argument("--warmup", type=int, default=2, help="updates before timing (the first compiles)")
  parser.add_argument("--form", choices=("auto", "cond", "select"), default="auto",
                      help="the update under a lax.cond or new and old values selected; auto: the platform's "
                      "(pixrec_jax.train.trainer.update_under_cond)")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

  import jax  # pylint: disable=import-outside-toplevel
  from pixrec_jax import config_lib, host_memory, xla_options  # pylint: disable=import-outside-toplevel

  cfg, _ = config_lib.parse_args(["--config", args.config, *rest])
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax's CPU client
  bcfg = train_step.backbone_config(cfg)
  trainer, _ = train_step.build_trainer(cfg, bcfg, bool(cfg.pixrec.text_only))
  host_memory.retain(jax.devices()[0].platform)
  if args.form != "auto":
    trainer.update_under_cond = args.form == "cond"
  state = [trainer.random_state(cfg.seed)]
  rng = np.random.default_rng(cfg.seed)
  leaves, treedef = jax.tree.flatten(state[0].params)
  grads = jax.device_put(jax.tree.unflatten(
      treedef, [(rng.standard_normal(x.shape, np.float32) * 1e-3).astype(x.dtype) for x in leaves]))
  loss = {"loss": np.float32(1.0)}
  update = jax.jit(trainer._update, donate_argnums=(0,),  # pylint: disable=protected-access
                   compiler_options=xla_options.compiler_options())
  out = [None]

  def step():
    state[0], out[0] = update(state[0], dict(loss), grads)

  update_s, _, cpu_s = train_step.time_rounds(step, args.warmup, args.rounds, args.steps,
                                              lambda: jax.block_until_ready((state[0], out[0])))
  applied = int(jax.device_get(state[0].step)) - int(jax.device_get(state[0].nonfinite_steps))
  params = sum(int(np.prod(x.shape)) for x in leaves)
  print(f"{args.config}: optimiser update of {params / 1e6:.1f}M trainable parameters: {update_s * 1e3:.1f} ms "
        f"(median of {args.rounds} x {args.steps}), {cpu_s * 1e3:.1f} ms CPU")
  result = {"bench": "optimizer_update", "config": args.config, "device": jax.devices()[0].device_kind,
            "trainable_params": params, "update_s": round(update_s, 5), "cpu_s_per_update": round(cpu_s, 5),
            "updates_applied": applied,  # none skipped as non-finite: warmup + rounds x steps
            "form": "cond" if trainer.update_under_cond else "select"}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
