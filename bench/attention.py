"""One attention layer's forward + backward, each implementation the models offer, at a backbone's shapes.

Times `layers.attention` with attention="xla" (the einsum form, in --causal-blocks
query blocks), "pallas" (pixrec_jax.models.flash: fused kernels that soft-cap) and,
where the shapes allow it (no soft-cap, half precision, GPU), "cudnn", on one set of
random inputs and a causal mask with right padding, as PixRec's batches have. Before
timing, each implementation's output and gradients are compared with XLA's on the
same device (max abs difference, reported), so a kernel that compiles wrongly shows
up here and not as a slow drift in training. Each figure: median of --rounds rounds
of --iters calls after a warm-up call. The last line is one JSON object.

  python bench/attention.py                        # PaliGemma 2 3B's decoder at its train step's length
  python bench/attention.py --heads 15 --kv-heads 5 --head-dim 64 --softcap 0   # SmolVLM-256M's
  python bench/attention.py --batch 1 --seq 64 --impls xla,pallas   # CPU: pallas in Pallas's interpreter
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixrec_jax.models import flash, layers


def make_inputs(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), dtype)
  lengths = rng.integers(seq // 2, seq + 1, batch)
  lengths[0] = seq
  mask = np.tril(np.ones((seq, seq), bool))[None, None] & (np.arange(seq) < lengths[:, None, None, None])
  dout = jnp.asarray(rng.standard_normal(q.shape), dtype)
  return q, k, v, jnp.asarray(mask), dout


def step_fn(impl: str, scale: float, softcap: float | None, causal_blocks: int):
  """jit'd (q, k, v, mask, dout) -> (out, dq, dk, dv). impl "pallas_BQxBK[xW]": pallas with those tiles (and warps)."""

  def attention(q, k, v, mask):
    if impl.startswith("pallas_"):
      sizes = [int(x) for x in impl[len("pallas_"):].split("x")]
      causal = causal_blocks > 1 and q.shape[1] == k.shape[1]
      return flash.flash_attention(q, k, v, mask, scale, softcap, causal=causal, block_q=sizes[0],
                                   block_k=sizes[1], num_warps=sizes[2] if len(sizes) > 2 else None)
    return layers.attention(q, k, v, mask, scale, impl, softcap, causal_blocks)

  def fwd_bwd(q, k, v, mask, dout):
    attend = lambda q, k, v: attention(q, k, v, mask)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(dout)

  return jax.jit(fwd_bwd)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1680, help="tokens per sequence (PaliGemma 2 224's step: 1680)")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=256)
  parser.add_argument("--softcap", type=float, default=50.0, help="Gemma2's attention logit cap (0: none)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--causal-blocks", type=int, default=4, help="as model.causal_blocks (xla: query blocks; "
                      "pallas: > 1 is the causal promise that skips key blocks)")
  parser.add_argument("--impls", default="xla,pallas,cudnn", help="comma separated; cudnn is skipped where it "
                      "cannot run (soft-capping, float32, no GPU)")
  parser.add_argument("--pallas-blocks", default="", help="also time pallas with these tiles, comma separated "
                      "BQxBK or BQxBKxWARPS (e.g. 32x32,64x64x4): a block-size sweep in one call")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  softcap = args.softcap or None
  scale = args.head_dim**-0.5
  q, k, v, mask, dout = make_inputs(args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, dtype)
  device = jax.devices()[0]
  print(f"{args.batch} x {args.seq} tokens, {args.heads} heads ({args.kv_heads} KV) of {args.head_dim}, softcap "
        f"{softcap}, {dtype.name}; {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  impls = [i for i in args.impls.split(",") if i] + [f"pallas_{b}" for b in args.pallas_blocks.split(",") if b]
  if "cudnn" in impls and (softcap is not None or dtype == jnp.float32 or jax.default_backend() != "gpu"):
    print("cudnn: skipped (no soft-capping, half precision only, GPU only)")
    impls.remove("cudnn")
  reference = None
  result = {"device": device.device_kind, "batch": args.batch, "seq": args.seq, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "softcap": softcap, "dtype": dtype.name}
  for impl in impls:
    fn = step_fn(impl, scale, softcap, args.causal_blocks)  # cudnn ignores it; pallas reads it as causal
    try:
      start = time.perf_counter()
      outs = jax.block_until_ready(fn(q, k, v, mask, dout))
      compile_s = time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-except  # a kernel that fails to build: report it, go on
      print(f"{impl}: failed: {type(e).__name__}: {str(e)[:500]}")
      result[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
      continue
    if reference is None:
      reference = outs
    rows = np.asarray(mask.any(-1))[:, 0, :, None, None]  # query rows with a key (all, with causal masks)
    errors = {name: float(np.max(np.abs(np.where(rows if name == "out" else True, np.asarray(a, np.float32)
                                                 - np.asarray(b, np.float32), 0))))
              for name, a, b in zip(("out", "dq", "dk", "dv"), outs, reference)}
    times = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      for _ in range(args.iters):
        outs = fn(q, k, v, mask, dout)
      jax.block_until_ready(outs)
      times.append((time.perf_counter() - start) / args.iters * 1e3)
    ms = statistics.median(times)
    result[impl] = {"ms": round(ms, 3), "first_call_s": round(compile_s, 1),
                    "max_abs_diff_vs_" + impls[0]: {n: float(f"{e:.3g}") for n, e in errors.items()}}
    print(f"{impl:14s} {ms:9.2f} ms forward+backward (first call {compile_s:.1f} s); max |diff| vs {impls[0]}: "
          + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
  pallas = {k: v["ms"] for k, v in result.items() if k.startswith("pallas") and "ms" in v}
  if "ms" in result.get("xla", {}) and pallas:
    best = min(pallas, key=pallas.get)
    result["pallas_best"] = best
    result["pallas_speedup_vs_xla"] = round(result["xla"]["ms"] / pallas[best], 3)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
