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
#              path) in the config's 4 causal query blocks (EXTRA="--config.model.causal_blocks=1": the full
#              square), scanned layers, remat $PALIGEMMA_REMAT; then the PyTorch reference (which halves its
#              batch until it fits, if it must: see its "batch")
#   smolvlm@B, paligemma@B   the same at batch B (smolvlm's image budget scaled with it)
#   paligemma_pallas[@B]  paligemma with attention=pallas (pixrec_jax.models.flash: fused, soft-capping
#              kernels), compared with the paligemma item's PyTorch reference at the same batch; no remat
#              unless PALIGEMMA_PALLAS_REMAT says (the fused kernels keep no (T, T) tensors)
#   attention  bench/attention.py: one attention layer forward + backward, xla / pallas / cudnn, each checked
#              against XLA's on the GPU first, at PaliGemma 2 3B's and SmolVLM-256M's decoder shapes
#   smolvlm_packed[@B], paligemma_packed[@B]  the same with the full prompts packed into the fewest rows
#              they fit (data.pack_rows; --pack-rows auto), compared with the plain item's PyTorch reference
#   smolvlm_items[@B]  smolvlm_packed with the items read alone in the rows too (data.pack_items)
#   smolvlm_loop  smolvlm with its layers unrolled (model.scan_layers=False, the config's default), then the
#              PyTorch reference on its batch
#   update     bench/optimizer_update.py on configs/smolvlm_256m.py (bf16): the optimiser update alone, in
#              both forms (the GPU's select, the CPU's lax.cond: pixrec_jax.train.trainer.update_under_cond)
#   loader     bench/loader_vs_step.py: the training input pipeline alone at the smolvlm shapes
#              ($LOADER_WORKERS worker processes), against the examples/s of this run's smolvlm step
#   buckets    bench/length_buckets.py on configs/smolvlm_256m.py:paper (batch 1, bf16, cuDNN attention): the
#              same training batches cut to the lengths they use (data.length_buckets=4) and static
#   cached     bench/feature_cache.py on configs/smolvlm_256m.py:paper (the same settings): the same training
#              batches from the frozen tower's feature table (train.cache_image_features) and from pixels
# PROFILE=1 also traces two steps of each model with jax.profiler ($OUT/<item>.xplane.pb, for XProf or
# TensorBoard's profile plugin); TORCH=0 skips the PyTorch references; RESIDENT=1 also times each step on
# a batch already on the device.
# Random weights throughout (no checkpoint is read). The default items took about 4 minutes on an H200
# (2026-11-26), inside the 10 minutes of one call.
# Ends with a summary table (markdown) and $OUT/summary.json.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PY="${PYTHON:-python3}"
ITEMS="${ITEMS:-demo smolvlm smolvlm_loop paligemma}"
SPECS="$(mktemp -d)"
SMOLVLM_BATCH="${SMOLVLM_BATCH:-16}"
# Image rows per smolvlm batch (data.image_budget): batch x (max_history + 3) / 2 x 1.2, a multiple of 8; 0: every slot.
SMOLVLM_BUDGET="${SMOLVLM_BUDGET:-80}"
PALIGEMMA_BATCH="${PALIGEMMA_BATCH:-4}"
PALIGEMMA_REMAT="${PALIGEMMA_REMAT:-full}"
PALIGEMMA_PALLAS_REMAT="${PALIGEMMA_PALLAS_REMAT:-none}"
# The PyTorch reference's batch for the paligemma items (default: ours, halved until it fits; on an H200
# batch 6 is its largest, so PALIGEMMA_TORCH_BATCH=6 times its best without the failed tries).
torch_batch=""
[ -n "${PALIGEMMA_TORCH_BATCH:-}" ] && torch_batch="--batch $PALIGEMMA_TORCH_BATCH"
LOADER_WORKERS="${LOADER_WORKERS:-8}"
TORCH="${TORCH:-1}"
# profile_args ITEM: the --profile option when PROFILE=1
profile_args() { [ "${PROFILE:-0}" = 1 ] && echo "--profile $SPECS/prof_$1"; }
# keep_profile ITEM: the trace's xplane.pb as $OUT/ITEM.xplane.pb
keep_profile() {
  local f
  f="$(find "$SPECS/prof_$1" -name '*.xplane.pb' 2>/dev/null | head -n 1)"
  [ -n "$f" ] && cp "$f" "$OUT/${1/@/_b}.xplane.pb"
}
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
  last="$(grep "^{" "$tmp" | tail -n 1)"  # the JSON line (worker processes may log after it)
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

# smolvlm_step NAME TIMEOUT ATTENTION [ARGS...]: bench/train_step.py on configs/smolvlm_256m.py at batch $b
# with $budget packed image rows, bf16
smolvlm_step() {
  local name=$1 limit=$2 attention=$3
  shift 3
  run "$name" "$limit" "$PY" bench/train_step.py --config configs/smolvlm_256m.py --batch "$b" \
    --warmup 2 --rounds 3 --steps 5 --spec-out "$SPECS/$name" --config.model.dtype=bfloat16 \
    --config.model.attention="$attention" --config.data.image_budget="$budget" $resident \
    $(profile_args "$name") "$@" $EXTRA
}

for item in $ITEMS; do
  batch_of() { case $1 in *@*) echo "${1#*@}" ;; *) echo "$2" ;; esac; }
  resident=""
  [ "${RESIDENT:-0}" = 1 ] && resident="--resident"
  case $item in
    demo)
      run demo 60 "$PY" bench/train_step.py --config configs/demo.py --batch 32 --warmup 1 --rounds 2 --steps 3 ;;
    smolvlm_loop)
      # The layers unrolled instead of scanned: no per-layer stacking of the activations the backward pass
      # reads (dynamic-update-slice and copy kernels, about a fifth of the scanned step on an H200), for a
      # longer compile. Compared with the smolvlm item's PyTorch reference (same batch).
      b=$SMOLVLM_BATCH budget=$SMOLVLM_BUDGET
      smolvlm_step "$item" 240 cudnn --config.model.scan_layers=False
      keep_profile "$item"
      # The config's default form, so its reference is the headline comparison (the same row as smolvlm's).
      [ "$TORCH" = 1 ] && [ -f "$SPECS/$item/spec.json" ] && \
        run smolvlm_torch 90 "$PY" bench/torch_reference.py --spec "$SPECS/$item" ;;
    smolvlm|smolvlm@*)
      b=$(batch_of "$item" "$SMOLVLM_BATCH")
      budget=$((SMOLVLM_BUDGET * b / SMOLVLM_BATCH))
      smolvlm_step "$item" 150 cudnn --scan-layers
      rc=$?
      keep_profile "$item"
      # XLA's attention keeps (images x heads x 1024 x 1024) float32 probabilities per vision layer: recompute them.
      [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && \
        smolvlm_step "${item/smolvlm/smolvlm_xla}" 120 xla --scan-layers --remat=minimal
      [ "$TORCH" = 1 ] && [ -f "$SPECS/$item/spec.json" ] && \
        run "${item}_torch" 90 "$PY" bench/torch_reference.py --spec "$SPECS/$item" ;;
    paligemma|paligemma@*)
      b=$(batch_of "$item" "$PALIGEMMA_BATCH")
      run "$item" 190 "$PY" bench/train_step.py --config configs/paligemma2_3b_224.py --batch "$b" \
        --warmup 2 --rounds 3 --steps 3 --spec-out "$SPECS/$item" --config.model.dtype=bfloat16 \
        --config.model.attention=xla --scan-layers --remat="$PALIGEMMA_REMAT" $resident $(profile_args "$item") $EXTRA
      keep_profile "$item"
      [ "$TORCH" = 1 ] && [ -f "$SPECS/$item/spec.json" ] && \
        run "${item}_torch" 100 "$PY" bench/torch_reference.py --spec "$SPECS/$item" $torch_batch ;;
    paligemma_pallas|paligemma_pallas@*)
      b=$(batch_of "$item" "$PALIGEMMA_BATCH")
      run "$item" 190 "$PY" bench/train_step.py --config configs/paligemma2_3b_224.py --batch "$b" \
        --warmup 2 --rounds 3 --steps 3 --config.model.dtype=bfloat16 --config.model.attention=pallas \
        --scan-layers --remat="$PALIGEMMA_PALLAS_REMAT" $resident $(profile_args "$item") $EXTRA
      keep_profile "$item" ;;
    smolvlm_packed|smolvlm_packed@*)
      # The full prompts packed into the fewest rows they fit (data.pack_rows; the reference pads a row each).
      b=$(batch_of "$item" "$SMOLVLM_BATCH")
      budget=$((SMOLVLM_BUDGET * b / SMOLVLM_BATCH))
      smolvlm_step "$item" 150 cudnn --scan-layers --pack-rows auto
      keep_profile "$item" ;;
    smolvlm_items|smolvlm_items@*)
      # smolvlm_packed with the items read alone packed into the rows too (data.pack_items: one decoder pass).
      b=$(batch_of "$item" "$SMOLVLM_BATCH")
      budget=$((SMOLVLM_BUDGET * b / SMOLVLM_BATCH))
      smolvlm_step "$item" 150 cudnn --scan-layers --pack-rows auto --config.data.pack_items=True
      keep_profile "$item" ;;
    paligemma_packed|paligemma_packed@*)
      b=$(batch_of "$item" "$PALIGEMMA_BATCH")
      run "$item" 190 "$PY" bench/train_step.py --config configs/paligemma2_3b_224.py --batch "$b" \
        --warmup 2 --rounds 3 --steps 3 --config.model.dtype=bfloat16 --config.model.attention=xla --pack-rows auto \
        --scan-layers --remat="$PALIGEMMA_REMAT" $resident $(profile_args "$item") $EXTRA
      keep_profile "$item" ;;
    attention)
      # The default tiles, then a sweep (a tile that does not build is reported and skipped).
      run attention_paligemma 150 "$PY" bench/attention.py --batch "$PALIGEMMA_BATCH" \
        --pallas-blocks 64x32,32x64,64x64,32x32x4
      run attention_smolvlm 120 "$PY" bench/attention.py --batch "$SMOLVLM_BATCH" --seq 544 --heads 9 \
        --kv-heads 3 --head-dim 64 --softcap 0 --pallas-blocks 128x64,64x128,128x128x8,64x64x8 ;;
    update)
      for form in select cond; do
        run "update_$form" 150 "$PY" bench/optimizer_update.py --config configs/smolvlm_256m.py \
          --config.model.dtype=bfloat16 --form "$form"
      done ;;
    loader)
      # The step rate to feed: this run's fastest smolvlm result (63 examples/s, the H200's, if none).
      rate="$("$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
r=[x['examples_per_s'] for x in r if x['item'].startswith('smolvlm') and 'examples_per_s' in x]; print(max(r) if r else 63)" "$RESULTS")"
      run loader 240 "$PY" bench/loader_vs_step.py --config configs/smolvlm_256m.py --steps 0 \
        --step-examples-per-s "$rate" --batches 40 --config.train.batch_size="$SMOLVLM_BATCH" \
        --config.data.image_budget="$SMOLVLM_BUDGET" --config.data.num_workers="$LOADER_WORKERS" \
        --workdir "$SPECS/loader" ;;
    buckets)
      run buckets 420 "$PY" bench/length_buckets.py --config configs/smolvlm_256m.py:paper --steps 40 \
        --config.model.dtype=bfloat16 --config.model.attention=cudnn ;;
    cached)
      run cached 420 "$PY" bench/feature_cache.py --config configs/smolvlm_256m.py:paper --steps 40 \
        --config.model.dtype=bfloat16 --config.model.attention=cudnn --eval-items 64 ;;
    *) echo "unknown item $item (demo smolvlm[@B] smolvlm_loop smolvlm_packed[@B] smolvlm_items[@B] paligemma[@B] paligemma_pallas[@B]" \
            "paligemma_packed[@B] attention update loader buckets cached)" ;;
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
  if name.startswith("attention_"):
    print(f"{name}: " + ", ".join(f"{k} {v.get('ms', v.get('error'))} ms" for k, v in r.items()
                                  if isinstance(v, dict) and ("ms" in v or "error" in v)))
    summary[name] = r
    continue
  if name.startswith("update_"):
    print(f"{name}: {r.get('update_s', r.get('error'))} s an optimiser update ({r.get('trainable_params')} parameters)")
    summary[name] = r
    continue
  if name == "buckets":
    print(f"buckets ({r.get('config')}): steady step {r.get('static', {}).get('step_s')} s static, "
          f"{r.get('cut', {}).get('step_s')} s cut ({r.get('steady_speedup', r.get('error'))}x); "
          f"{r.get('cut', {}).get('shapes')} shapes")
    summary[name] = r
    continue
  if name == "cached":
    print(f"cached ({r.get('config')}): steady step {r.get('pixels', {}).get('step_s')} s from pixels, "
          f"{r.get('cached', {}).get('step_s')} s from the table ({r.get('steady_speedup', r.get('error'))}x); "
          f"the table encoded in {r.get('cached', {}).get('encode_s')} s")
    summary[name] = r
    continue
  if name == "loader":
    print(f"loader ({r.get('num_workers')} workers): {r.get('loader_examples_per_s', r.get('error'))} examples/s, "
          f"{r.get('loader_over_step')}x the step's {r.get('train_steps_per_s')} steps/s")
    summary[name] = r
    continue
  theirs = rows.get(name.replace("_xla", "").replace("_loop", "").replace("_pallas", "").replace("_packed", "").replace("_items", "")
                    + "_torch", {})
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
