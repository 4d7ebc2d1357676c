#!/usr/bin/env bash
# device-compare.sh SUMMARY [TORCH_JSONL] — the decisions of a device-speed.sh run in one table:
# each A/B pair of `bench` lines as a ratio of images/s, and gz against the PyTorch peer.
# Called at the end of scripts/device-speed.sh; runs anywhere (bash + awk), so it can be checked
# on a summary written by hand:
#   printf '[1s] bench a rc=0: 100.0 images/s (1 ms/step)\n[2s] bench b rc=0: 150.0 images/s (1 ms/step)\n' > /tmp/s
#   bash scripts/device-compare.sh /tmp/s     # -> "b / a = 1.500"
set -u
SUM=${1:?usage: device-compare.sh SUMMARY [TORCH_JSONL]}
PEER=${2:-}

# images/s of bench NAME (last successful line), empty when it did not run or failed
ips() { grep -E "bench $1 rc=0: [0-9.]+ images/s" "$SUM" | tail -1 | sed -E 's/.*rc=0: ([0-9.]+) images.*/\1/'; }

ratio() { # variant base: "variant / base = r (x vs y images/s)"
  local x y
  x=$(ips "$1"); y=$(ips "$2")
  if [ -n "$x" ] && [ -n "$y" ]; then
    awk -v v="$1" -v b="$2" -v x="$x" -v y="$y" \
      'BEGIN { printf "%-44s / %-28s = %6.3f  (%s vs %s images/s)\n", v, b, x / y, x, y }'
  else
    printf '%-44s / %-28s : missing (%s)\n' "$1" "$2" "$([ -z "$x" ] && echo "$1" || echo "$2")"
  fi
}

# PyTorch's images/s for (model, batch, dtype, compile, field) from the peer's JSON lines
peer() {
  [ -n "$PEER" ] && [ -f "$PEER" ] || return 0
  grep -E "\"model\": \"$1\"" "$PEER" | grep -E "\"batch\": $2," | grep -E "\"dtype\": \"$3\"" |
    grep -E "\"compile\": $4" | tail -1 | sed -E "s/.*\"$5\": ([0-9.]+).*/\1/" | grep -E '^[0-9.]+$'
}

vs_peer() { # bench-name model batch dtype compile field label
  local x y
  x=$(ips "$1"); y=$(peer "$2" "$3" "$4" "$5" "$6")
  if [ -n "$x" ] && [ -n "$y" ]; then
    awk -v v="$1" -v b="$7" -v x="$x" -v y="$y" \
      'BEGIN { printf "%-44s / %-28s = %6.3f  (%s vs %s images/s)\n", v, b, x / y, x, y }'
  else
    printf '%-44s / %-28s : missing\n' "$1" "$7"
  fi
}

echo "== A/B (ratio > 1: the variant is faster) =="
# (the default rows have the settings of the best rows of 2026-11-30 — VGG16-blog padded,
# Dieleman unpadded — so these two ratios are run-to-run noise: a check, not an A/B)
ratio vgg-bf16-default vgg-bf16-all-nhwc-image-pad
ratio vgg-bf16-scalar-epilogue vgg-bf16-default
ratio dieleman-bf16-default dieleman-bf16-all-nhwc-image
ratio dieleman-bf16-scalar-epilogue dieleman-bf16-default
ratio dieleman-bf16-image-gemm dieleman-bf16-default
ratio dieleman-bf16-image-gemm-fwd dieleman-bf16-default
ratio dieleman-bf16-image-gemm-fwd dieleman-bf16-image-gemm
ratio dieleman-bf16-image-gemm-cublas dieleman-bf16-image-gemm
ratio vgg-bf16-image-gemm vgg-bf16-default
ratio vgg-bf16-wide-finish vgg-bf16-default
ratio dieleman-bf16-wide-finish dieleman-bf16-default
ratio vgg-bf16-both-new vgg-bf16-default
ratio dieleman-bf16-both-new dieleman-bf16-default
ratio vgg-bf16-pool-mask vgg-bf16-default
ratio dieleman-bf16-pool-mask dieleman-bf16-default
ratio vgg-bf16-all-new vgg-bf16-default
ratio dieleman-bf16-all-new dieleman-bf16-default
ratio vgg-bf16-all-new vgg-bf16-both-new
ratio dieleman-bf16-all-new dieleman-bf16-both-new
ratio dieleman-bf16-image-gemm-inference dieleman-bf16-default-inference
ratio vgg-bf16-all-new-inference vgg-bf16-default-inference
ratio dieleman-bf16-all-new-inference dieleman-bf16-default-inference
# CUPTI's own cost: a trace row against its untraced default row (below 0.9, read the trace's
# idle time with care)
ratio vgg-bf16-trace vgg-bf16-default
ratio dieleman-bf16-trace dieleman-bf16-default
ratio vgg-bf16-all-new-trace vgg-bf16-all-new
ratio dieleman-bf16-all-new-trace dieleman-bf16-all-new
ratio vgg-bf16-all vgg-bf16-baseline
ratio vgg-bf16-all-nhwc vgg-bf16-all
ratio vgg-bf16-all-nhwc-image vgg-bf16-all-nhwc
ratio vgg-bf16-all-nhwc-image-pad vgg-bf16-all-nhwc
ratio vgg-bf16-all-nhwc-candle-layout vgg-bf16-all-nhwc
ratio dieleman-bf16-all dieleman-bf16-baseline
ratio dieleman-bf16-all-nhwc dieleman-bf16-all
ratio dieleman-bf16-all-nhwc-image dieleman-bf16-all-nhwc
ratio vgg-bf16-inference-nhwc vgg-bf16-inference
for v in vgg-bf16-no-fused-epilogue vgg-bf16-generic-optimizer vgg-bf16-optimizer-one-launch-per-tensor \
  vgg-bf16-by-layers vgg-bf16-unfused-pool vgg-bf16-two-op-epilogue vgg-bf16-cuda-defaults; do
  ratio "$v" vgg-bf16-all
done
ratio dieleman-bf16-by-layers dieleman-bf16-all
echo "== gz / PyTorch 2.11 (the issue-7 targets; > 1: gz is faster) =="
for v in vgg-bf16-default vgg-bf16-all vgg-bf16-all-nhwc vgg-bf16-all-nhwc-image vgg-bf16-all-nhwc-image-pad; do
  vs_peer "$v" vgg 256 bf16 false train_img_s "torch eager vgg b256 bf16"
  vs_peer "$v" vgg 256 bf16 true train_img_s "torch.compile vgg b256 bf16"
done
for v in dieleman-bf16-image-gemm vgg-bf16-image-gemm dieleman-bf16-both-new vgg-bf16-both-new \
  vgg-bf16-pool-mask dieleman-bf16-pool-mask vgg-bf16-all-new dieleman-bf16-all-new; do
  vs_peer "$v" "$(echo "$v" | cut -d- -f1)" 256 bf16 true train_img_s "torch.compile b256 bf16"
done
for v in dieleman-bf16-default dieleman-bf16-image-gemm dieleman-bf16-all dieleman-bf16-all-nhwc dieleman-bf16-all-nhwc-image; do
  vs_peer "$v" dieleman 256 bf16 false train_img_s "torch eager dieleman b256 bf16"
done
vs_peer vgg-bf16-default-inference vgg 256 bf16 false infer_img_s "torch eager vgg infer"
vs_peer dieleman-bf16-default-inference dieleman 256 bf16 false infer_img_s "torch eager dieleman infer"
vs_peer vgg-bf16-inference vgg 256 bf16 false infer_img_s "torch eager vgg infer"
vs_peer vgg-bf16-inference-nhwc vgg 256 bf16 false infer_img_s "torch eager vgg infer"
vs_peer dieleman-bf16-inference dieleman 256 bf16 false infer_img_s "torch eager dieleman infer"
vs_peer vgg-f32-128-default vgg 128 fp32 false train_img_s "torch eager vgg b128 f32"
