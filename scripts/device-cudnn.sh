#!/usr/bin/env bash
# Device check for the cuDNN fast path (issue 7), run ONCE on the H200 machine.
#
# Prepared here (no GPU) by scripts/device-cudnn.sh --prepare, which builds and gzips into
# target/device-cudnn/:
#   gz-model-tests.gz  the gz-model unit-test binary (release, --features cuda,cudnn)
#   gz.gz              the gz CLI (release, --features cudnn), if it builds
# The device run carries that folder:  carry: ["target/device-cudnn"]
#   command: bash scripts/device-cudnn.sh
# and writes everything to $OUT (tests.log, bench-*.log, torch.jsonl, summary.txt).
# Budget: under 5 minutes; every step has its own timeout and the script always goes on.
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PKG="$HERE/target/device-cudnn"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  export CUDA_ROOT="$HERE/target/cuda-toolkit/cuda" CUDA_HOME="$HERE/target/cuda-toolkit/cuda" \
         CUDA_PATH="$HERE/target/cuda-toolkit/cuda" PATH="$HERE/target/cuda-toolkit/cuda/bin:$PATH" \
         CUDA_COMPUTE_CAP=90 CARGO_TARGET_DIR="$HERE/target/cuda"
  mkdir -p "$PKG" "$CARGO_TARGET_DIR"
  cd "$HERE"
  # one cargo invocation for both binaries: features unify into one graph, so candle's CUDA
  # kernels compile once (two invocations built them twice: their build dependencies differed)
  json=$(cargo build --release -p gz-model -p gz-cli --features gz-cli/cudnn,gz-model/cudnn,gz-cli/cupti --lib --tests --bins \
        --message-format=json 2> "$CARGO_TARGET_DIR/device-build.log") || { tail -30 "$CARGO_TARGET_DIR/device-build.log"; echo "the CUDA build failed"; exit 1; }
  exe=$(printf '%s\n' "$json" | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gz_model" and m["profile"]["test"]: print(m["executable"])' | tail -1)
  [ -n "$exe" ] || { echo "could not find the gz-model test binary"; exit 1; }
  strip -o "$PKG/gz-model-tests" "$exe" && gzip -9f "$PKG/gz-model-tests"
  strip -o "$PKG/gz" "$CARGO_TARGET_DIR/release/gz" && gzip -9f "$PKG/gz"
  # CUPTI for `gz bench-train --trace-kernels` (the `cupti` feature loads libcupti.so.13 at
  # run time): from NVIDIA's wheel of the toolkit's CUDA version, carried in the bundle (the
  # device's torch venv may have its own; ours is the one the bindings were made for)
  CUPTI="$HERE/target/cuda-toolkit/cupti"
  if [ ! -s "$CUPTI/libcupti.so.13" ]; then
    mkdir -p "$CUPTI"
    if "$HERE/target/cuda-toolkit/venv/bin/pip" download -q --no-deps "nvidia-cuda-cupti==13.0.85" -d "$CUPTI"; then
      python3 -c 'import glob, sys, zipfile
d = sys.argv[1]
z = zipfile.ZipFile(glob.glob(d + "/nvidia_cuda_cupti-*.whl")[0])
open(d + "/libcupti.so.13.tmp", "wb").write(z.read("nvidia/cu13/lib/libcupti.so.13"))' "$CUPTI" \
        && mv "$CUPTI/libcupti.so.13.tmp" "$CUPTI/libcupti.so.13"
    fi
  fi
  if [ -s "$CUPTI/libcupti.so.13" ]; then
    gzip -9c "$CUPTI/libcupti.so.13" > "$PKG/libcupti.so.13.gz"
  else
    echo "warning: no libcupti.so.13 (the nvidia-cuda-cupti wheel did not download): --trace-kernels will look for the device's own"
  fi
  # which source the bundle is: a later session compares it with HEAD before spending device
  # time on a stale bundle (`--check`), and the device run prints it
  { git rev-parse HEAD; git status --porcelain --untracked-files=no | sed 's/^/dirty: /'; } > "$PKG/built-from.txt"
  ls -la "$PKG"
  exit 0
fi

if [ "${1:-}" = "--check" ]; then
  # Is target/device-cudnn built from the current source? (no build; exit 0 = yes)
  [ -f "$PKG/built-from.txt" ] || { echo "no bundle stamp in $PKG: run --prepare"; exit 1; }
  built=$(head -1 "$PKG/built-from.txt")
  cd "$HERE"
  if grep -q '^dirty: ' "$PKG/built-from.txt"; then echo "bundle built from uncommitted changes on $built: run --prepare"; exit 1; fi
  changed=$(git diff --name-only "$built" HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null) || { echo "bundle commit $built unknown here: run --prepare"; exit 1; }
  changed="$changed$(git status --porcelain --untracked-files=no -- crates Cargo.toml Cargo.lock)"
  if [ -n "$changed" ]; then echo "bundle built from $built; since then changed:"; echo "$changed" | head -20; echo "run --prepare"; exit 1; fi
  echo "bundle is current (built from $built; no crate changed since)"
  exit 0
fi

OUT="${OUT:-/tmp/gz-device-out}"
mkdir -p "$OUT"
SUM="$OUT/summary.txt"
: > "$SUM"
say() { echo "$*" | tee -a "$SUM"; }

export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
# Keep the driver's JIT of candle's PTX between processes (the first CUDA step costs ~15 s).
export CUDA_CACHE_MAXSIZE=4294967296
export RUST_BACKTRACE=0
BIN=/tmp/gz-device-bin
mkdir -p "$BIN"
for f in gz-model-tests gz; do
  if [ -f "$PKG/$f.gz" ]; then gunzip -c "$PKG/$f.gz" > "$BIN/$f" && chmod +x "$BIN/$f"; fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUM"
T0=$(date +%s)

# 1. Correctness: the cuDNN ops against candle's reference convolution, every model layer shape,
#    outputs and both gradients, f32 strict / TF32 / bf16 / f16, max-pool, 100-step training.
if [ -x "$BIN/gz-model-tests" ]; then
  GZ_REQUIRE_CUDA=1 timeout 150 "$BIN/gz-model-tests" cudnn:: --test-threads=4 > "$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^test |test result" "$OUT/tests.log" | tee -a "$SUM"
  if [ $rc -eq 0 ]; then say "CUDNN TESTS: PASS"; else say "CUDNN TESTS: FAIL (rc=$rc, see tests.log)"; tail -30 "$OUT/tests.log"; fi
  # 2. Conv-tower benchmark (conv + ReLU + pool, forward + backward), cuDNN vs candle kernels.
  timeout 120 "$BIN/gz-model-tests" cudnn::tests::bench_conv_towers --ignored --nocapture > "$OUT/bench-towers.log" 2>&1
  say "tower bench rc=$?"
  grep -E "^BENCH" "$OUT/bench-towers.log" | tee -a "$SUM"
else
  say "CUDNN TESTS: MISSING (no $PKG/gz-model-tests.gz)"
fi
say "elapsed $(( $(date +%s) - T0 )) s"

# 3. Whole training step through the CLI, cuDNN fast path vs candle's kernels (GZ_CONV=candle).
if [ -x "$BIN/gz" ]; then
  for cfg in "vgg16-blog 256 bf16" "vgg16-blog 128 f32" "dieleman 256 bf16"; do
    set -- $cfg
    for conv in cudnn candle; do
      steps=30; [ "$conv" = candle ] && steps=3
      log="$OUT/bench-train-$1-$3-$2-$conv.log"
      timeout 60 "$BIN/gz" bench-train --model "$1" --batch "$2" --precision "$3" --steps "$steps" --device cuda --conv "$conv" > "$log" 2>&1
      say "bench-train $1 batch=$2 $3 conv=$conv rc=$?"
      grep -vE "plan: (Fwd|BwdData|BwdFilter)" "$log" | tail -16 | tee -a "$SUM"
    done
  done
else
  say "gz binary missing: skipped bench-train"
fi
say "elapsed $(( $(date +%s) - T0 )) s"

# 4. The PyTorch peer, same machine, same session.
PEER=""
for p in "$HERE/shared/bench/torch_peer.py" "$HERE/../shared/bench/torch_peer.py" "$HERE/scripts/torch_peer.py" /work/shared/bench/torch_peer.py; do
  [ -f "$p" ] && { PEER="$p"; break; }
done
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
if [ -n "$PEER" ]; then
  timeout 150 env -u LD_LIBRARY_PATH "$PY" "$PEER" > "$OUT/torch.jsonl" 2> "$OUT/torch.err"
  say "torch_peer rc=$?"; cat "$OUT/torch.jsonl" | tee -a "$SUM"
else
  say "torch_peer.py not found (copy ../shared/bench/torch_peer.py to scripts/ before the run)"
fi
say "total elapsed $(( $(date +%s) - T0 )) s"
