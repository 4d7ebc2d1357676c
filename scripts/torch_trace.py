"""Kernel-by-kernel trace of the PyTorch peer's training step (eager and torch.compile), for the
issue-7 comparison with `gz bench-train --pipelined --trace-kernels`.

Runs the models and step of torch_peer.py (copied beside this file from
../shared/bench/torch_peer.py: bf16 autocast, channels_last, RMSprop, batch 256) under
torch.profiler for a few steps and prints one JSON line per configuration: per step, the GPU's
busy time (the union of kernel intervals; copies and fills are left out), the span, the kernels' total, launches, and the
longest kernels by total time. These are the numbers gz's trace prints, so the two tables can be
set side by side: which kernels torch.compile fuses, how long its epilogues take, and how much of
its step the GPU sits idle.

Usage (device): python scripts/torch_trace.py [--steps 10] [--only vgg|dieleman] [--no-compile]
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import torch_peer as tp  # noqa: E402
from kernel_kinds import category, load_kinds  # noqa: E402

TOP = 30


def union_us(intervals):
    total, cur = 0.0, None
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if cur and a <= cur[1]:
            cur = (cur[0], max(cur[1], b))
        else:
            if cur:
                total += cur[1] - cur[0]
            cur = (a, b)
    return total + (cur[1] - cur[0] if cur else 0.0)


def trace(name, model_fn, in_shape, per_img, batch, compile_, steps):
    torch.manual_seed(0)
    model = model_fn().to("cuda").to(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    x = torch.rand((batch * per_img,) + in_shape, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch, 37, device="cuda")
    m = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
            loss = F.mse_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    def profiled(activities):
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        # copies and fills are device events too; gz's table keeps them apart from kernels
        kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset"))]
        return wall, kernels, len(events) - len(kernels)

    activities = "cuda"
    wall_s, kernels, transfers = profiled([ProfilerActivity.CUDA])
    if not kernels:  # some versions record device events only with the CPU activity on too
        activities = "cpu+cuda"
        wall_s, kernels, transfers = profiled([ProfilerActivity.CPU, ProfilerActivity.CUDA])
    iv = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_name = {}
    for e in kernels:
        c, tot = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (c + 1, tot + (e.time_range.end - e.time_range.start))
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    order, rules = load_kinds()
    kinds = {}
    for n, (c, tot) in by_name.items():
        k = category(n, rules)
        kc, kt = kinds.get(k, (0, 0.0))
        kinds[k] = (kc + c, kt + tot)
    span = (max(b for _, b in iv) - min(a for a, _ in iv)) if iv else 0.0
    per = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    r = dict(
        model=name + ("-compile" if compile_ else "-eager"),
        batch=batch,
        steps=steps,
        warmup_s=round(warm_s, 1),
        wall_ms_per_step=round(wall_s * 1e3 / steps, 3),
        busy_ms_per_step=per(union_us(iv)),
        span_ms_per_step=per(span),
        kernel_ms_per_step=per(sum(b - a for a, b in iv)),
        launches_per_step=round(len(kernels) / steps, 1),
        copies_and_fills_per_step=round(transfers / steps, 1),
        activities=activities,
        by_kind={k: per(kinds[k][1]) for k in order if k in kinds},
        top=[[n[:120], per(tot), round(c / steps, 1)] for n, (c, tot) in rows[:TOP]],
        rest_ms_per_step=per(sum(tot for _, (_, tot) in rows[TOP:])),
    )
    print(json.dumps(r), flush=True)
    return r


def main():
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 10
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    compiles = [False] if "--no-compile" in sys.argv else [False, True]
    configs = [("vgg", tp.vgg, (3, 106, 106), 1, 256), ("dieleman", tp.Dieleman, (3, 45, 45), 16, 256)]
    torch.backends.cudnn.benchmark = True
    print(json.dumps(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))), flush=True)
    for c in configs:
        if only and c[0] != only:
            continue
        for comp in compiles:
            try:
                trace(*c, comp, steps)
            except Exception as e:  # one failed configuration does not lose the others
                print(json.dumps(dict(model=c[0] + ("-compile" if comp else "-eager"), error=repr(e)[:300])), flush=True)


if __name__ == "__main__":
    main()
