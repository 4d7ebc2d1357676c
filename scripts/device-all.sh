#!/usr/bin/env bash
# device-all.sh — one device run that does everything a session's GPU budget allows, in order:
#   1. correctness on CUDA: cuDNN ops vs candle's reference (every layer shape, outputs and both
#      gradients), the nets and affine resampling CPU vs CUDA, GPU-resident training/resume;
#   2. training throughput: `gz bench-train` (cuDNN fast path vs candle's kernels) and the
#      PyTorch peer `torch_peer.py`, same machine, same session;
#   3. the full pipeline at Kaggle scale (scripts/device-full-scale.sh): 61,578 + 79,975
#      synthetic images (generated in the background from the start), prep, train, eval,
#      predict, 79,975-row submission.
# Prepared here with `bash scripts/device-cudnn.sh --prepare` (binaries into target/device-cudnn)
# and `cp ../shared/bench/torch_peer.py scripts/` (git-ignored, so carried). Device call:
#   run(command="bash scripts/device-all.sh", carry=["target/device-cudnn", "scripts/torch_peer.py"], timeout_s=600)
# The PyTorch peer runs without our LD_LIBRARY_PATH: with it, PyTorch found the system cuDNN 9.14
# before its bundled 9.19 and refused to start.
# Everything lands in a staging folder and is packed into $OUT/all.tar.gz after every phase
# (the device tool returns at most 8 files), with $OUT/summary.txt and $OUT/summary.md beside it.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG=$HERE/target/device-cudnn
FINAL=${OUT:-/tmp/gz-device-out}
BUDGET=${BUDGET:-550}            # seconds for the whole script (the call's timeout is 600)
S=${STAGE_DIR:-/tmp/gz-device-stage}
WORK=${WORK:-/tmp/gz-full}
rm -rf "$S"; mkdir -p "$S" "$FINAL" "$WORK"
SUM=$S/summary.txt
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUM"; }
pack() {
  tar -czf "$FINAL/all.tar.gz.tmp" -C "$S" . 2>/dev/null && mv "$FINAL/all.tar.gz.tmp" "$FINAL/all.tar.gz"
  cp "$SUM" "$FINAL/summary.txt"
  [ -f "$S/full/summary.md" ] && cp "$S/full/summary.md" "$FINAL/summary.md"
  [ -f "$S/full/stages.tsv" ] && cp "$S/full/stages.tsv" "$FINAL/stages.tsv"
}

export LD_LIBRARY_PATH="${EXTRA_LIBS:+$EXTRA_LIBS:}/usr/local/nvidia/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export CUDA_CACHE_MAXSIZE=4294967296 RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
BIN=/tmp/gz-device-bin; mkdir -p "$BIN"
for f in gz-model-tests gz; do
  [ -f "$PKG/$f.gz" ] && gunzip -c "$PKG/$f.gz" > "$BIN/$f" && chmod +x "$BIN/$f"
done
GZ=$BIN/gz
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | head -2; } 2>&1 | tee -a "$SUM"
[ -x "$GZ" ] || { say "FATAL: no gz binary in $PKG"; pack; exit 1; }
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -lms 1000 > "$S/gpu_mem.csv" 2>/dev/null &
SMI=$!

# Phase 3's data, started now on the CPU cores (niced) while the GPU runs phases 1 and 2.
N_TRAIN=${N_TRAIN:-61578}; N_TEST=${N_TEST:-79975}; SEED=${SEED:-2014}
( t=$(date +%s); nice -n 10 "$GZ" synth --out "$WORK/data" --train "$N_TRAIN" --test "$N_TEST" --seed "$SEED" \
    > "$S/synth.log" 2>&1; echo "synth rc=$? in $(( $(date +%s) - t )) s" >> "$S/synth.log" ) &
SYNTH=$!

# 1. Correctness on CUDA.
CUDNN_OK=0
if [ -x "$BIN/gz-model-tests" ]; then
  GZ_REQUIRE_CUDA=1 timeout 120 "$BIN/gz-model-tests" cudnn:: --test-threads=4 > "$S/tests-cudnn.log" 2>&1
  rc=$?; grep -E "test result|FAILED|panicked" "$S/tests-cudnn.log" | head -20 | tee -a "$SUM"
  if [ $rc -eq 0 ]; then CUDNN_OK=1; say "CUDNN TESTS: PASS"; else say "CUDNN TESTS: FAIL rc=$rc"; fi
  GZ_REQUIRE_CUDA=1 timeout 120 "$BIN/gz-model-tests" nets::cuda_tests train::cuda_tests augment:: tree:: --test-threads=2 \
    > "$S/tests-cuda.log" 2>&1
  rc=$?; grep -E "test result|FAILED|panicked" "$S/tests-cuda.log" | head -20 | tee -a "$SUM"
  say "CUDA MODEL/TRAINER TESTS: $([ $rc -eq 0 ] && echo PASS || echo "FAIL rc=$rc")"
else
  say "no test binary: correctness skipped"
fi
pack

# 2. Throughput: gz bench-train (cuDNN vs candle) and the PyTorch peer.
bench() { # name timeout args...
  local name=$1 t=$2; shift 2
  if [ "$(left)" -lt 330 ]; then say "bench $name skipped: $(left) s left"; return; fi
  timeout "$t" "$GZ" bench-train --device cuda "$@" > "$S/bench-$name.log" 2>&1
  say "bench $name rc=$?: $(grep -E 'images/s' "$S/bench-$name.log" | tail -1)"
}
CONV=cudnn; [ $CUDNN_OK = 1 ] || CONV=auto
bench vgg-bf16-256-$CONV 60 --model vgg16-blog --batch 256 --precision bf16 --steps 30 --warmup 3 --conv $CONV
bench vgg-f32-128-$CONV 50 --model vgg16-blog --batch 128 --precision f32 --steps 20 --warmup 3 --conv $CONV
bench dieleman-bf16-256-$CONV 50 --model dieleman --batch 256 --precision bf16 --steps 20 --warmup 3 --conv $CONV
bench vgg-bf16-256-candle 45 --model vgg16-blog --batch 256 --precision bf16 --steps 3 --warmup 1 --conv candle
bench vgg-f32-128-candle 45 --model vgg16-blog --batch 128 --precision f32 --steps 3 --warmup 1 --conv candle
pack
PEER=$HERE/scripts/torch_peer.py
PT=$(( $(left) - 260 )); [ $PT -gt 130 ] && PT=130
if [ -f "$PEER" ] && [ $PT -gt 30 ]; then
  timeout $PT env -u LD_LIBRARY_PATH /opt/torch/.venv/bin/python "$PEER" > "$S/torch_peer.jsonl" 2> "$S/torch_peer.err"
  say "torch_peer rc=$?"; cat "$S/torch_peer.jsonl" >> "$SUM"
else
  say "torch_peer skipped: script $PEER present? $([ -f "$PEER" ] && echo yes || echo no); $(left) s left"
fi
pack

# 3. Full scale. Wait for the data (the generator has had the whole of phases 1-2).
while kill -0 $SYNTH 2>/dev/null && [ "$(left)" -gt 200 ]; do sleep 2; done
if kill -0 $SYNTH 2>/dev/null; then say "synth still running at $(left) s left: stopping it"; kill $SYNTH; pkill -f "gz synth"; fi
tail -3 "$S/synth.log" | tee -a "$SUM"
if [ $CUDNN_OK = 1 ]; then
  export MAX_TRAIN= PRECISION=bf16 BATCH=256 EPOCHS=${EPOCHS:-2}
else
  export GZ_CONV=candle MAX_TRAIN=12000 PRECISION=f32 BATCH=128 EPOCHS=1
fi
say "full scale: conv=$([ $CUDNN_OK = 1 ] && echo cudnn || echo candle) precision=$PRECISION epochs=$EPOCHS max_train=${MAX_TRAIN:-all}, $(left) s left"
OUT=$S/full WORK=$WORK GZ=$GZ PEER=0 BENCH_PRECISIONS=" " DEADLINE=$(( $(left) - 15 )) \
  N_TRAIN=$N_TRAIN N_TEST=$N_TEST SEED=$SEED EVAL_BATCH=512 T_TRAIN=${T_TRAIN:-200} \
  bash "$HERE/scripts/device-full-scale.sh" > "$S/full-scale.log" 2>&1
say "full-scale rc=$?"
grep -E "^(stage|[a-z_]+)\s" "$S/full/stages.tsv" 2>/dev/null | tee -a "$SUM"
kill $SMI 2>/dev/null
say "GPU memory peak: $(awk -F', ' 'NR > 1 { v = $2 + 0; if (v > m) m = v } END { print m " MiB" }' "$S/gpu_mem.csv")"
say "done"
pack
