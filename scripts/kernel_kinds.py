"""The kinds of work GPU kernels do, for scripts/torch_trace.py and scripts/trace_compare.py:
the rules of crates/gz-model/src/kernel_kinds.txt, which gz's own trace
(gz_model::kernel_trace::category) reads too, so both traces are sorted alike."""
import os

KINDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "gz-model", "src", "kernel_kinds.txt")


def load_kinds(path=KINDS_FILE):
    """The kind rules gz's trace uses (kernel_kinds.txt): (table order, [(kind, prefix?, keys)])."""
    order, rules = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, how, keys = (p.strip() for p in line.split("|", 2))
            keys = [k.strip() for k in keys.split(",") if k.strip()]
            if kind == "order":
                order = keys
            else:
                rules.append((kind, how == "prefix", keys))
    return order, rules


def category(name, rules):
    """The first matching rule's kind for a kernel name (as gz_model::kernel_trace::category)."""
    n = name.lower()
    for kind, prefix, keys in rules:
        if any(n.startswith(k) if prefix else k in n for k in keys):
            return kind
    return "other"


