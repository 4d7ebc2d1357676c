"""CPU peer: PyTorch f32 training and inference throughput on the CPU for the same nets as the GPU
peer (`../shared/bench/torch_peer.py`, whose model definitions this imports), to measure gz's CPU
path side by side: same architectures, batch, RMSprop, MSE loss, f32, PyTorch's default threads.

    python3 scripts/torch_cpu_peer.py [--peer ../shared/bench/torch_peer.py] [--threads N]
                                      [--batch 8] [--models vgg,dieleman]

Compare with (same machine, same session):

    gz bench-train --model vgg16-blog --batch 8 --steps 3 --warmup 1 --profile-steps 0
    gz bench-train --model dieleman --batch 8 --steps 4 --warmup 1 --profile-steps 0

Differences that favour the peer: its Dieleman net takes the 16 cut-out 45x45 parts as input,
while gz's cuts them from the 106x106 images inside the step; gz's `vgg16-blog` and the peer's
`vgg` are the same layers. Prints one JSON line per configuration.
"""
import argparse
import importlib.util
import json
import time

import torch
import torch.nn.functional as F


def load_peer(path):
    spec = importlib.util.spec_from_file_location("torch_peer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the models; its benchmarks run only under __main__
    return mod


def bench(name, model_fn, in_shape, per_img, batch, steps, warmup):
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
    x = torch.rand((batch * per_img,) + in_shape)
    y = torch.rand(batch, 37)

    def step():
        out = model(x)
        loss = F.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    model.eval()
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        di = (time.perf_counter() - t) / steps
    r = dict(model=name, batch=batch, dtype="fp32", device="cpu", threads=torch.get_num_threads(),
             train_img_s=round(batch / dt, 2), train_step_ms=round(dt * 1e3, 1),
             infer_img_s=round(batch / di, 2), infer_step_ms=round(di * 1e3, 1))
    print(json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default="../shared/bench/torch_peer.py")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--batch", type=int, default=8, help="images (galaxies) per step")
    ap.add_argument("--models", default="vgg,dieleman", help="comma-separated: vgg, dieleman")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    peer = load_peer(a.peer)
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads())), flush=True)
    models = a.models.split(",")
    if "vgg" in models:
        bench("vgg", peer.vgg, (3, 106, 106), 1, a.batch, steps=3, warmup=1)
    if "dieleman" in models:
        bench("dieleman", peer.Dieleman, (3, 45, 45), 16, a.batch, steps=4, warmup=1)
