#!/usr/bin/env bash
# run.sh — run the bundled CUDA build of `gz` on a GPU machine (written by `cargo xtask build --cuda`).
#
#   ./run.sh <gz arguments>     e.g. ./run.sh train --cache ... --device cuda
#   ./run.sh --check            only find the libraries and show the GPU
#
# Finds the CUDA libraries the binary was linked against, sets LD_LIBRARY_PATH, prints (to
# stderr) which library came from where and the GPU name, unpacks gz.gz on first use, then runs
# gz. Library search order: GZ_LIB_PATH (colon-separated; replaces everything below when set),
# else LD_LIBRARY_PATH, the usual CUDA and driver folders, Python wheels (nvidia/cu13/lib) and
# `ldconfig -p`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Libraries the binary needs (its DT_NEEDED entries, filled in at bundle time), and libraries
# it may load at run time (their folders are added when found; a missing one is only noted).
REQUIRED_LIBS="@REQUIRED_LIBS@"
OPTIONAL_LIBS="@OPTIONAL_LIBS@"

declare -a DIRS=()
if [ -n "${GZ_LIB_PATH:-}" ]; then
  IFS=: read -r -a DIRS <<< "$GZ_LIB_PATH"
else
  if [ -n "${LD_LIBRARY_PATH:-}" ]; then IFS=: read -r -a DIRS <<< "$LD_LIBRARY_PATH"; fi
  DIRS+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
         /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
         /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu /usr/lib/wsl/lib)
  for d in /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib \
           /usr/lib/python3/dist-packages/nvidia/cu13/lib; do
    [ -d "$d" ] && DIRS+=("$d")
  done
fi

find_lib() { # $1 = soname; prints the folder holding it
  local d
  for d in "${DIRS[@]}"; do
    [ -n "$d" ] && [ -e "$d/$1" ] && { echo "$d"; return 0; }
  done
  if [ -z "${GZ_LIB_PATH:-}" ] && command -v ldconfig >/dev/null 2>&1; then
    local p
    p=$(ldconfig -p 2>/dev/null | awk -v n="$1" '$1 == n { print $NF; exit }')
    [ -n "$p" ] && [ -e "$p" ] && { dirname "$p"; return 0; }
  fi
  return 1
}

LIBPATH=""
MISSING=""
echo "run.sh: CUDA libraries:" >&2
for lib in $REQUIRED_LIBS; do
  if dir=$(find_lib "$lib"); then
    printf '  %-22s <- %s\n' "$lib" "$dir/$lib" >&2
    case ":$LIBPATH:" in *":$dir:"*) ;; *) LIBPATH="${LIBPATH:+$LIBPATH:}$dir" ;; esac
  else
    printf '  %-22s <- NOT FOUND\n' "$lib" >&2
    MISSING="$MISSING $lib"
  fi
done
for lib in $OPTIONAL_LIBS; do
  case " $REQUIRED_LIBS " in *" $lib "*) continue ;; esac
  if dir=$(find_lib "$lib"); then
    printf '  %-22s <- %s (optional)\n' "$lib" "$dir/$lib" >&2
    case ":$LIBPATH:" in *":$dir:"*) ;; *) LIBPATH="${LIBPATH:+$LIBPATH:}$dir" ;; esac
  else
    printf '  %-22s <- not found (optional)\n' "$lib" >&2
  fi
done
if [ -n "$MISSING" ]; then
  echo "run.sh: error: missing CUDA libraries:$MISSING" >&2
  echo "run.sh: searched: ${DIRS[*]}${GZ_LIB_PATH:+ (GZ_LIB_PATH)}" >&2
  echo "run.sh: install them (driver: libcuda.so.1; toolkit or the nvidia-* cu13 wheels) or point GZ_LIB_PATH at their folders" >&2
  exit 127
fi
export LD_LIBRARY_PATH="$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if command -v nvidia-smi >/dev/null 2>&1; then
  echo "run.sh: GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo '?')" >&2
else
  echo "run.sh: GPU: nvidia-smi not found" >&2
fi

BIN="$HERE/gz"
if [ -f "$HERE/gz.gz" ] && { [ ! -x "$BIN" ] || [ "$HERE/gz.gz" -nt "$BIN" ]; }; then
  if [ ! -w "$HERE" ]; then
    BIN="${TMPDIR:-/tmp}/gz-bundle-$(id -u)/gz"
    mkdir -p "$(dirname "$BIN")"
  fi
  if [ ! -x "$BIN" ] || [ "$HERE/gz.gz" -nt "$BIN" ]; then
    gzip -dc "$HERE/gz.gz" > "$BIN.partial.$$" && chmod +x "$BIN.partial.$$" && mv -f "$BIN.partial.$$" "$BIN"
  fi
fi
if [ ! -x "$BIN" ]; then
  echo "run.sh: error: no gz binary in $HERE (expected gz or gz.gz)" >&2
  exit 126
fi
if [ "${1:-}" = "--check" ]; then
  echo "run.sh: ok ($BIN)" >&2
  exit 0
fi
exec "$BIN" "$@"
