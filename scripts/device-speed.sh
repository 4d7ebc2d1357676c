#!/usr/bin/env bash
# device-speed.sh — the issue-7 device check for the fused kernels, run ONCE on the H200.
#
# What is new since the last device run (2026-11-28) and has never run on a GPU:
#   - fused bias + ReLU epilogue (cudnn::bias_relu / conv2d_relu; GZ_FUSED=0 switches it off)
#   - fused optimizer update (one launch per parameter then; see fifth session below) (optim::fused; GZ_OPTIM=generic or
#     bench-train --optimizer-path generic switches it off)
#   - affine resampling and Dieleman's 16 parts as one CUDA kernel (augment.rs)
#   - bench-train --pipelined (one sync per run: the figure to compare with PyTorch) and
#     --inference (forward only: the TTA target)
#   - channels-last towers (GZ_NHWC=1; off by default until this run says it is faster)
#   - third session (no device either): conv + bias + ReLU as ONE custom op (GZ_CONV_RELU_OP=0
#     builds the two-op graph), and the CUDA device tuned at open (no per-buffer cudarc events,
#     memory pool keeps freed memory; GZ_CUDA_DEFAULTS=1 undoes both); nets::cuda_tests now
#     compares bf16 on the raw outputs; conv + bias + ReLU + 2x2 max-pool as ONE op on the fused
#     path with a one-pass ReLU + pool backward kernel (GZ_FUSED_POOL=0 splits it; tests
#     cudnn::tests::cuda_conv_relu_one_op_matches_split, both ops);
#     the decision-tree output layer as one op (kernels/tree.cu, on with GZ_FUSED=1; test
#     tree::tests::cuda_op_matches_ops); each conv tower as ONE autograd node with its own
#     backward (cudnn/tower.rs; GZ_TOWER_OP=0 runs the layers one by one; test
#     ops::tests::cuda_tower_op_matches_layers)
#   - tenth session: GZ_NHWC_IMAGE=1 runs the 3-channel image layer channels-last too (no
#     permutation of the first convolution's output and gradient; test
#     ops::tests::cuda_tower_op_matches_layers covers it; GZ_NHWC_IMAGE=pad zero-pads its 3
#     channels to 8 for cuDNN's tensor-core kernels); the NCHW <-> NHWC layout changes of
#     the channels-last towers as one tiled transpose kernel (kernels/layout.cu, on wherever
#     channels-last runs; GZ_LAYOUT_KERNEL=0 uses candle's strided copy; test
#     cudnn::tests::cuda_layout_kernel_matches_permute)
#   - fifth session (no device either): the fused optimizer updates up to 32 tensors per launch
#     (a table by value; GZ_OPTIM_TENSORS=1 launches once per tensor as before; test
#     optim::fused::tests::fused_grouping_does_not_change_the_update)
# Order: 1. correctness of the new kernels and the old cuDNN tests; 2. A/B throughput
# (everything on, each fused piece off in turn), pipelined, plus one synchronised run with the
# per-phase breakdown; 3. inference; 4. the PyTorch peer in the same session.
#
# Prepare here (no GPU):  bash scripts/device-cudnn.sh --prepare && cp ../shared/bench/torch_peer.py scripts/
# Device call:  run(command="bash scripts/device-speed.sh",
#                   carry=["target/device-cudnn", "scripts/torch_peer.py"], timeout_s=540)
# Everything goes to $OUT (summary.txt first; logs packed in logs.tar.gz after each phase).
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PKG="$HERE/target/device-cudnn"
OUT="${OUT:-/tmp/gz-device-out}"
BUDGET=${BUDGET:-500}
S=/tmp/gz-speed-logs
rm -rf "$S"; mkdir -p "$S" "$OUT"
SUM="$OUT/summary.txt"; : > "$SUM"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUM"; }
pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$S" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export CUDA_CACHE_MAXSIZE=4294967296 RUST_BACKTRACE=1
BIN=/tmp/gz-device-bin; mkdir -p "$BIN"
for f in gz-model-tests gz; do
  [ -f "$PKG/$f.gz" ] && gunzip -c "$PKG/$f.gz" > "$BIN/$f" && chmod +x "$BIN/$f"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUM"
say "bundle built from: $(tr '\n' ' ' < "$PKG/built-from.txt" 2>/dev/null || echo unknown)"

# 1. Correctness (each group with its own timeout; one thread: the CUDA tests share the GPU).
if [ -x "$BIN/gz-model-tests" ]; then
  for spec in "cudnn::fused:: 40" "optim::fused:: 40" "augment::tests::cuda_ 30" "tree::tests::cuda_ 20" "dropout::tests::cuda_ 20" "ops::tests::cuda_ 30" "cudnn:: 100" "nets::cuda_tests 45" "train::cuda_tests::fast_path 60"; do
    set -- $spec; group=$1; t=$2
    log="$S/tests-$(echo "$group" | tr -c 'a-z_\n' '_').log"
    GZ_REQUIRE_CUDA=1 timeout "$t" "$BIN/gz-model-tests" "$group" --test-threads=1 > "$log" 2>&1
    rc=$?
    say "TESTS $group rc=$rc: $(grep -E 'test result' "$log" | tail -1)"
    grep -E "^test .*FAILED|panicked|Error:" "$log" | head -8 | tee -a "$SUM"
  done
else
  say "no test binary in $PKG"
fi
pack

# 2./3. Throughput. Each line: name, then bench-train arguments; env prefixes allowed.
bench() { # name timeout env-assignments... -- args...
  local name=$1 t=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  if [ "$(left)" -lt 60 ]; then say "bench $name skipped: $(left) s left"; return; fi
  env "${envs[@]}" timeout "$t" "$BIN/gz" bench-train --device cuda "$@" > "$S/bench-$name.log" 2>&1
  say "bench $name rc=$?: $(grep -E 'images/s' "$S/bench-$name.log" | tail -1 | sed 's/.*steps=[0-9]*: //')"
}
peer() {
  PEER="$HERE/scripts/torch_peer.py"
  PT=$(( $(left) - 60 )); [ $PT -gt 150 ] && PT=150
  if [ -f "$PEER" ] && [ $PT -gt 40 ]; then
    timeout $PT env -u LD_LIBRARY_PATH /opt/torch/.venv/bin/python "$PEER" > "$S/torch_peer.jsonl" 2> "$S/torch_peer.err"
    say "torch_peer rc=$?"; cat "$S/torch_peer.jsonl" | tee -a "$SUM"
  else
    say "torch_peer skipped (script present: $([ -f "$PEER" ] && echo yes || echo no), $(left) s left)"
  fi
}
if [ -x "$BIN/gz" ]; then
  # The new kernels are off by default until this run checks them: "all" switches them on.
  ALL="GZ_FUSED=1 GZ_OPTIM=fused GZ_RESAMPLE=kernel"
  V="--model vgg16-blog --batch 256 --precision bf16"
  D="--model dieleman --batch 256 --precision bf16"
  R="--steps 20 --warmup 3 --pipelined"
  # first what decides the issue: tested path vs everything new, both nets, then the peer
  bench vgg-bf16-baseline 50 GZ_FUSED=0 -- $V $R
  bench vgg-bf16-all 50 $ALL -- $V $R
  bench vgg-bf16-all-nhwc 50 $ALL GZ_NHWC=1 -- $V $R
  bench dieleman-bf16-baseline 50 GZ_FUSED=0 -- $D $R
  bench dieleman-bf16-all 50 $ALL -- $D $R
  bench dieleman-bf16-all-nhwc 50 $ALL GZ_NHWC=1 -- $D $R
  bench vgg-bf16-all-nhwc-image 50 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=1 -- $V $R
  bench vgg-bf16-all-nhwc-image-pad 50 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=pad -- $V $R
  bench vgg-bf16-all-nhwc-candle-layout 50 $ALL GZ_NHWC=1 GZ_LAYOUT_KERNEL=0 -- $V $R
  pack
  peer
  pack
  # then where the time goes, each new piece switched off in turn, f32 and inference
  bench vgg-bf16-breakdown 50 $ALL -- $V --steps 10 --warmup 3 --profile-steps 5
  grep -E "^\s+(batch|forward|backward|optimizer|conv|max-pool|everything)" "$S/bench-vgg-bf16-breakdown.log" | tee -a "$SUM"
  bench vgg-bf16-inference 40 $ALL -- $V $R --inference
  bench vgg-bf16-inference-nhwc 40 $ALL GZ_NHWC=1 -- $V $R --inference
  bench dieleman-bf16-inference 40 $ALL -- $D $R --inference
  bench dieleman-bf16-all-nhwc-image 50 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=1 -- $D $R
  bench vgg-bf16-no-fused-epilogue 50 GZ_FUSED=0 GZ_OPTIM=fused GZ_RESAMPLE=kernel -- $V $R
  bench vgg-bf16-generic-optimizer 50 GZ_FUSED=1 GZ_RESAMPLE=kernel -- $V $R --optimizer-path generic
  bench vgg-bf16-optimizer-one-launch-per-tensor 50 $ALL GZ_OPTIM_TENSORS=1 -- $V $R
  bench vgg-bf16-by-layers 50 $ALL GZ_TOWER_OP=0 -- $V $R
  bench dieleman-bf16-by-layers 50 $ALL GZ_TOWER_OP=0 -- $D $R
  bench vgg-bf16-unfused-pool 50 $ALL GZ_TOWER_OP=0 GZ_FUSED_POOL=0 -- $V $R
  bench vgg-bf16-two-op-epilogue 50 $ALL GZ_TOWER_OP=0 GZ_CONV_RELU_OP=0 -- $V $R
  bench vgg-bf16-cuda-defaults 50 $ALL GZ_CUDA_DEFAULTS=1 -- $V $R
  # session 1's breakdown gave 8.5 ms/step to "batch" (a 35 MB cast, ~20 µs of work): likely
  # the memory pool remapping after each phase's synchronisation, which the tuning stops
  bench vgg-bf16-breakdown-cuda-defaults 50 $ALL GZ_CUDA_DEFAULTS=1 -- $V --steps 10 --warmup 3 --profile-steps 0
  bench dieleman-bf16-breakdown 50 $ALL -- $D --steps 10 --warmup 3 --profile-steps 5
  grep -E "^\s+(batch|forward|backward|optimizer|conv|max-pool|everything)" "$S/bench-dieleman-bf16-breakdown.log" | tee -a "$SUM"
  bench vgg-f32-128 50 $ALL -- --model vgg16-blog --batch 128 --precision f32 $R
  pack
else
  say "no gz binary in $PKG: benches skipped"
  peer
fi
# the decisions in one table: each A/B pair as a ratio, and gz against the PyTorch peer
if [ -f "$HERE/scripts/device-compare.sh" ]; then
  bash "$HERE/scripts/device-compare.sh" "$SUM" "$S/torch_peer.jsonl" > "$S/compare.txt" 2>&1
  cat "$S/compare.txt" >> "$SUM"; cat "$S/compare.txt"
fi
say "done"
pack
