#!/usr/bin/env bash
# The GPU benchmark suite, one command: ours and the PyTorch reference on the paper's backbones.
#
#   bash bench/gpu_suite.sh            # from the repository root; results in $OUT (default ./gpu_suite_out)
#   ITEMS="smolvlm" bash bench/gpu_suite.sh   # a subset: demo smolvlm paligemma (space separated)
#   TIMEOUT_SCALE=5 ITEMS=demo bash bench/gpu_suite.sh   # every timeout x5 (a slow machine, a CPU)
#
# Each item runs under its own timeout and appends its last output line (one JSON object, with "item")
# to $OUT/results.jsonl and its whole output to $OUT/suite.log; an item that fails or times out writes
# {"item": ..., "error": ...} instead, and the suite goes on. Three files in all: suite.log,
# results.jsonl, summary.json. Items:
#   demo       a smoke step of configs/demo.py (tiny, float32)
#   smolvlm    bench/train_step.py, configs/smolvlm_256m.py: bf16 compute, cuDNN attention (XLA's with
#              remat if the cuDNN run fails), scanned layers, data.image_budget=80 (padding slots skipped);
#              then bench/torch_reference.py on the same batch and settings
#   paligemma  configs/paligemma2_3b_224.py: bf16, XLA attention (Gemma2's logit soft-capping has no cuDNN
#              path), scanned layers, full remat; then the PyTorch reference (which halves its batch until it
#              fits, if it must: see its "batch")
# Random weights throughout (no checkpoint is read). Total time stays under 10 minutes on one H100/H200
# with the default timeouts (ITEMS="demo smolvlm" and ITEMS=paligemma split it in two calls).
# Ends with a summary table (markdown) and $OUT/summary.json.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PY="${PYTHON:-python3}"
ITEMS="${ITEMS:-demo smolvlm paligemma}"
SPECS="$(mktemp -d)"
SMOLVLM_BATCH="${SMOLVLM_BATCH:-16}"
# Image rows per smolvlm batch (data.image_budget): batch x (max_history + 3) / 2 x 1.2, a multiple of 8; 0: every slot.
SMOLVLM_BUDGET="${SMOLVLM_BUDGET:-80}"
PALIGEMMA_BATCH="${PALIGEMMA_BATCH:-4}"
# More bench/train_step.py options for both models (e.g. --config.KEY=VALUE) go in EXTRA.
EXTRA="${EXTRA:-}"

LOG="$OUT/suite.log"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
"$PY" - <<'EOF' 2>&1 | tee "$LOG"
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "flax", "optax", "ml_collections", "numpy", "torch", "transformers", "PIL"):
  try:
    print(name, getattr(importlib.import_module(name), "__version__", "?"))
  except Exception as e:  # report every missing module at once
    print(name, "MISSING", e)
import jax
print("devices", jax.devices())
EOF

# run ITEM TIMEOUT_S COMMAND...: the command's last line (with "item") -> results.jsonl; returns its status
run() {
  local item=$1 limit=$(($2 * ${TIMEOUT_SCALE:-1}))
  shift 2
  echo "=== $item (timeout ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS tmp
  tmp="$(mktemp)"
  timeout --kill-after=10 "$limit" "$@" >"$tmp" 2>&1
  local rc=$?
  cat "$tmp" >>"$LOG"
  tail -n 3 "$tmp"
  local last
  last="$(tail -n 1 "$tmp")"
  if [ $rc -eq 0 ] && [ "${last:0:1}" = "{" ]; then
    echo "{\"item\": \"$item\", ${last:1}" >>"$RESULTS"
  else
    local why="exit $rc"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && why="timeout after ${limit}s"
    grep -qi "out of memory\|RESOURCE_EXHAUSTED" "$tmp" && why="$why (out of memory)"
    printf '{"item": "%s", "error": "%s", "seconds": %d}\n' "$item" "$why" $((SECONDS - start)) >>"$RESULTS"
  fi
  rm -f "$tmp"
  echo "    -> $(tail -n 1 "$RESULTS" | head -c 400) [$((SECONDS - start)) s]"
  return $rc
}

for item in $ITEMS; do
  case $item in
    demo)
      run demo 60 "$PY" bench/train_step.py --config configs/demo.py --batch 32 --warmup 1 --rounds 2 --steps 3 ;;
    smolvlm)
      smolvlm() {
        run "$1" "$2" "$PY" bench/train_step.py --config configs/smolvlm_256m.py --batch "$SMOLVLM_BATCH" \
          --warmup 2 --rounds 3 --steps 5 --spec-out "$SPECS/smolvlm" --config.model.dtype=bfloat16 \
          --config.model.attention="$3" --scan-layers --config.data.image_budget="$SMOLVLM_BUDGET" $4 $EXTRA
      }
      smolvlm smolvlm 150 cudnn ""
      rc=$?
      # XLA's attention keeps (images x heads x 1024 x 1024) float32 probabilities per vision layer: recompute them.
      [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && smolvlm smolvlm_xla 120 xla --remat=minimal
      [ -f "$SPECS/smolvlm/spec.json" ] && run smolvlm_torch 90 "$PY" bench/torch_reference.py --spec "$SPECS/smolvlm" ;;
    paligemma)
      run paligemma 190 "$PY" bench/train_step.py --config configs/paligemma2_3b_224.py --batch "$PALIGEMMA_BATCH" \
        --warmup 2 --rounds 3 --steps 3 --spec-out "$SPECS/paligemma" --config.model.dtype=bfloat16 \
        --config.model.attention=xla --scan-layers --remat=full $EXTRA
      [ -f "$SPECS/paligemma/spec.json" ] && run paligemma_torch 100 "$PY" bench/torch_reference.py --spec "$SPECS/paligemma" ;;
    *) echo "unknown item $item (demo smolvlm paligemma)" ;;
  esac
done

"$PY" - "$OUT" <<'EOF' | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for line in (out / "results.jsonl").read_text().splitlines():
  r = json.loads(line)
  rows[r["item"]] = r
print("\n| item | device | batch | examples/s | TFLOP/s per device | MFU | torch examples/s (batch) | ratio vs torch |")
print("|---|---|---|---|---|---|---|---|")
summary = {}
for name, r in rows.items():
  if name.endswith("_torch"):
    continue
  theirs = rows.get(name.replace("_xla", "") + "_torch", {})
  ratio = None
  if r.get("examples_per_s") and theirs.get("torch_examples_per_s"):
    ratio = round(r["examples_per_s"] / theirs["torch_examples_per_s"], 3)
  summary[name] = {**r, "torch_examples_per_s": theirs.get("torch_examples_per_s"), "torch_batch": theirs.get("batch"),
                   "torch_error": theirs.get("error"), "ratio_vs_torch": ratio}
  mfu = r.get("mfu")
  print(f"| {name} | {r.get('device', '-')} | {r.get('batch', '-')} | {r.get('examples_per_s', r.get('error'))} | "
        f"{r.get('tflops_per_device', '-')} | {'-' if mfu is None else f'{mfu:.1%}'} | "
        f"{theirs.get('torch_examples_per_s', theirs.get('error', '-'))} ({theirs.get('batch', '-')}) | "
        f"{'-' if ratio is None else ratio} |")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
