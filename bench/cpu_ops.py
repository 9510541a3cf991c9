"""The decoder's pieces, ours (JAX) against PyTorch's, one at a time, at the demo step's shapes.

Where bench/train_step.py --torch compares whole train steps, this times the parts
both steps are made of, in one process on the same inputs, to say where a gap
between the two comes from: the three matmuls of a linear layer (forward, input
gradient, weight gradient), a SwiGLU MLP's forward and backward, causal
grouped-query attention's forward and backward (ours: pixrec_jax.models.layers.attention,
the einsum form XLA compiles; PyTorch's: scaled_dot_product_attention, the fused
kernel transformers' sdpa models call), and the rotary embedding's forward and
backward on the queries (ours: layers.apply_rope; PyTorch's: transformers' rotate_half
form under autograd); with --vision, also a vision tower's attention (forward and
backward, and the forward alone, as a frozen tower runs it) and its MLP
(SigLIP's: width -> 4 x width -> width, tanh GELU, biases; theirs transformers'
SiglipMLP form). Float32 (--dtype bfloat16: both in bfloat16). Each figure is the median of
--rounds rounds of --iters calls after a warm-up call; JAX results are synced
once per round. Threads: both libraries use every core the process may run on;
pin with `taskset -c 0` for one.

The last line is one JSON object: {name: {"jax_ms", "torch_ms", "jax_over_torch"}}.

  python bench/cpu_ops.py                 # the demo decoder's shapes (batch 32 x 184 tokens)
  python bench/cpu_ops.py --vision 3,1024,12,64   # also smolvlm_256m's vision attention and MLP (3 tiles, 512 px)
  taskset -c 0 python bench/cpu_ops.py    # one core
  python bench/cpu_ops.py --dtype bfloat16   # both libraries in bfloat16
  python bench/cpu_ops.py --vision 3,1024,12,64 --only vision --query-block 256   # that piece alone, other blocks
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from pixrec_jax import xla_options
from pixrec_jax.models import layers


def _time(fn, rounds: int, iters: int, sync=lambda r: None) -> float:
  """Median milliseconds per call of fn()."""
  sync(fn())
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn()
    sync(out)
    times.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(times)


def _jax(fn, *args, dtype="float32"):
  f = jax.jit(fn, compiler_options=xla_options.compiler_options())  # as the train step compiles
  args = [a if a is None else jnp.asarray(a, dtype if a.dtype == np.float32 else None) for a in args]
  return lambda: f(*args)


def _torch(fn, *args, grad=(), dtype="float32"):
  dtype = getattr(torch, dtype)
  args = [a if a is None else torch.from_numpy(a).to(dtype if a.dtype == np.float32 else None).requires_grad_(i in grad)
          for i, a in enumerate(args)]
  return lambda: fn(*args)


def cases(batch: int = 32, seq: int = 184, hidden: int = 128, ffn: int = 256, heads: int = 4, kv_heads: int = 2,
          head_dim: int = 32, causal_blocks: int = 4, vision: tuple[int, int, int, int] | None = None,
          seed: int = 0, dtype: str = "float32", vision_padded: bool = True) -> dict:
  """{name: (ours, theirs)}: argument-free callables computing the same thing on the same inputs (drawn in
  float32, cast to `dtype` in both libraries).

  vision=(tiles, patches, heads, head_dim) adds a vision tower's bidirectional attention (every query head
  its own key head; with vision_padded the last tile's trailing patches padding, as padded images are; without,
  no mask, as full-size tiles have none: smolvlm_256m's train step).
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  b, t, d, f = batch, seq, hidden, ffn
  n, kv, h = heads, kv_heads, head_dim
  x, w, dy = normal(b * t, d), normal(d, f) * 0.05, normal(b * t, f)
  gate, up, down = normal(d, f) * 0.05, normal(d, f) * 0.05, normal(f, d) * 0.05
  q, k, v = normal(b, t, n, h), normal(b, t, kv, h), normal(b, t, kv, h)
  lengths = rng.integers(t // 3, t + 1, b)  # right padding, as training batches have
  lengths[0] = t
  pad = np.arange(t)[None, :] < lengths[:, None]
  mask = np.tril(np.ones((t, t), bool))[None, None] & pad[:, None, None, :]  # (B, 1, T, T)
  scale = h**-0.5

  def jax_mlp(x, gate, up, down):
    def loss(params, x):
      g, u, o = params
      return jnp.sum(((jax.nn.silu(x @ g) * (x @ u)) @ o)**2)
    (dg, du, do), dx = jax.grad(loss, argnums=(0, 1))((gate, up, down), x)
    return dg, du, do, dx

  def torch_mlp(x, gate, up, down):
    y = (torch.nn.functional.silu(x @ gate) * (x @ up)) @ down
    return torch.autograd.grad((y * y).sum(), [gate, up, down, x])

  def jax_attention(scale, causal_blocks=1):  # dQ, dK, dV of sum(attention^2), ours
    def grads(q, k, v, mask):
      loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, scale, causal_blocks=causal_blocks)**2)
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return grads

  def torch_attention(scale):  # the same with PyTorch's fused kernel (grouped queries where K < N)
    def grads(q, k, v, mask):
      out = torch_sdpa(q, k, v, mask, scale)
      return torch.autograd.grad((out * out).sum(), [q, k, v])
    return grads

  positions = np.tile(np.arange(t), (b, 1))
  inv_freq = np.array(layers.rope_inv_freq(h, 10000.0))  # writable: torch.from_numpy warns otherwise
  co = rng.standard_normal((b, t, n, h)).astype(np.float32)  # a cotangent: the gradient of sum(co * rope(q))

  def jax_rope(q, positions, co):
    out, vjp = jax.vjp(lambda q: layers.apply_rope(q, positions, inv_freq), q)
    return out, vjp(co)[0]

  def torch_rope(q, positions, co):  # transformers' Llama form: cat(freqs, freqs), rotate_half
    freqs = positions[..., None].float() * torch.from_numpy(inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]
    half = q.shape[-1] // 2
    out = q * emb.cos() + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * emb.sin()
    return out, torch.autograd.grad(out, q, co)[0]

  jx = functools.partial(_jax, dtype=dtype)
  pt = functools.partial(_torch, dtype=dtype)
  pairs = {
      "linear forward x @ W": (jx(lambda x, w: x @ w, x, w), pt(lambda x, w: x @ w, x, w)),
      "linear input gradient dy @ W.T": (jx(lambda dy, w: dy @ w.T, dy, w), pt(lambda dy, w: dy @ w.T, dy, w)),
      "linear weight gradient x.T @ dy": (jx(lambda x, dy: x.T @ dy, x, dy), pt(lambda x, dy: x.T @ dy, x, dy)),
      "SwiGLU MLP forward + backward": (jx(jax_mlp, x, gate, up, down),
                                        pt(torch_mlp, x, gate, up, down, grad=(0, 1, 2, 3))),
      "causal GQA attention forward + backward": (jx(jax_attention(scale, causal_blocks), q, k, v, mask),
                                                  pt(torch_attention(scale), q, k, v, mask, grad=(0, 1, 2))),
      "rotary embedding forward + backward": (jx(jax_rope, q, positions, co),
                                              pt(torch_rope, q, positions, co, grad=(0,))),
  }
  if vision:
    tiles, patches, vheads, vdim = vision
    vq, vk, vv = (normal(tiles, patches, vheads, vdim) for _ in range(3))
    keys = np.ones((tiles, 1, 1, patches), bool)
    keys[-1, ..., patches - patches // 4:] = False
    keys = keys if vision_padded else None
    pairs[f"vision attention {tiles} x {patches} patches"] = (
        jx(jax_attention(vdim**-0.5), vq, vk, vv, keys),
        pt(torch_attention(vdim**-0.5), vq, vk, vv, keys, grad=(0, 1, 2)))
    # The forward alone: a frozen tower's (train.trainable=frozen_vision or heads_lm_head, the paper's
    # modes) and the catalogue's image embeddings at evaluation.
    pairs[f"vision forward attention {tiles} x {patches} patches"] = (
        jx(lambda q, k, v, mask: layers.attention(q, k, v, mask, vdim**-0.5), vq, vk, vv, keys),
        pt(torch_attention_forward(vdim**-0.5), vq, vk, vv, keys))
    width = vheads * vdim  # SigLIP's MLP: width -> 4 x width -> width, tanh GELU, biases
    vx, vdy = normal(tiles * patches, width), normal(tiles * patches, width)
    fc1, fc2 = normal(width, 4 * width) * 0.03, normal(4 * width, width) * 0.03
    b1, b2 = normal(4 * width) * 0.03, normal(width) * 0.03
    pairs[f"vision MLP {tiles} x {patches} patches"] = (
        jx(jax_vision_mlp, vx, fc1, b1, fc2, b2, vdy), pt(torch_vision_mlp, vx, fc1, b1, fc2, b2, vdy, grad=range(5)))
  return pairs


def torch_sdpa(q, k, v, mask, scale):
  """PyTorch's fused kernel (transformers' sdpa) on our (B, T, N, H) layout; its output is (B, N, T, H)."""
  return torch.nn.functional.scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True)


def torch_attention_forward(scale):
  """PyTorch's fused kernel's forward, no autograd: (B, T, N, H) in and out, as ours."""
  def forward(q, k, v, mask):
    with torch.no_grad():
      return torch_sdpa(q, k, v, mask, scale).transpose(1, 2)
  return forward


def jax_vision_mlp(x, fc1, b1, fc2, b2, dy):
  """Ours: the gradients of sum(mlp(x) * dy) for SigLIP's MLP as siglip.VisionMLP computes it."""
  gelu = layers.activation("gelu_pytorch_tanh")
  def loss(params, x):
    fc1, b1, fc2, b2 = params
    return jnp.sum(layers.add_bias(gelu(layers.add_bias(x @ fc1, b1)) @ fc2, b2) * dy)
  params, dx = jax.grad(loss, argnums=(0, 1))((fc1, b1, fc2, b2), x)
  return (*params, dx)


def torch_vision_mlp(x, fc1, b1, fc2, b2, dy):
  """PyTorch's: transformers' SiglipMLP under autograd."""
  y = torch.nn.functional.linear(torch.nn.functional.gelu(x @ fc1 + b1, approximate="tanh"), fc2.T, b2)
  return torch.autograd.grad((y * dy).sum(), [fc1, b1, fc2, b2, x])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=184)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--ffn", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--causal-blocks", type=int, default=4, help="as model.causal_blocks (ours only)")
  parser.add_argument("--vision", default="", help="TILES,PATCHES,HEADS,HEAD_DIM: also a vision tower's attention "
                      "and MLP (SigLIP at 512 px as smolvlm_256m trains it: 3,1024,12,64)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the inputs' dtype in both libraries (bfloat16: PyTorch's oneDNN kernels, AMX where the "
                      "CPU has it; XLA's CPU backend)")
  parser.add_argument("--vision-mask", default="padded", choices=("padded", "none"),
                      help="padded: the last tile's trailing quarter of patches masked out; none: full-size tiles, "
                      "no mask (smolvlm_256m's CPU rows)")
  parser.add_argument("--only", default="", help="time only the pieces whose name contains this (e.g. vision)")
  parser.add_argument("--query-block", type=int, default=layers.HEAD_QUERY_BLOCK,
                      help="the vision attention's queries a block, about, at most (layers.HEAD_QUERY_BLOCK)")
  parser.add_argument("--block-rows", type=int, default=layers.HEAD_BLOCK_ROWS,
                      help="and its tiles x queries a block, about (layers.HEAD_BLOCK_ROWS)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  layers.HEAD_QUERY_BLOCK, layers.HEAD_BLOCK_ROWS = args.query_block, args.block_rows
  b, t, d, f, n, kv, h = args.batch, args.seq, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim
  vision = tuple(int(x) for x in args.vision.split(",")) if args.vision else None
  pairs = cases(b, t, d, f, n, kv, h, args.causal_blocks, vision, dtype=args.dtype,
                vision_padded=args.vision_mask == "padded")
  pairs = {name: pair for name, pair in pairs.items() if args.only in name}
  if not pairs:
    parser.error(f"--only {args.only!r} names none of the pieces")
  sync = jax.block_until_ready
  print(f"{b} x {t} tokens, hidden {d}, MLP {f}, {n} heads ({kv} KV) of {h}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; jax {jax.__version__}; {args.dtype}")
  result = {}
  for name, (ours, theirs) in pairs.items():
    jax_ms = _time(ours, args.rounds, args.iters, sync)
    torch_ms = _time(theirs, args.rounds, args.iters)
    result[name] = {"jax_ms": round(jax_ms, 3), "torch_ms": round(torch_ms, 3),
                    "jax_over_torch": round(jax_ms / torch_ms, 3)}
    print(f"{name:42s} jax {jax_ms:8.2f} ms   torch {torch_ms:8.2f} ms   jax/torch {jax_ms / torch_ms:.2f}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
