"""The same PixRec train step the way the paper's reference code runs it: PyTorch + transformers.

Reads what bench/train_step.py --spec-out DIR wrote (the batch, the Hugging Face
config of the same backbone, loss weights, optimiser settings and dtype) and
times the reference's step on it: a randomly initialised transformers model
(`Idefics3ForConditionalGeneration`, `PaliGemmaForConditionalGeneration` or
`LlamaForCausalLM`), the full pass over user + target segment (logits at every
position, as the model returns them), a second, separate pass over the target
item alone (its image encoded again), pooling, two linear heads, the mixed loss
(token cross-entropy on the target text, two InfoNCE terms with the same weights
and temperature), gradient clipping and AdamW. bfloat16 compute runs under
autocast with float32 parameters, as ours keeps them. Timing as ours: warm-up,
then rounds of steps with one device sync per round; median round.

The last line is one JSON object; with the spec's own figures from train_step.py
it holds ratio_vs_torch (ours / theirs, examples per second).

  python bench/torch_reference.py --spec DIR [--device cuda] [--attn eager] [--batch N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import transformers

ARCHS = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
         "paligemma": "PaliGemmaForConditionalGeneration", "llama": "LlamaForCausalLM"}


def pool(hidden, mask, how):
  mask = mask.to(hidden.dtype)
  if how == "mean":
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
  last = hidden.shape[1] - 1 - torch.argmax(mask.flip(1), dim=1)
  return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def info_nce(queries, keys, item_ids, temperature):
  q = torch.nn.functional.normalize(queries.float(), dim=-1, eps=1e-6)
  k = torch.nn.functional.normalize(keys.float(), dim=-1, eps=1e-6)
  logits = q @ k.T / temperature
  eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
  logits = logits.masked_fill((item_ids[:, None] == item_ids[None, :]) & ~eye, float("-inf"))
  return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


class Reference(torch.nn.Module):
  """The backbone and PixRec's two heads."""

  def __init__(self, spec: dict, attn: str):
    super().__init__()
    hf = dict(spec["hf_config"])
    model_type = hf["model_type"]
    config = transformers.AutoConfig.for_model(**hf)
    cls = getattr(transformers, ARCHS[model_type])
    self.model = cls._from_config(config, attn_implementation=attn or None)
    self.vlm = model_type != "llama"
    d = config.text_config.hidden_size if self.vlm else config.hidden_size
    self.user_proj = torch.nn.Linear(d, spec["proj_dim"])
    self.item_proj = torch.nn.Linear(d, spec["proj_dim"])
    self.paligemma = model_type == "paligemma"

  def images(self, pixels, valid):
    """Idefics3 drops all-zero padding images itself; PaliGemma takes only the real ones, flattened."""
    return pixels[valid] if self.paligemma else pixels

  def forward(self, b: dict, spec: dict):
    kw = {}
    if self.vlm and not spec["text_only"]:
      kw["pixel_values"] = self.images(b["images"], b["image_valid"])
    out = self.model(input_ids=b["full_ids"], attention_mask=b["full_mask"], output_hidden_states=True, **kw)
    hidden = out.hidden_states[-1]
    logits = out.logits.float()
    rows = torch.arange(len(logits), device=logits.device)[:, None]
    nig_logits = logits[rows, b["nig_positions"]]
    nll = torch.nn.functional.cross_entropy(nig_logits.flatten(0, 1), b["nig_labels"].flatten().long(),
                                            reduction="none")
    w = b["nig_weights"].flatten()
    nig = (nll * w).sum() / w.sum().clamp(min=1.0)
    v_u = pool(hidden, b["user_mask"], spec["pooling"])
    v_tu = pool(hidden, b["target_mask"], spec["pooling"])
    item_kw = {}
    if kw:
      # The paper's item pass: the target item alone, its image encoded again.
      slots = torch.arange(b["images"].shape[1], device=hidden.device)
      target = b["image_valid"] & (slots[None] >= b["target_slot"][:, None])
      item_pixels = b["images"] * target[:, :, None, None, None]
      if self.paligemma:
        item_kw["pixel_values"] = item_pixels[target]
      else:
        # One image per item here (one tile): pass the target's slot alone.
        item_kw["pixel_values"] = item_pixels[rows[:, 0], b["target_slot"].long()][:, None]
    item_out = self.model(input_ids=b["item_ids"], attention_mask=b["item_mask"], output_hidden_states=True,
                          **item_kw)
    v_t = pool(item_out.hidden_states[-1], b["item_mask"], spec["pooling"])
    user, tu, item = self.user_proj(v_u.float()), self.item_proj(v_tu.float()), self.item_proj(v_t.float())
    tt = info_nce(tu, item, b["target_item"], spec["temperature"])
    ut = info_nce(user, item, b["target_item"], spec["temperature"])
    a, c = spec["alpha"], spec["beta"]
    return (1 - a - c) * nig + a * tt + c * ut


def spec_tied(ref: Reference) -> bool:
  return bool(getattr(ref.model.config, "tie_word_embeddings", False))


def trainable_parameters(ref: Reference, mode: str):
  if mode == "all":
    return list(ref.parameters())
  head = "embed_tokens" if spec_tied(ref) else "lm_head"  # a tied LM head is the embedding table
  names = {"frozen_vision": lambda n: "vision" not in n,
           "heads_lm_head": lambda n: n.split(".")[0] in ("user_proj", "item_proj") or head in n}
  if mode not in names:
    raise ValueError(f"trainable={mode!r}: the reference knows all, frozen_vision and heads_lm_head")
  keep = [p for n, p in ref.named_parameters() if names[mode](n)]
  for n, p in ref.named_parameters():
    p.requires_grad_(names[mode](n))
  return keep


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", required=True, help="the directory bench/train_step.py --spec-out wrote")
  parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
  parser.add_argument("--attn", default="", help="transformers attn_implementation (sdpa, eager; default: the "
                      "model's own choice, sdpa where it supports it, as the reference code gets it)")
  parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
  parser.add_argument("--batch", type=int, default=0, help="run the reference on the spec batch's first N rows "
                      "(0: all of them; a batch that does not fit is halved until it does either way)")
  parser.add_argument("--serve", action="store_true", help="after the warm-up, print a JSON line with \"ready\", "
                      "then run a round of the spec's steps for each line \"round\" read from stdin (a JSON line "
                      "with \"round_s\" after each), and report on end of input (bench/train_step.py --interleave)")
  args = parser.parse_args(argv)
  spec_dir = pathlib.Path(args.spec)
  if not (spec_dir / "spec.json").is_file():
    raise SystemExit(f"--spec {spec_dir}: no spec.json; write one with bench/train_step.py --spec-out {spec_dir}")
  spec = json.loads((spec_dir / "spec.json").read_text())
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.manual_seed(spec["seed"])
  with np.load(spec_dir / "batch.npz") as f:
    batch = {k: torch.from_numpy(f[k]).to(device) for k in f.files}
  for k in ("full_ids", "item_ids", "nig_positions"):
    batch[k] = batch[k].long()
  if "pixel_lut" in batch:  # uint8 rows (pipeline.pack_images): the processor's floats, once, on the device
    lut, raw = batch.pop("pixel_lut"), batch["images"].long()
    batch["images"] = lut[torch.arange(lut.shape[0], device=device)[:, None, None], raw]
  if "image_index" in batch:
    # Ours packed each distinct image once (data.image_budget); the reference takes (B, M) slots, empty ones zero.
    index, valid = batch.pop("image_index").long(), batch["image_valid"]
    batch["images"] = batch["images"][index] * valid[:, :, None, None, None]
  if args.batch:
    if not 0 < args.batch <= len(batch["full_ids"]):
      raise SystemExit(f"--batch {args.batch}: the spec in {spec_dir} holds {len(batch['full_ids'])} rows")
    batch = {k: v[:args.batch] for k, v in batch.items()}
  with device:  # initialised where it runs: a 3B model's random init on the host takes minutes
    ref = Reference(spec, args.attn)
  ref.train()
  params = trainable_parameters(ref, spec["trainable"])
  opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), weight_decay=spec["weight_decay"])
  bf16 = spec["dtype"] == "bfloat16"
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  losses = []
  full_batch = len(batch["full_ids"])

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = ref(batch, spec)
    loss.backward()
    if spec["clip_norm"]:
      torch.nn.utils.clip_grad_norm_(params, spec["clip_norm"])
    opt.step()
    losses.append(loss.detach())

  start = time.perf_counter()
  while True:
    try:
      for _ in range(spec["warmup"]):
        step()
      sync()
      break
    except torch.cuda.OutOfMemoryError:
      # The reference computes logits at every position: its largest batch that fits may be smaller than ours.
      n = len(batch["full_ids"]) // 2
      if n == 0:
        raise
      print(f"out of memory at batch {2 * n}; retrying with {n}", flush=True)
      opt.zero_grad(set_to_none=True)
      batch = {k: v[:n] for k, v in batch.items()}
      torch.cuda.empty_cache()
  warm = time.perf_counter() - start
  times, cpu = [], []

  def timed_round():
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(spec["steps"]):
      step()
    sync()
    times.append((time.perf_counter() - start) / spec["steps"])
    cpu.append((time.process_time() - start_cpu) / spec["steps"])

  if args.serve:
    print(json.dumps({"ready": True, "torch_warmup_s": round(warm, 1)}), flush=True)
    for line in sys.stdin:
      if line.strip() != "round":
        raise SystemExit(f"--serve: expected the line 'round' on stdin, got {line.strip()!r}")
      timed_round()
      print(json.dumps({"round_s": times[-1], "cpu_s": cpu[-1]}), flush=True)
    if not times:
      raise SystemExit("--serve: stdin ended before any 'round'")
  else:
    for _ in range(spec["rounds"]):
      timed_round()
  step_s = statistics.median(times)
  n = len(batch["full_ids"])
  kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  attn = ref.model.config._attn_implementation  # pylint: disable=protected-access
  result = {"bench": "torch_reference", "device": kind, "torch": torch.__version__,
            "transformers": transformers.__version__, "attn": attn, "dtype": spec["dtype"], "batch": n,
            "torch_step_s": round(step_s, 5), "torch_cpu_s_per_step": round(statistics.median(cpu), 4),
            "torch_warmup_s": round(warm, 1),
            "torch_examples_per_s": round(n / step_s, 3), "torch_loss": float(losses[-1]),
            "batch_asked": full_batch, "rounds": len(times), "interleaved": args.serve}
  ours = spec.get("ours") or {}
  print(f"PyTorch reference ({attn}, {spec['dtype']}) on {kind}: step {step_s * 1e3:.1f} ms, "
        f"{result['torch_examples_per_s']:.2f} examples/s")
  if ours.get("examples_per_s") and ours.get("device") and (ours["platform"] == "cpu") == (device.type == "cpu"):
    result["examples_per_s"] = ours["examples_per_s"]
    # From the step times and batches, not the rounded examples/s (coarse for steps of seconds).
    result["ratio_vs_torch"] = round(ours["batch"] / ours["step_s"] / (n / step_s), 3)
    print(f"ours / PyTorch reference: {result['ratio_vs_torch']:.2f}x")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
