#!/usr/bin/env bash
# Side-by-side preprocessing benchmark, one thread each, for docs/benchmarks.md ("## Preprocessing").
# Usage: crates/gz-preprocess/bench/run.sh [DIR] [ROUNDS] [SIZE]   (run from the repository root)
# Needs python3 with pillow + numpy for the peer. Interleaves the runs so both see the same load.
set -euo pipefail
DIR=${1:-../shared/fixtures/real-test-jpegs}
ROUNDS=${2:-3}
SIZE=${3:-106}
cargo build --release -q -p gz-preprocess --example bench
BIN=${CARGO_TARGET_DIR:-target}/release/examples/bench
nproc; uptime
for _ in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=1 "$BIN" "$DIR" 5 "$SIZE"
  if [ "$SIZE" = 106 ]; then python3 ../shared/bench/pil_prep.py "$DIR" 1 2>/dev/null; fi
  python3 crates/gz-preprocess/bench/pil_cpu.py ../shared/bench/pil_prep.py "$DIR" 5 "$SIZE" 2>/dev/null
done
uptime
