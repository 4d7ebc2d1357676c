#!/usr/bin/env bash
# device-speed.sh — the issue-7 device check for the fused kernels, run ONCE on the H200.
# First run 2026-11-30 (docs/benchmarks.md, "H200 device runs, 2026-11-30"); the history below
# is what each session added for it.
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
#   - twenty-third session (no device): `gz bench-train --trace-kernels` (CUPTI, feature cupti;
#     the bundle carries libcupti.so.13) prints every kernel of the pipelined timed steps and the
#     GPU's idle time per step; rows vgg-bf16-trace / dieleman-bf16-trace after the decisive
#     rows, and scripts/torch_trace.py (torch.profiler, eager and torch.compile) after the peer.
#     Compare each trace row's images/s with its untraced default row (CUPTI's own cost).
#   - twenty-fourth session (no device): GZ_POOL_MASK=1, the pooled channels-last layers keep
#     one byte per pooled value (the first maximum's tap) instead of their ReLU output, so the
#     forward pass does not write y and the backward pass does not read it (rows *-pool-mask,
#     *-all-new = the three prepared pieces together; test cudnn::tests::cuda_pool_mask_*, and
#     ops::tests::cuda_tower_op_matches_layers runs the tower with masks too)
#   - fifth session (no device either): the fused optimizer updates up to 32 tensors per launch
#     (a table by value; GZ_OPTIM_TENSORS=1 launches once per tensor as before; test
#     optim::fused::tests::fused_grouping_does_not_change_the_update)
#
# Prepare here (no GPU):  bash scripts/device-cudnn.sh --prepare && cp ../shared/bench/torch_peer.py scripts/
#   (torch_trace.py, tracked, imports the copied torch_peer.py)
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
# CUPTI for --trace-kernels (the bundle's, before the torch venv's)
[ -f "$PKG/libcupti.so.13.gz" ] && gunzip -c "$PKG/libcupti.so.13.gz" > "$BIN/libcupti.so.13" \
  && export LD_LIBRARY_PATH="$BIN:$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUM"
say "bundle built from: $(tr '\n' ' ' < "$PKG/built-from.txt" 2>/dev/null || echo unknown)"

# Order (one shot of about 8 minutes, so what is new and decides comes first and every phase
# checks the time left): 1. the default rows and the three prepared pieces together; 2. the
# PyTorch peer (eager and torch.compile) side by side, the new pieces' tests and the loss-curve
# test; 3. the kernel traces of both rows, each piece's A/B, PyTorch's trace; then the other
# correctness tests; 4. breakdowns and the rows of 2026-11-30; 5. each piece off in turn,
# inference, f32. A step that would not fit is skipped and says so in summary.txt.
bench() { # name timeout env-assignments... -- args...
  local name=$1 t=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  if [ ! -x "$BIN/gz" ]; then say "bench $name skipped: no gz binary in $PKG"; return; fi
  if [ "$(left)" -lt $(( t / 2 + 10 )) ]; then say "bench $name skipped: $(left) s left"; return; fi
  [ "$t" -gt "$(left)" ] && t=$(left)
  env "${envs[@]}" timeout "$t" "$BIN/gz" bench-train --device cuda "$@" > "$S/bench-$name.log" 2>&1
  local rc=$?
  say "bench $name rc=$rc: $(grep -E 'images/s' "$S/bench-$name.log" | tail -1 | sed 's/.*steps=[0-9]*: //')"
  [ $rc -ne 0 ] && tail -4 "$S/bench-$name.log" | tee -a "$SUM"
}
tests() { # group timeout
  local group=$1 t=$2
  if [ ! -x "$BIN/gz-model-tests" ]; then say "TESTS $group skipped: no test binary"; return; fi
  if [ "$(left)" -lt $(( t / 2 + 10 )) ]; then say "TESTS $group skipped: $(left) s left"; return; fi
  [ "$t" -gt "$(left)" ] && t=$(left)
  local log="$S/tests-$(echo "$group" | tr -c 'a-z_\n' '_').log" t1=$(date +%s)
  GZ_REQUIRE_CUDA=1 timeout "$t" "$BIN/gz-model-tests" "$group" --test-threads=1 > "$log" 2>&1
  local rc=$?
  say "TESTS $group rc=$rc ($(( $(date +%s) - t1 )) s): $(grep -E 'test result' "$log" | tail -1)"
  grep -E "^test .*FAILED|panicked|Error:" "$log" | head -8 | tee -a "$SUM"
  [ $rc -ne 0 ] && tail -3 "$log" | tee -a "$SUM"
}
peer() {
  PEER="$HERE/scripts/torch_peer.py"
  # eager rows, then torch.compile's two bf16 rows (the issue's second targets; about 60 s
  # eager and 45 s compile on the H200 on 2026-11-30)
  PT=$(( $(left) - 20 )); [ $PT -gt 170 ] && PT=170
  if [ -f "$PEER" ] && [ $PT -gt 40 ]; then
    timeout $PT env -u LD_LIBRARY_PATH /opt/torch/.venv/bin/python "$PEER" --compile > "$S/torch_peer.jsonl" 2> "$S/torch_peer.err"
    say "torch_peer rc=$?"; cat "$S/torch_peer.jsonl" | tee -a "$SUM"
  else
    say "torch_peer skipped (script present: $([ -f "$PEER" ] && echo yes || echo no), $(left) s left)"
  fi
}
# the kernel-by-kernel table of a --trace-kernels row (its "GPU over" line to its copies line)
trace() { sed -n '/GPU over/,/copies /p' "$S/bench-$1.log" | tee -a "$SUM"; }
# torch.profiler's view of the peer's step, eager and torch.compile (scripts/torch_trace.py,
# beside the copied torch_peer.py): the same figures as gz's trace, side by side
torch_trace() {
  local T=$(( $(left) - 20 )); [ $T -gt 200 ] && T=200
  if [ -f "$HERE/scripts/torch_trace.py" ] && [ -f "$HERE/scripts/torch_peer.py" ] && [ $T -gt 60 ]; then
    timeout $T env -u LD_LIBRARY_PATH /opt/torch/.venv/bin/python "$HERE/scripts/torch_trace.py" > "$S/torch_trace.jsonl" 2> "$S/torch_trace.err"
    say "torch_trace rc=$?"; cat "$S/torch_trace.jsonl" | tee -a "$SUM"; tail -3 "$S/torch_trace.err" | tee -a "$SUM"
  else
    say "torch_trace skipped ($(left) s left)"
  fi
}
breakdown() { grep -E "^\s+(batch|forward|backward|optimizer|conv|max-pool|everything)" "$S/bench-$1.log" | tee -a "$SUM"; }

# Since the 2026-11-30 run everything below is on by default (channels-last on CUDA with the
# image layer, padded for 3x3 filters, vectorised epilogues), so each row names its settings in
# full: "all" is every piece on in NCHW (GZ_NHWC=0), "nhwc" channels-last from the first
# 8-channel layer (GZ_NHWC_IMAGE=0), "image" the image layer too; "default" sets nothing.
# (In env, the last assignment of a variable wins.)
ALL="GZ_FUSED=1 GZ_OPTIM=fused GZ_RESAMPLE=kernel GZ_NHWC=0"
V="--model vgg16-blog --batch 256 --precision bf16"
D="--model dieleman --batch 256 --precision bf16"
R="--steps 20 --warmup 3 --pipelined"
# 1. what is new since the 2026-11-30 run, first (that run measured the rest): the default
#    rows, the three prepared pieces (off by default) together, the kernel traces, then each
#    piece alone (the first bench also pays the driver's PTX compile, cached after)
NHWC="GZ_NHWC=1 GZ_NHWC_IMAGE=0"
BASE="GZ_FUSED=0 GZ_OPTIM=generic GZ_RESAMPLE=ops GZ_NHWC=0"
NEW="GZ_BIAS_FINISH=wide GZ_IMAGE_GEMM=1 GZ_POOL_MASK=1"
bench vgg-bf16-default 60 -- $V $R
bench dieleman-bf16-default 45 -- $D $R
# the three pieces together: the image layers as im2col + cuBLAS products, the bias
# gradient's finish by a block per channel, the pooled layers keeping a byte per pooled value
# instead of their ReLU output (2026-12-01)
bench vgg-bf16-all-new 45 $NEW -- $V $R
bench dieleman-bf16-all-new 45 $NEW -- $D $R
pack
# 2. the peer in the same session (eager and torch.compile: the issue's targets, about 105 s
#    on 2026-11-30), then the correctness of the three new pieces, so that a short run still
#    says whether the new rows pass torch.compile and whether the pieces may be switched on
peer
pack
tests cuda_image_gemm 60
tests cuda_wide_bias_finish 20
tests cuda_pool_mask 20
# the issue's loss-curve check, end to end through the trainer: candle's kernels, the
# defaults and the defaults with the three pieces, 210 steps each (f32 and bf16; 24 runs,
# never timed: the log has each run's seconds)
tests train::cuda_tests::loss_curve 150
pack
# 3. the kernel traces (gz's here, PyTorch's after the pieces), then each piece alone
# where each pipelined step's GPU time goes, kernel by kernel (CUPTI), and how long the GPU
# waits for the host (compare the rows' images/s with the default rows: CUPTI's own cost),
# for the defaults and with the three pieces
bench vgg-bf16-trace 45 -- $V $R --trace-kernels
trace vgg-bf16-trace
bench dieleman-bf16-trace 45 -- $D $R --trace-kernels
trace dieleman-bf16-trace
bench vgg-bf16-all-new-trace 45 $NEW -- $V $R --trace-kernels
trace vgg-bf16-all-new-trace
bench dieleman-bf16-all-new-trace 45 $NEW -- $D $R --trace-kernels
trace dieleman-bf16-all-new-trace
pack
# each piece alone, and the first two together
bench dieleman-bf16-image-gemm 45 GZ_IMAGE_GEMM=1 -- $D $R
bench vgg-bf16-wide-finish 45 GZ_BIAS_FINISH=wide -- $V $R
bench vgg-bf16-pool-mask 45 GZ_POOL_MASK=1 -- $V $R
bench dieleman-bf16-wide-finish 45 GZ_BIAS_FINISH=wide -- $D $R
bench vgg-bf16-image-gemm 45 GZ_IMAGE_GEMM=1 -- $V $R
bench dieleman-bf16-pool-mask 45 GZ_POOL_MASK=1 -- $D $R
bench vgg-bf16-both-new 45 GZ_BIAS_FINISH=wide GZ_IMAGE_GEMM=1 -- $V $R
bench dieleman-bf16-both-new 45 GZ_BIAS_FINISH=wide GZ_IMAGE_GEMM=1 -- $D $R
# the image layer's forward pass as the product, its filter gradient by cuDNN (the filter
# gradient's product, 112 × 32 outputs summed over 6.5 M rows, may not suit cuBLAS)
bench dieleman-bf16-image-gemm-fwd 45 GZ_IMAGE_GEMM=fwd -- $D $R
# … the filter gradient as one cuBLAS product instead of gz's parts (cuBLAS's own split)
bench dieleman-bf16-image-gemm-cublas 45 GZ_IMAGE_GEMM=cublas -- $D $R
pack
# PyTorch's view of its step, eager and torch.compile (after gz's traces above)
torch_trace
pack
# 3. the rest of the correctness checks (one thread: the CUDA tests share the GPU)
tests cudnn::fused:: 30
tests optim::fused:: 25
tests augment::tests::cuda_ 20
tests tree::tests::cuda_ 15
tests dropout::tests::cuda_ 15
tests ops::tests::cuda_ 25
tests cudnn::tests:: 60
tests nets::cuda_tests 40
tests train::cuda_tests::fast_path 45
pack
# 4. breakdowns and the rows measured on 2026-11-30 (the path of 2026-11-28, everything on
# in NCHW, channels-last without the image layer)
bench vgg-bf16-breakdown 45 -- $V --steps 10 --warmup 3 --profile-steps 5
breakdown vgg-bf16-breakdown
bench dieleman-bf16-image-gemm-breakdown 45 GZ_IMAGE_GEMM=1 -- $D --steps 10 --warmup 3 --profile-steps 5
breakdown dieleman-bf16-image-gemm-breakdown
bench vgg-bf16-baseline 45 $BASE -- $V $R
bench dieleman-bf16-baseline 45 $BASE -- $D $R
bench vgg-bf16-all 45 $ALL -- $V $R
bench dieleman-bf16-all 45 $ALL -- $D $R
bench vgg-bf16-all-nhwc 45 $ALL $NHWC -- $V $R
bench dieleman-bf16-all-nhwc 45 $ALL $NHWC -- $D $R
pack
# 5. where the time goes: each piece off in turn, images, inference, f32
bench vgg-bf16-inference 30 $ALL -- $V $R --inference
bench vgg-bf16-default-inference 30 -- $V $R --inference
bench dieleman-bf16-inference 30 $ALL -- $D $R --inference
bench dieleman-bf16-default-inference 30 -- $D $R --inference
bench dieleman-bf16-image-gemm-inference 30 GZ_IMAGE_GEMM=1 -- $D $R --inference
# (the pooling masks in inference: the pooled layers write a byte per pooled value, not y)
bench vgg-bf16-all-new-inference 30 $NEW -- $V $R --inference
bench dieleman-bf16-all-new-inference 30 $NEW -- $D $R --inference
bench vgg-bf16-all-nhwc-image 40 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=1 -- $V $R
bench vgg-bf16-scalar-epilogue 40 GZ_NHWC_VEC=0 -- $V $R
bench vgg-bf16-all-nhwc-image-pad 40 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=pad -- $V $R
bench dieleman-bf16-breakdown 40 -- $D --steps 10 --warmup 3 --profile-steps 5
breakdown dieleman-bf16-breakdown
bench vgg-bf16-inference-nhwc 30 $ALL $NHWC -- $V $R --inference
bench vgg-bf16-by-layers 40 $ALL GZ_TOWER_OP=0 -- $V $R
bench vgg-bf16-generic-optimizer 40 $ALL -- $V $R --optimizer-path generic
bench vgg-bf16-no-fused-epilogue 40 $ALL GZ_FUSED=0 -- $V $R
bench vgg-bf16-cuda-defaults 40 $ALL GZ_CUDA_DEFAULTS=1 -- $V $R
bench vgg-f32-128-default 40 -- --model vgg16-blog --batch 128 --precision f32 $R
bench dieleman-bf16-all-nhwc-image 40 $ALL GZ_NHWC=1 GZ_NHWC_IMAGE=1 -- $D $R
bench dieleman-bf16-scalar-epilogue 40 GZ_NHWC_VEC=0 -- $D $R
bench dieleman-bf16-by-layers 40 $ALL GZ_TOWER_OP=0 -- $D $R
bench vgg-bf16-optimizer-one-launch-per-tensor 40 $ALL GZ_OPTIM_TENSORS=1 -- $V $R
bench vgg-bf16-unfused-pool 40 $ALL GZ_TOWER_OP=0 GZ_FUSED_POOL=0 -- $V $R
bench vgg-bf16-two-op-epilogue 40 $ALL GZ_TOWER_OP=0 GZ_CONV_RELU_OP=0 -- $V $R
bench vgg-bf16-all-nhwc-candle-layout 40 $ALL $NHWC GZ_LAYOUT_KERNEL=0 -- $V $R
pack
# the decisions in one table: each A/B pair as a ratio, and gz against the PyTorch peer
if [ -f "$HERE/scripts/device-compare.sh" ]; then
  bash "$HERE/scripts/device-compare.sh" "$SUM" "$S/torch_peer.jsonl" > "$S/compare.txt" 2>&1
  cat "$S/compare.txt" >> "$SUM"; cat "$S/compare.txt"
fi
# kernel time by kind of work, gz's traces against PyTorch's (eager and torch.compile)
if [ -f "$HERE/scripts/trace_compare.py" ]; then
  PY=/opt/torch/.venv/bin/python; [ -x "$PY" ] || PY=python3
  "$PY" "$HERE/scripts/trace_compare.py" "$S" "$S/torch_trace.jsonl" > "$S/trace_compare.txt" 2>&1
  cat "$S/trace_compare.txt" >> "$SUM"; cat "$S/trace_compare.txt"
fi
say "done"
pack
