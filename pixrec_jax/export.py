"""python -m pixrec_jax.export --workdir W --out D [--step best|latest|N] [--overwrite]

Writes a trained run as a Hugging Face transformers directory that PyTorch loads
without this package's JAX side:
  config.json, model.safetensors  the backbone in float32, adapters merged, named by
                                  the conversion table (pixrec_jax.convert.hf): an
                                  idefics3 backbone as Idefics3ForConditionalGeneration
                                  (AutoModelForImageTextToText), a llama one as
                                  LlamaForCausalLM (AutoModelForCausalLM)
  tokenizer files                 the run's tokenizer (model.path's, or the dataset's)
  processor files                 image models: model.path's processor, or (random
                                  init) an Idefics3 processor with the run's image settings
  pixrec_heads.safetensors        user_proj and item_proj, in torch.nn.Linear layout
  pixrec.json                     what the heads need: pooling, sizes, the checkpoint step
pixrec_jax.convert.torch_heads.PixRecTorch loads the directory and computes user and
item embeddings from the backbone's hidden states, as the JAX towers do.

The step defaults to "best" (by checkpoint.best_metric; the latest if no checkpoint
was validated). Only safetensors are written and read.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import uuid

import jax
import numpy as np
import transformers
from flax import nnx

from pixrec_jax.convert import hf, torch_heads
from pixrec_jax.convert.safetensors_io import save_file
from pixrec_jax.data import images, processors
from pixrec_jax.models import lora
from pixrec_jax.recsys.model import PixRec
from pixrec_jax.train import checkpoint, run


def merge_adapters(model: PixRec) -> PixRec:
  """The model with trained adapters folded into the weights they adapt, as a plain model.

  Export writes base weights only, so LoRA adapters are merged here first: each
  kernel becomes W + (alpha / r) * A @ B (in float32) and the adapters are removed.
  `model` itself is left as it was.
  """
  graphdef, state = nnx.split(model)
  return lora.merge(nnx.merge(graphdef, jax.tree.map(lambda x: x, state)))


def _image_processor(spec: images.ImageSpec) -> transformers.Idefics3ImageProcessorPil:
  """An Idefics3 image processor with `spec`'s settings (ImageSpec.from_hf_dict read the other way)."""
  return transformers.Idefics3ImageProcessorPil(
      do_resize=spec.do_resize, size={"longest_edge": spec.longest_edge or spec.size},
      max_image_size={"longest_edge": spec.size}, do_image_splitting=spec.do_image_splitting,
      resample=spec.resample, do_rescale=spec.do_rescale, rescale_factor=spec.rescale_factor,
      do_normalize=spec.do_normalize, image_mean=list(spec.mean), image_std=list(spec.std),
      do_convert_rgb=spec.do_convert_rgb)


def _save_tokenizer_and_processor(trained: run.Trained, out: pathlib.Path) -> None:
  job = trained.job
  cfg = job.cfg
  bcfg = trained.model().backbone.cfg
  if bcfg.is_vlm:
    source = pathlib.Path(cfg.model.path) if cfg.model.path else None
    if source is not None and any((source / name).is_file() for name in processors.PROCESSOR_FILES):
      processor = transformers.AutoProcessor.from_pretrained(str(source), trust_remote_code=False)
    else:
      processor = transformers.Idefics3Processor(image_processor=_image_processor(run.image_spec(cfg, bcfg)),
                                                 tokenizer=run.load_tokenizer(cfg, job.dataset),
                                                 image_seq_len=bcfg.image_seq_len)
    processor.save_pretrained(out)
  # The tokenizer the model was trained with, last: a processor adds the chat tokens it misses
  # (<end_of_utterance>) to its tokenizer, ids the model's vocabulary does not have.
  run.load_tokenizer(cfg, job.dataset).save_pretrained(out)


def _linear(layer) -> dict[str, np.ndarray]:
  # torch Linear stores (out, in); ours is (in, out).
  return {"weight": np.ascontiguousarray(np.asarray(layer.kernel[...], np.float32).T),
          "bias": np.asarray(layer.bias[...], np.float32)}


def _check_out(out: pathlib.Path, workdir: pathlib.Path, overwrite: bool) -> None:
  out, workdir = out.resolve(), workdir.resolve()
  checkpoints = workdir / checkpoint.CHECKPOINT_DIR
  if out == workdir or out in workdir.parents or out == checkpoints or checkpoints in out.parents:
    raise ValueError(f"--out {out} would overwrite the run's own files in {workdir}; choose another folder")
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, step: str | int = "best",
           overwrite: bool = False) -> dict:
  """Writes checkpoint `step` of the run in `workdir` as the directory described in the module
  docstring; returns pixrec.json's contents."""
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  _check_out(out, workdir, overwrite)
  return export_trained(run.restore_trained(workdir, step), out)


def export_trained(trained: run.Trained, out: str | pathlib.Path) -> dict:
  """Writes a reopened run to `out` (replacing it); returns pixrec.json's contents."""
  out = pathlib.Path(out)
  model = merge_adapters(trained.model())
  bcfg = model.backbone.cfg
  # Written beside `out` and renamed into place, so that `out` is only ever complete.
  tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
  tmp.mkdir(parents=True)
  try:
    hf.save_pretrained(model.backbone, tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer_and_processor(trained, tmp)
    heads = {f"{name}.{key}": value for name in ("user_proj", "item_proj")
             for key, value in _linear(getattr(model, name)).items()}
    save_file(heads, tmp / torch_heads.HEADS_FILE)
    meta = {
        "format": torch_heads.FORMAT, "version": torch_heads.VERSION,
        "architecture": config["architectures"][0], "model_type": bcfg.model_type,
        "hidden_size": bcfg.text.hidden_size, "proj_dim": model.heads.proj_dim, "pooling": model.heads.pooling,
        "text_only": model.heads.text_only, "similarity": "cosine",
        "step": trained.step, "step_chosen": trained.why, "item_template": trained.job.cfg.data.template,
    }
    (tmp / torch_heads.CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return meta


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixrec_jax.export", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the training run's work directory")
  parser.add_argument("--out", required=True, help="the folder to write")
  parser.add_argument("--step", default="best", help="'best' (default), 'latest' or a checkpoint step")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  try:
    meta = export(args.workdir, args.out, args.step, args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"exported step {meta['step']} ({meta['step_chosen']}) of {args.workdir} as {meta['architecture']} "
        f"to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
