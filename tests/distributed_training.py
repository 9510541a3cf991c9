"""One process of a short multi-process training job on forced CPU devices; prints JSON.

  python -m tests.distributed_training WORKDIR DATA PROCESS_ID NUM_PROCESSES DEVICES PORT

Used by test_distributed.py, which starts NUM_PROCESSES of these (each with DEVICES
CPU devices) and compares them with one process holding all the devices. The config is
the demo's as it is, images included: each host packs its block's prompts, items and
distinct images into the rows that data.pack_rows=-1 and data.image_budget=-1 choose. Each
process trains through the main job's own code (per-host input, global batches,
process 0 writes the log), evaluates (and saves the embeddings it ranked), saves
the train state with orbax from every process, restores it, checks it against
what was saved, and trains on from it.
"""

import json
import os
import sys

import numpy as np

# Before jax starts: the device count is read once. Unoptimised CPU code compiles in
# half the time; both sides of every comparison are compiled alike.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={sys.argv[5]}"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pixrec_jax import config_lib, distributed  # pylint: disable=g-import-not-at-top

STEPS = 3  # before the checkpoint
STEPS_AFTER_RESTORE = 2
TINY = {
    "train.steps": STEPS, "train.batch_size": 8, "train.log_every": 1, "train.warmup_steps": 0,
    "eval.batch_size": 16, "data.max_history": 3, "data.source": "synthetic", "data.synthetic.num_users": 40,
    "model.vision.hidden_size": 16, "model.vision.intermediate_size": 32, "model.vision.num_hidden_layers": 1,
    "model.vision.num_attention_heads": 2, "model.text.hidden_size": 32, "model.text.intermediate_size": 64,
    "model.text.num_hidden_layers": 1, "model.text.num_attention_heads": 4, "model.text.num_key_value_heads": 2,
    "model.text.head_dim": 8, "pixrec.proj_dim": 16,
    # Parameters and optimiser state sharded over every device, so across processes too.
    "mesh.data": 1, "mesh.fsdp": -1,
}


def config(workdir, data, process_id, num_processes, port, **extra):
  overrides = {**TINY, "data.path": data, **extra}
  if num_processes > 1:
    overrides.update({"distributed.enabled": "true", "distributed.coordinator_address": f"127.0.0.1:{port}",
                      "distributed.num_processes": num_processes, "distributed.process_id": process_id})
  else:
    overrides["distributed.enabled"] = "false"
  argv = ["--config", "configs/demo.py", "--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
  return config_lib.parse_args(argv)[0]


def main(workdir, data, process_id, num_processes, port):
  cfg = config(workdir, data, process_id, num_processes, port)
  from pixrec_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main: sync CPU dispatch across processes too
  distributed.maybe_initialize(cfg)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from pixrec_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from pixrec_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pixrec_jax.eval import ranking  # pylint: disable=g-import-not-at-top
  from pixrec_jax.train import run  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == num_processes and jax.process_index() == process_id
  job = run.setup(cfg, workdir)
  state, _ = run.train(job, run.init_state(job))
  results, reports = run.evaluate(job, state)
  # The embeddings evaluate() ranked (its compiled towers are cached, so this costs no compile).
  settings = ranking.EvalSettings(batch_size=cfg.eval.batch_size, progress=False)
  states = (state.params, state.frozen)
  np.savez(os.path.join(workdir, f"embeddings_{process_id}.npz"),
           items=ranking.catalog_embeddings(job.trainer.graphdef, states, job.builder, run.item_input_keys(job),
                                            job.mesh, settings),
           users=ranking.user_embeddings(job.trainer.graphdef, states, job.builder, job.splits.test, job.mesh,
                                         settings))

  # Every process writes its own shards of each array, and reads back only its own.
  # (Straight orbax: pixrec_jax/train/checkpoint.py had not landed when this was written.)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with ocp.CheckpointManager(os.path.join(workdir, "orbax")) as manager:
    manager.save(STEPS, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = manager.restore(STEPS, args=ocp.args.StandardRestore(abstract))
  same = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in
                                                 zip(jax.tree.leaves(a), jax.tree.leaves(b))])),
                 out_shardings=shd.replicated(job.mesh))(state, restored)
  same_shardings = all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  sharded_across_processes = sum(len({d.process_index for d in x.sharding.device_set}) > 1 and
                                 not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))

  shard, shards = shd.process_batch_shard(job.mesh, cfg.train.batch_size)
  batches = iter(pipeline.train_dataset(job.splits.train, job.builder, batch_size=cfg.train.batch_size // shards,
                                        seed=cfg.seed + 1, shard_index=shard, shard_count=shards,
                                        image_budget=job.image_budget // shards, pack_rows=job.pack_rows // shards,
                                        pack_items=job.pack_items))
  losses_after_restore = []
  for _ in range(STEPS_AFTER_RESTORE):
    restored, metrics = job.trainer.step(restored, pipeline.split_bookkeeping(next(batches))[0])
    losses_after_restore.append(float(metrics["loss"]))

  # train.cache_image_features: each process encodes the whole table (the tiles in blocks over the processes'
  # devices, gathered) into its own file, and its batches carry their rows of it.
  cached = run.setup(config(workdir + "_cached", data, process_id, num_processes, port,
                            **{"train.trainable": "heads_lm_head", "train.cache_image_features": "true"}),
                     workdir + "_cached")
  cached_state = run.init_state(cached)
  table = run.encode_features(cached, cached_state.params, cached_state.frozen)
  cached_batches = run._train_iterator(cached, table)
  cached_losses = []
  for _ in range(STEPS_AFTER_RESTORE):
    cached_state, metrics = cached.trainer.step(cached_state, pipeline.split_bookkeeping(next(cached_batches))[0])
    cached_losses.append(float(metrics["loss"]))
  print(json.dumps({
      "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
      "local_devices": jax.local_device_count(), "rows": [shard, shards],
      "image_budget": job.image_budget, "pack_rows": job.pack_rows, "pack_items": job.pack_items,
      "eval": results, "eval_users": {split: report["users"] for split, report in reports.items()},
      "restored_equal": bool(same), "restored_shardings_equal": same_shardings,
      "arrays_sharded_across_processes": int(sharded_across_processes),
      "losses_after_restore": losses_after_restore, "feature_cache": cached.feature_cache,
      "feature_table_sum": float(np.asarray(table.rows(), np.float64).sum()), "cached_losses": cached_losses}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6]))
