"""Side-by-side kernel time by kind of work: gz's traced bench rows against PyTorch's trace.

Reads the `by kind:` block of each `gz bench-train --trace-kernels` log (bench-<row>.log in the
logs folder) and the `by_kind` of scripts/torch_trace.py's JSON lines, and prints, per model,
ms per step for each kind (kernel_kinds.txt's order and rules on both sides), plus the step's
GPU busy time and span. Run by scripts/device-speed.sh at the end:

    python scripts/trace_compare.py LOGS_DIR TORCH_TRACE_JSONL
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS = {
    "vgg": ["vgg-bf16-trace", "vgg-bf16-all-new-trace"],
    "dieleman": ["dieleman-bf16-trace", "dieleman-bf16-all-new-trace"],
}
KIND_LINE = re.compile(r"^\s+([0-9.]+) ms/step\s+([0-9.]+)/step\s+(.+?)\s*$")
BUSY = re.compile(r"busy ([0-9.]+) of ([0-9.]+) ms/step")


def gz_kinds(path):
    """{kind: ms/step} and (busy, span) from a gz trace log; None when it has no trace."""
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return None
    kinds, busy, inside = {}, None, False
    for line in lines:
        m = BUSY.search(line)
        if m:
            busy = (float(m.group(1)), float(m.group(2)))
        if line.strip() == "by kind:":
            inside = True
            continue
        if line.strip() == "by name:":
            inside = False
        if inside:
            m = KIND_LINE.match(line)
            if m:
                kinds[m.group(3)] = float(m.group(1))
    return (kinds, busy) if kinds else None


def torch_kinds(path):
    out = {}
    try:
        for line in open(path, encoding="utf-8", errors="replace"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "by_kind" in r:
                out[r["model"]] = (r["by_kind"], (r.get("busy_ms_per_step"), r.get("span_ms_per_step")))
    except OSError:
        pass
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: trace_compare.py LOGS_DIR TORCH_TRACE_JSONL")
    logs, torch_path = sys.argv[1], sys.argv[2]
    from kernel_kinds import load_kinds  # the same rule file as gz's

    order, _ = load_kinds()
    peers = torch_kinds(torch_path)
    for model, rows in ROWS.items():
        cols = []
        for row in rows:
            k = gz_kinds(os.path.join(logs, f"bench-{row}.log"))
            if k:
                cols.append((row.replace(f"{model}-bf16-", "gz ").replace("-trace", "").replace("gz trace", "gz default"), k))
        for name in (f"{model}-eager", f"{model}-compile"):
            if name in peers:
                cols.append((name.replace(f"{model}-", "torch "), peers[name]))
        if not cols:
            print(f"== {model}: no traces")
            continue
        print(f"== {model} bf16 b256, kernel ms/step by kind ==")
        w = max(len(k) for k in order) + 2
        print("".ljust(w) + "".join(c[0].rjust(16) for c in cols))
        for kind in order:
            vals = [c[1][0].get(kind) for c in cols]
            if all(v is None for v in vals):
                continue
            print(kind.ljust(w) + "".join(("-" if v is None else f"{v:.3f}").rjust(16) for v in vals))
        total = ["%.3f" % sum(c[1][0].values()) for c in cols]
        print("kernels, all".ljust(w) + "".join(t.rjust(16) for t in total))
        busy = [c[1][1] for c in cols]
        print("GPU busy / span".ljust(w) + "".join(
            ("-" if not b or b[0] is None else f"{b[0]:.2f}/{b[1]:.2f}").rjust(16) for b in busy))


if __name__ == "__main__":
    main()
