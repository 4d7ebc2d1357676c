#!/usr/bin/env bash
# device-full-scale.sh — the whole gz pipeline at Kaggle scale on the GPU machine, from the bundle.
#
# Run from the bundle folder written by `cargo xtask build --cuda` (gz.gz, run.sh, bench/):
#     OUT=/somewhere bash device-full-scale.sh
# Everything that should come back (timings, logs, metrics, GPU memory samples, summary) goes to
# $OUT; the big artifacts (images, shard cache, checkpoints) go to $WORK. Every size, epoch count
# and timeout is a variable, so the whole run can be fitted to the time available (the defaults
# aim at about 9 minutes on an H200 with 16 cores). A failing or timed-out stage is recorded and
# the script goes on with the next one; stages that need its output then fail quickly.
#
# CPU smoke test (no GPU, tiny sizes), from the repository:
#     DEVICE=cpu GZ=target/debug/gz N_TRAIN=60 N_TEST=30 MODEL=tiny EPOCHS=1 MAX_TRAIN= PEER=0 \
#         OUT=/tmp/out WORK=/tmp/work bash scripts/device-full-scale.sh
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

OUT=${OUT:-$HERE/out}
WORK=${WORK:-${TMPDIR:-/tmp}/gz-full-scale}
DEVICE=${DEVICE:-cuda}
GZ=${GZ:-$HERE/run.sh}                    # the gz to run: the bundle's run.sh, or a gz binary
PY=${PY:-/opt/torch/.venv/bin/python}     # Python with PyTorch, for the peer benchmark
PEER=${PEER:-1}                           # 0: skip the PyTorch peer benchmark
PEER_ARGS=${PEER_ARGS:-}                  # e.g. --quick, --compile
THREADS=${THREADS:-$(nproc 2>/dev/null || echo 4)}

N_TRAIN=${N_TRAIN:-61578}                 # the Kaggle training set size
N_TEST=${N_TEST:-79975}                   # the Kaggle test set size
SEED=${SEED:-2014}
MODEL=${MODEL:-vgg16-blog}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-128}
PRECISION=${PRECISION:-f32}               # precision of the full training run
BENCH_STEPS=${BENCH_STEPS:-30}            # timed steps per `gz bench-train` measurement
BENCH_WARMUP=${BENCH_WARMUP:-3}           # untimed steps before them (the first pays the PTX compile)
MAX_TRAIN=${MAX_TRAIN-40000}             # train+validation on a seeded subset (`--max-train`); empty: all
EVAL_BATCH=${EVAL_BATCH:-256}             # images per forward pass in eval and predict
DEADLINE=${DEADLINE:-540}                 # seconds for the whole script: stage timeouts shrink to fit
BENCH_PRECISIONS=${BENCH_PRECISIONS:-f32 bf16}
BENCH_CONVS=${BENCH_CONVS:-auto candle}   # `gz bench-train --conv`: auto = cuDNN when built with it
TRAIN_ARGS=${TRAIN_ARGS:-}                # extra `gz train` arguments
TTA=${TTA:-}                              # e.g. 4: test-time augmentation views for predict

T_SYNTH=${T_SYNTH:-300}                   # per-stage timeouts, seconds
T_PREP=${T_PREP:-90}
T_TRAIN=${T_TRAIN:-240}
T_BENCH=${T_BENCH:-60}
T_PEER=${T_PEER:-150}
T_EVAL=${T_EVAL:-60}
T_PREDICT=${T_PREDICT:-120}
T_SUBMIT=${T_SUBMIT:-60}

mkdir -p "$OUT/logs" "$WORK"
DATA=$WORK/data
CACHE_ROOT=$WORK/cache
RUN=$WORK/runs/$MODEL
PRED=$WORK/test_predictions.csv
SUB=$WORK/submission.csv
STAGES=$OUT/stages.tsv
T0=$(date +%s.%N)
printf 'stage\tstatus\tseconds\tcommand\n' > "$STAGES"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/device.log" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# stage NAME TIMEOUT_S command... : runs it with a timeout (shortened to what is left of
# DEADLINE), logs to $OUT/logs/NAME.log, records status and seconds in stages.tsv; returns the
# command's status. Skipped when less than 10 s are left.
stage() {
  local name=$1 limit=$2; shift 2
  local t; t=$(date +%s.%N)
  local left; left=$(awk -v d="$DEADLINE" -v a="$T0" -v b="$t" 'BEGIN { printf "%d", d - (b - a) }')
  if [ "$left" -lt 10 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped(deadline)" 0 "$*" >> "$STAGES"
    log "stage $name: skipped, the deadline (${DEADLINE}s) is reached"
    return 125
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  log "stage $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local s; s=$(elapsed "$t")
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"; elif [ $rc -ne 0 ]; then status="failed($rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$s" "$*" >> "$STAGES"
  log "stage $name: $status in ${s}s"
  [ "$status" = ok ] || tail -5 "$OUT/logs/$name.log" | sed 's/^/    /' >&2
  return $rc
}

gz() { "$GZ" "$@"; }

# --- the machine ---------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "cores: $THREADS"
  echo "memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  echo "settings: DEVICE=$DEVICE N_TRAIN=$N_TRAIN N_TEST=$N_TEST MODEL=$MODEL EPOCHS=$EPOCHS BATCH=$BATCH PRECISION=$PRECISION BENCH_STEPS=$BENCH_STEPS SEED=$SEED"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ -f "$HERE/BUNDLE.txt" ] && cat "$HERE/BUNDLE.txt"
} > "$OUT/machine.txt" 2>&1
if [ "$GZ" = "$HERE/run.sh" ]; then
  stage libs 60 "$GZ" --check
fi

# GPU memory sampled every second in the background
SMI_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -lms 1000 > "$OUT/gpu_mem.csv" 2>/dev/null &
  SMI_PID=$!
fi

# --- phase A: synth (CPU, all cores, niced) alongside the GPU benchmarks ------------------------
stage synth "$T_SYNTH" nice -n 10 "$GZ" synth --out "$DATA" --train "$N_TRAIN" --test "$N_TEST" --seed "$SEED" &
SYNTH_PID=$!

if [ "$DEVICE" != cpu ]; then
  if [ "$PEER" = 1 ] && [ -x "$PY" ] && [ -f "$HERE/bench/torch_peer.py" ]; then
    # shellcheck disable=SC2086
    stage torch_peer "$T_PEER" "$PY" "$HERE/bench/torch_peer.py" $PEER_ARGS
    grep '^{' "$OUT/logs/torch_peer.log" > "$OUT/torch_peer.jsonl" 2>/dev/null
  else
    log "torch_peer skipped (PEER=$PEER, python $PY, script $HERE/bench/torch_peer.py)"
  fi
fi
for p in $BENCH_PRECISIONS; do
  for c in $BENCH_CONVS; do
    if [ "$DEVICE" = cpu ] && { [ "$p" != f32 ] || [ "$c" != auto ]; }; then continue; fi
    stage "bench_train_${p}_$c" "$T_BENCH" "$GZ" bench-train --model "$MODEL" --device "$DEVICE" --batch "$BATCH" \
      --precision "$p" --conv "$c" --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP"
  done
done
wait "$SYNTH_PID"

# --- phase B: the pipeline ------------------------------------------------------------------
stage prep "$T_PREP" "$GZ" prep --data "$DATA" --cache "$CACHE_ROOT" --threads "$THREADS"
CACHE=$(sed -n 's/^cache: //p' "$OUT/logs/prep.log" | tail -1)
[ -n "$CACHE" ] || CACHE=$CACHE_ROOT/missing
log "cache: $CACHE ($(du -sh "$CACHE" 2>/dev/null | cut -f1))"

# shellcheck disable=SC2086
stage train "$T_TRAIN" "$GZ" train --cache "$CACHE" --model "$MODEL" --epochs "$EPOCHS" --device "$DEVICE" \
  --batch "$BATCH" --precision "$PRECISION" --out "$RUN" ${MAX_TRAIN:+--max-train "$MAX_TRAIN"} $TRAIN_ARGS
for f in metrics.jsonl best.json last.json config.json; do cp "$RUN/$f" "$OUT/train_$f" 2>/dev/null; done

stage eval "$T_EVAL" "$GZ" eval --run "$RUN" --cache "$CACHE" --data "$DATA" --device "$DEVICE" --batch "$EVAL_BATCH" \
  --report "$WORK/report"
REPORT=$WORK/report
if [ -d "$REPORT" ]; then
  mkdir -p "$OUT/report" && find "$REPORT" -maxdepth 1 -type f -size -3M -exec cp {} "$OUT/report/" \;
fi

stage predict "$T_PREDICT" "$GZ" predict --run "$RUN" --cache "$CACHE" --device "$DEVICE" --batch "$EVAL_BATCH" \
  ${TTA:+--tta "$TTA"} --out "$PRED"
stage submit "$T_SUBMIT" "$GZ" submit --pred "$PRED" --ids "$DATA/images_test_rev1" --out "$SUB"
stage submit_check 60 "$GZ" submit --check "$SUB" --ids "$DATA/images_test_rev1"
if [ -f "$SUB" ]; then
  {
    echo "rows (without header): $(($(wc -l < "$SUB") - 1))"
    echo "bytes: $(wc -c < "$SUB")"
    echo "sha256: $(sha256sum "$SUB" | cut -d' ' -f1)"
    head -3 "$SUB"
  } > "$OUT/submission_summary.txt"
fi

# --- wrap up ---------------------------------------------------------------------------------
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
{
  echo "# gz full-scale device run"
  echo
  echo '```'; cat "$OUT/machine.txt"; echo '```'
  echo
  echo "## Stages"
  echo
  echo '```'; column -t -s "$(printf '\t')" "$STAGES" 2>/dev/null | cut -c1-160 || cat "$STAGES"; echo '```'
  echo
  echo "total: $(elapsed "$T0") s"
  if [ -f "$OUT/gpu_mem.csv" ]; then
    echo "GPU memory used, peak: $(awk -F', ' 'NR > 1 { v = $2 + 0; if (v > m) m = v } END { print m " MiB" }' "$OUT/gpu_mem.csv")"
  fi
  echo
  echo "## Training throughput (gz bench-train)"
  for f in "$OUT"/logs/bench_train_*.log; do
    [ -f "$f" ] && { echo "### $(basename "$f" .log)"; echo '```'; tail -15 "$f"; echo '```'; }
  done
  echo
  echo "## Training run (last epoch lines)"
  echo '```'; tail -5 "$OUT/train_metrics.jsonl" 2>/dev/null; echo '```'
  echo
  echo "## Evaluation"
  echo '```'; tail -40 "$OUT/logs/eval.log" 2>/dev/null; echo '```'
  echo
  echo "## Submission"
  echo '```'; cat "$OUT/submission_summary.txt" 2>/dev/null; tail -5 "$OUT/logs/submit_check.log" 2>/dev/null; echo '```'
  echo
  echo "## PyTorch peer (torch_peer.py)"
  echo '```'; cat "$OUT/torch_peer.jsonl" 2>/dev/null; echo '```'
} > "$OUT/summary.md"
log "done in $(elapsed "$T0") s; summary: $OUT/summary.md"
cat "$OUT/summary.md"
