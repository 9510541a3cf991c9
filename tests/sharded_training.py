"""Runs a few PixRec train steps on several meshes of forced host devices; prints JSON.

Used by test_sharding.py in a subprocess, because the host device count must be
set before jax starts.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import transformers
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.data import catalog, pipeline, synthetic
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig, VisionConfig
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer
from tests.conftest import make_builder

MESHES = {"single": (1, 1, 1, 1), "data8": (8, 1, 1, 8), "fsdp4_data2": (2, 4, 1, 8), "tp2_fsdp2_dp2": (2, 2, 2, 8)}


def main(workdir):
  ds = synthetic.generate(os.path.join(workdir, "data"), synthetic.SyntheticOptions(num_users=40))
  tok = transformers.AutoTokenizer.from_pretrained(str(ds.tokenizer_path))
  builder = make_builder(ds, tok, text_only=False, max_history=3)
  splits = catalog.leave_one_out(ds)
  it = iter(pipeline.train_dataset(splits.train, builder, batch_size=8, seed=0))
  batches = [pipeline.split_bookkeeping(next(it))[0] for _ in range(3)]
  text = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=32, patch_size=8)
  bcfg = BackboneConfig("idefics3", text, vision, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
  model_fn = lambda: PixRec(Backbone(bcfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=16), rngs=nnx.Rngs(1))
  out = {}
  for name, (data, fsdp, tensor, n) in MESHES.items():
    mesh = shd.make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
    tx, sched = optim.optimizer(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
    trainer = Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), mesh, sched)
    state = trainer.init_state()
    losses = []
    for batch in batches:
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))
    params = {"/".join(map(str, path)): np.asarray(v[...]).ravel().tolist()
              for path, v in nnx.to_flat_state(state.params)}
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
    out[name] = {"losses": losses, "params": params, "specs": specs}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
