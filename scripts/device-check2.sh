#!/usr/bin/env bash
# device-check2.sh — the second, short device check of 2026-11-30 (issue 7), after the first
# run (scripts/device-speed.sh) measured the fast path's kernels and found two failing tests.
# It checks what changed since: the new defaults (fused epilogue, fused optimizer, resampling
# kernels, channels-last on CUDA with the image layer, padded where its filter is 3×3), the
# zeroed pooling gradient of odd sides, the vectorised channels-last epilogues (GZ_NHWC_VEC=0
# is the scalar A/B), the stage-by-stage `tiny` diagnostic, and the PyTorch peer's two bf16
# training rows in the same session.
#
# Prepare here (no GPU):  bash scripts/device-cudnn.sh --prepare && cp ../shared/bench/torch_peer.py scripts/
# Device call:  run(command="BUDGET=300 bash scripts/device-check2.sh",
#                   carry=["target/device-cudnn", "scripts/torch_peer.py"], timeout_s=330)
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PKG="$HERE/target/device-cudnn"
OUT="${OUT:-/tmp/gz-device-out}"
BUDGET=${BUDGET:-300}
S="$OUT"
mkdir -p "$OUT"
SUM="$OUT/summary.txt"; : > "$SUM"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUM"; }
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export CUDA_CACHE_MAXSIZE=4294967296 RUST_BACKTRACE=0
BIN=/tmp/gz-device-bin; mkdir -p "$BIN"
for f in gz-model-tests gz; do
  [ -f "$PKG/$f.gz" ] && gunzip -c "$PKG/$f.gz" > "$BIN/$f" && chmod +x "$BIN/$f"
done
say "bundle built from: $(tr '\n' ' ' < "$PKG/built-from.txt" 2>/dev/null || echo unknown)"

bench() { # name timeout [GZ_*=v ...] args...
  local name=$1 t=$2; shift 2
  local envs=()
  while [[ "${1:-}" == GZ_* ]]; do envs+=("$1"); shift; done
  if [ "$(left)" -lt $(( t / 2 + 5 )) ]; then say "bench $name skipped: $(left) s left"; return; fi
  env "${envs[@]}" timeout "$t" "$BIN/gz" bench-train --device cuda "$@" > "$S/bench-$name.log" 2>&1
  local rc=$?
  say "bench $name rc=$rc: $(grep -E 'images/s' "$S/bench-$name.log" | tail -1 | sed 's/.*steps=[0-9]*: //')"
  [ $rc -ne 0 ] && tail -4 "$S/bench-$name.log" | tee -a "$SUM"
}
tests() { # filter timeout
  local group=$1 t=$2
  if [ "$(left)" -lt $(( t / 2 + 5 )) ]; then say "TESTS $group skipped: $(left) s left"; return; fi
  local log="$S/tests-$(echo "$group" | tr -c 'a-z_\n' '_').log"
  GZ_REQUIRE_CUDA=1 timeout "$t" "$BIN/gz-model-tests" "$group" --test-threads=1 --nocapture > "$log" 2>&1
  local rc=$?
  say "TESTS $group rc=$rc: $(grep -E 'test result' "$log" | tail -1)"
  grep -E "^test .*FAILED|panicked|Error:|checks off|stages off" "$log" | head -12 | tee -a "$SUM"
}
breakdown() { grep -E "^\s+(batch|forward|backward|optimizer|conv|max-pool|everything)" "$S/bench-$1.log" | tee -a "$SUM"; }

V="--model vgg16-blog --batch 256 --precision bf16"
D="--model dieleman --batch 256 --precision bf16"
R="--steps 20 --warmup 3 --pipelined"
# 1. the new defaults and the vectorised epilogues' A/B (first bench pays the PTX compile)
bench vgg-bf16-default 60 $V $R
bench vgg-bf16-scalar-epilogue 40 GZ_NHWC_VEC=0 $V $R
bench dieleman-bf16-default 40 $D $R
bench dieleman-bf16-scalar-epilogue 40 GZ_NHWC_VEC=0 $D $R
bench vgg-bf16-default-breakdown 40 $V --steps 10 --warmup 3 --profile-steps 5
breakdown vgg-bf16-default-breakdown
# 2. correctness: what failed in the first run, what is new, and the default path end to end
tests cudnn::tests:: 60
tests nets::vgg::cuda_tests 20
tests nets::cuda_tests 30
tests cudnn::fused:: 30
tests ops::tests::cuda_ 20
tests train::cuda_tests::fast_path 40
# 3. the peer's two bf16 training rows (eager), same session
PEER="$HERE/scripts/torch_peer.py"
if [ -f "$PEER" ] && [ "$(left)" -gt 60 ]; then
  cat > /tmp/peer2.py <<EOF
import sys; sys.path.insert(0, "$HERE/scripts")
import torch, torch_peer as p
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
p.bench("vgg", p.vgg, (3, 106, 106), 1, 256, "bf16", True)
p.bench("dieleman", p.Dieleman, (3, 45, 45), 16, 256, "bf16", True)
EOF
  timeout $(( $(left) - 10 )) env -u LD_LIBRARY_PATH /opt/torch/.venv/bin/python /tmp/peer2.py > "$S/torch_peer.jsonl" 2> "$S/torch_peer.err"
  say "torch_peer rc=$?"; tee -a "$SUM" < "$S/torch_peer.jsonl"
else
  say "torch_peer skipped ($(left) s left)"
fi
# 4. inference and f32 with the defaults, as time allows
bench vgg-bf16-default-inference 30 $V $R --inference
bench dieleman-bf16-default-inference 30 $D $R --inference
bench vgg-f32-128-default 30 --model vgg16-blog --batch 128 --precision f32 $R
bench dieleman-bf16-default-breakdown 30 $D --steps 10 --warmup 3 --profile-steps 5
breakdown dieleman-bf16-default-breakdown
say "done"
