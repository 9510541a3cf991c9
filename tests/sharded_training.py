"""Runs a few PixRec train steps on several meshes of forced host devices; prints JSON.

Two backbones, SmolVLM (Idefics3: SigLIP + Llama) and PaliGemma 2 (SigLIP +
Gemma2, a sliding and a global layer), each on one device and on two meshes of 8;
SmolVLM also with its prompts packed (data.pack_rows) on one of them.
One run per family scans its layers, so that scanning and sharding are checked
together; its parameters are reported in the looped layout. Compiling dominates
(eight train steps), so the models are as small as the checks allow and XLA
compiles them cheaply; tests/test_scan.py checks scan and remat in full.
Used by test_sharding.py in a subprocess, because the host device count must be
set before jax starts.
"""

import json
import os
import sys
import time

# Compiling dominates this test (8 runs, tiny arrays): XLA's cheapest CPU code generation is plenty, and the
# single-device reference is compiled the same way.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (" --xla_force_host_platform_device_count=8"
                                                             " --xla_backend_optimization_level=0"
                                                             " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

jax.config.update("jax_disable_most_optimizations", True)

import numpy as np
import transformers
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.data import catalog, examples, images, pipeline, processors, synthetic
from pixrec_jax.models import scan
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer
from tests.tiny_backbones import IMAGE_SIZE, backbone_configs

# name -> (data, fsdp, tensor, devices)
# Pure data parallelism is the data axis of both meshes of 8 (a data8 mesh added a fifth of this test's time).
MESHES = {"single": (1, 1, 1, 1), "fsdp4_data2": (2, 4, 1, 8), "tp2_fsdp2_dp2": (2, 2, 2, 8)}
SCANNED = {"smolvlm": "fsdp4_data2", "paligemma": "tp2_fsdp2_dp2"}  # the mesh each family runs with scanned layers
STEPS = 2


def batches(ds, tok, splits, bcfg: BackboneConfig, pack_rows: int = 0) -> list[dict]:
  """STEPS training batches of 8, prompts and images in the family's own style; pack_rows: the prompts
  packed into that many rows (data.pack_rows; 8 drops nothing, so the examples are the unpacked ones)."""
  texts = [ds.item_text(i) for i in range(ds.num_items)]
  layout = examples.PromptBuilder.plan(tok, texts, max_history=3, image_seq_len=bcfg.image_seq_len,
                                       image_size=IMAGE_SIZE, style=examples.prompt_style(bcfg.model_type))
  store = images.ImageStore([ds.image_path(i) for i in range(ds.num_items)],
                            processors.default_image_spec(bcfg.model_type, IMAGE_SIZE))
  builder = examples.PromptBuilder(tok, texts, store, layout)
  it = iter(pipeline.train_dataset(splits.train, builder, batch_size=8, seed=0, pack_rows=pack_rows))
  return [pipeline.split_bookkeeping(next(it))[0] for _ in range(STEPS)]


def run(bcfg: BackboneConfig, batch_list: list[dict], mesh_name: str, scanned: bool, looped_params, initial=None):
  """One run; `initial` (a host copy of the single-device initial state) spares a looped run its init compile,
  which the single-device and scanned runs still check."""
  data, fsdp, tensor, n = MESHES[mesh_name]
  mesh = shd.make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
  rt = Runtime(scan_layers=scanned)
  model_fn = lambda: PixRec(Backbone(bcfg, rt, rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=16), rngs=nnx.Rngs(1))
  tx, sched = optim.optimizer(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
  trainer = Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), mesh, sched)
  state = trainer.init_state() if initial is None else jax.device_put(initial, trainer.state_shardings)
  first = jax.device_get(state) if mesh_name == "single" else None  # before the step donates it
  losses = []
  for batch in batch_list:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
  stacked = [v[...].sharding.spec for path, v in nnx.to_flat_state(state.params) if scanned and "layers" in path]
  params = state.params if looped_params is None else scan.to_layout(state.params, looped_params)
  flat = {"/".join(map(str, path)): np.asarray(v[...]).ravel().tolist() for path, v in nnx.to_flat_state(params)}
  return {"losses": losses, "params": flat, "specs": specs, "scanned": scanned,
          # the layer axis of stacked arrays, and whether any of their other axes is sharded
          "layer_axis_specs": sorted({str(spec[0] if len(spec) else None) for spec in stacked}),
          "stacked_sharded": any(any(e is not None for e in spec[1:]) for spec in stacked)}, state.params, first


def main(workdir):
  ds = synthetic.generate(os.path.join(workdir, "data"), synthetic.SyntheticOptions(num_users=24))
  tok = processors.load_tokenizer(ds.tokenizer_path)
  splits = catalog.leave_one_out(ds)
  out = {}
  for family, bcfg in backbone_configs(tok).items():
    batch_list = batches(ds, tok, splits, bcfg)
    out[family] = {}
    looped = initial = None
    for mesh_name in MESHES:
      scanned = SCANNED[family] == mesh_name
      start = time.process_time()
      out[family][mesh_name], params, first = run(bcfg, batch_list, mesh_name, scanned, looped if scanned else None,
                                                  None if scanned else initial)
      print(f"{family} {mesh_name}: {time.process_time() - start:.1f} s CPU", file=sys.stderr)
      if mesh_name == "single":
        looped, initial = params, first
    if family == "smolvlm":  # packed prompts on a mesh: each example's row may sit on another device
      start = time.process_time()
      out[family]["packed_fsdp4_data2"], _, _ = run(bcfg, batches(ds, tok, splits, bcfg, pack_rows=8), "fsdp4_data2",
                                                   False, None, initial)
      print(f"{family} packed fsdp4_data2: {time.process_time() - start:.1f} s CPU", file=sys.stderr)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
