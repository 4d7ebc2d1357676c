"""Quality peer: a PyTorch CPU training run on the same Kaggle-layout dataset as `cargo xtask
pipeline` (by default its synthetic set, data/synth/), scored like gz: RMSE over the 37 outputs
on a 200-row validation hold-out of the 2,000 training rows and on the 500 labelled test rows
(test_solutions.csv). It reads the JPEGs and CSVs as a Python user would (Pillow decode, centre
crop 212 px, resize to 32 px, in a multiprocessing pool) and does not touch gz's shard cache.

    python3 scripts/torch_cpu_quality_peer.py --data DIR --recipe same|notebook [--seed S]
        [--threads N] [--procs N] [--epochs E] [--filter box|bicubic] [--holdout gz|random]
        [--submission FILE]

`--submission FILE` also writes the test predictions the recipe scores (8 views for `same`,
1 for `notebook`) as a Kaggle submission CSV; `gz eval --pred FILE --cache C --data DIR` scores
it with gz's own table, baselines, Bayes floor and report, beside gz's runs.

Prints one JSON line per run: recipe, seed, validation and test RMSE (1 view, and 8 views where
the recipe uses test-time augmentation), the training-mean baseline on both, load seconds,
training seconds (wall and this process's CPU time, per-epoch validation included, as in gz's
`training` figure), epochs run, best epoch, threads, the load average at start.

Recipes:

* `same`: gz's default CPU recipe reproduced as closely as PyTorch allows, to isolate the
  implementation. gz's `tiny` net at 32 px (3x3 conv pad 1 + ReLU + 2x2 max-pool blocks of
  8, 16, 32, 32 channels; dense 64 + ReLU, no dropout; dense 37; sigmoid; 25,941 parameters)
  with gz's initialisation (conv weights N(0, 2/fan_in), biases 0; dense weights N(0, 2/fan_in),
  biases U(+-1/sqrt(fan_in))), MSE loss, RMSprop as gz/Keras (rho 0.9, eps 1e-7, eps outside the
  square root: torch.optim.RMSprop(alpha=0.9, eps=1e-7) is the same update), lr 2e-3 with gz's
  `dieleman` schedule (x0.1 from epoch round(E*18/25.5) and round(E*23/25.5), 0-based: 28 and
  36 of 40), batch 16 (last batch short), 40 epochs, no early stopping, no augmentation; the
  epoch with the best 1-view validation RMSE is kept (gz's best checkpoint) and scored with 1
  view and with gz's 8 test-time views (4 right-angle rotations x 2 mirror flips, averaged).
  Images are the area (box) average of the 212-px crop, as gz's cache (`filter: area`), rounded
  to f16 like the cache. The hold-out is gz's own (`--holdout gz`, default): the same ChaCha8
  shuffle of the CSV rows that gz-model's `data::holdout` does, so the 200 validation galaxies
  are the ones gz validates on for the same seed (the script prints the training-mean RMSE on
  them, which gz's `gz train` also prints). The epoch shuffles and the initial weights come from
  PyTorch's generator, so runs of equal seeds are not the same draws as gz's.

* `notebook`: what a typical Keras-notebook user would write for this problem at 32 px, ported to
  PyTorch: a small VGG-style net (two 3x3 conv + ReLU per block, 2x2 max-pool, 16-16 / 32-32 /
  64-64 channels, dense 128 + ReLU + dropout 0.5, dense 37, sigmoid; 0.21 M parameters; PyTorch's
  default initialisation), Adam lr 1e-3, MSE, batch 32, up to 40 epochs with early stopping on the
  validation loss (patience 5, best weights restored, as with Keras' ModelCheckpoint /
  restore_best_weights), random augmentation per image every step (horizontal and vertical flips
  and a rotation by a uniform angle in [0, 360) with border fill, the ImageDataGenerator /
  torchvision RandomRotation kind), no test-time augmentation (the 8-view score is printed too,
  for reference). Images: Pillow's default `resize` (bicubic, antialiased) of the 212-px crop,
  scaled to [0, 1]. Same hold-out rows as `same` unless `--holdout random`.

`--holdout random` instead holds out 200 rows with numpy's seeded permutation. `--threads`
sets torch.set_num_threads (default: PyTorch's, the number of cores).
"""
import argparse
import csv
import json
import math
import os
import random
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CROP, SIZE = 212, 32
FILTERS = {"box": Image.BOX, "bicubic": Image.BICUBIC}

# ---------------------------------------------------------------------------------------------
# gz's hold-out (gz-model data::holdout: rand 0.8 SliceRandom::shuffle with rand_chacha 0.3's
# ChaCha8Rng::seed_from_u64(mix_seed(seed, HOLDOUT_STREAM, 0)))

M64, M32 = (1 << 64) - 1, 0xFFFFFFFF


def mix_seed(seed, stream, index):
    z = seed ^ (((stream << 17) | (stream >> 47)) & M64) ^ ((index * 0x9E3779B97F4A7C15) & M64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class ChaCha8:
    """rand_chacha 0.3 ChaCha8Rng: key from rand_core's seed_from_u64 (PCG32), counter 0."""

    def __init__(self, state):
        self.key = []
        for _ in range(8):
            state = (state * 6364136223846793005 + 11634580027462260723) & M64
            xs, rot = (((state >> 18) ^ state) >> 27) & M32, state >> 59
            self.key.append(((xs >> rot) | (xs << ((32 - rot) & 31))) & M32)
        self.ctr, self.buf, self.pos = 0, [], 0

    def _block(self):
        c = self.ctr
        self.ctr += 1
        s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574] + self.key + [c & M32, c >> 32, 0, 0]
        x = s[:]

        def qr(a, b, c, d):
            for (p, q, r, k) in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
                x[p] = (x[p] + x[q]) & M32
                x[r] ^= x[p]
                x[r] = ((x[r] << k) | (x[r] >> (32 - k))) & M32

        for _ in range(4):
            qr(0, 4, 8, 12), qr(1, 5, 9, 13), qr(2, 6, 10, 14), qr(3, 7, 11, 15)
            qr(0, 5, 10, 15), qr(1, 6, 11, 12), qr(2, 7, 8, 13), qr(3, 4, 9, 14)
        self.buf, self.pos = [(x[i] + s[i]) & M32 for i in range(16)], 0

    def next_u32(self):
        if self.pos >= len(self.buf):
            self._block()
        self.pos += 1
        return self.buf[self.pos - 1]

    def below(self, n):  # rand 0.8 UniformInt<u32>::sample_single(0..n)
        zone = ((n << (32 - n.bit_length())) & M32) - 1
        while True:
            m = self.next_u32() * n
            if (m & M32) <= zone:
                return m >> 32


def gz_holdout(n, frac, seed):
    perm = list(range(n))
    rng = ChaCha8(mix_seed(seed, 0x686F6C646F757421, 0))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    nv = min(max(math.floor(n * frac + 0.5), 1), n - 1)
    return sorted(perm[nv:]), sorted(perm[:nv])


# ---------------------------------------------------------------------------------------------
# data


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows], np.float32)


def load_one(args):
    path, flt = args
    im = Image.open(path).convert("RGB")
    w, h = im.size
    l, t = (w - CROP) // 2, (h - CROP) // 2
    im = im.crop((l, t, l + CROP, t + CROP)).resize((SIZE, SIZE), FILTERS[flt])
    return np.asarray(im, dtype=np.uint8)


def load_images(folder, ids, flt, procs):
    jobs = [(os.path.join(folder, i + ".jpg"), flt) for i in ids]
    with Pool(procs) as pool:
        arr = np.stack(pool.map(load_one, jobs, chunksize=64))
    x = arr.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # N, 3, H, W in [0, 1]
    return x


# ---------------------------------------------------------------------------------------------
# nets


class Tiny(nn.Module):
    """gz's `tiny` at 32 px (crates/gz-model/src/nets/vgg.rs), gz's initialisation."""

    def __init__(self):
        super().__init__()
        chans = [3, 8, 16, 32, 32]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.out = nn.Linear(64, 37)
        with torch.no_grad():
            for c in self.convs:
                c.weight.normal_(0.0, math.sqrt(2.0 / (c.in_channels * 9)))
                c.bias.zero_()
            for d in (self.fc1, self.out):
                d.weight.normal_(0.0, math.sqrt(2.0 / d.in_features))
                b = 1.0 / math.sqrt(d.in_features)
                d.bias.uniform_(-b, b)

    def forward(self, x):
        for c in self.convs:
            x = F.max_pool2d(F.relu(c(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return torch.sigmoid(self.out(x))


class NotebookVGG(nn.Module):
    """A small VGG-style net as a notebook would write it for 32-px inputs."""

    def __init__(self, widths=(16, 32, 64), dense=128, dropout=0.5):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        s = SIZE // 2 ** len(widths)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, dense), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(dense, 37), nn.Sigmoid())

    def forward(self, x):
        return self.head(self.features(x))


def augment(x, gen):
    """Per image: random h/v flips and a rotation by a uniform angle (bilinear, border fill)."""
    n = x.shape[0]
    hf = torch.rand(n, generator=gen) < 0.5
    vf = torch.rand(n, generator=gen) < 0.5
    x = torch.where(hf[:, None, None, None], x.flip(3), x)
    x = torch.where(vf[:, None, None, None], x.flip(2), x)
    a = torch.rand(n, generator=gen) * (2 * math.pi)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def dihedral_views(x):
    """gz-eval's `--tta 8`: 4 right-angle rotations x (as is, mirrored)."""
    for flip in (False, True):
        v = x.flip(3) if flip else x
        for k in range(4):
            yield torch.rot90(v, k, (2, 3))


@torch.no_grad()
def predict(model, x, views=1, batch=256):
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if views == 1:
            out.append(model(xb))
        else:
            out.append(torch.stack([model(v) for v in dihedral_views(xb)]).mean(0))
    return torch.cat(out)


def rmse(p, y):
    return float(torch.sqrt(((p.double() - y.double()) ** 2).mean()))


def dieleman_milestones(epochs):
    ms = sorted({math.floor(epochs * 18 / 25.5 + 0.5), math.floor(epochs * 23 / 25.5 + 0.5)})  # Rust's round
    return [m for m in ms if 0 < m < epochs]


RECIPES = {
    "same": dict(net=Tiny, opt="rmsprop", lr=2e-3, batch=16, epochs=40, patience=None, augment=False,
                 schedule="dieleman", filter="box", f16=True, tta=8),
    "notebook": dict(net=NotebookVGG, opt="adam", lr=1e-3, batch=32, epochs=40, patience=5, augment=True,
                     schedule=None, filter="bicubic", f16=False, tta=1),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Kaggle-layout dataset dir (e.g. ROOT/data/synth)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--procs", type=int, default=os.cpu_count(), help="image-loading processes")
    ap.add_argument("--epochs", type=int, default=0, help="override the recipe's epoch count")
    ap.add_argument("--filter", choices=sorted(FILTERS), default=None,
                    help="override the recipe's resize filter")
    ap.add_argument("--holdout", choices=["gz", "random"], default="gz")
    ap.add_argument("--verbose", action="store_true", help="one line per epoch on stderr")
    ap.add_argument("--submission", default=None,
                    help="also write the test predictions (8 views where the recipe scores them, else 1) as a "
                         "Kaggle submission CSV, for `gz eval --pred` to score")
    a = ap.parse_args()
    r = dict(RECIPES[a.recipe])
    if a.epochs:
        r["epochs"] = a.epochs
    if a.filter:
        r["filter"] = a.filter
    load_avg = os.getloadavg()
    if a.threads:
        torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)

    t0 = time.perf_counter()
    tr_ids, tr_y = read_csv(os.path.join(a.data, "training_solutions_rev1.csv"))
    te_ids, te_y = read_csv(os.path.join(a.data, "test_solutions.csv"))
    tr_x = load_images(os.path.join(a.data, "images_training_rev1"), tr_ids, r["filter"], a.procs)
    te_x = load_images(os.path.join(a.data, "images_test_rev1"), te_ids, r["filter"], a.procs)
    if r["f16"]:
        tr_x, te_x = tr_x.astype(np.float16).astype(np.float32), te_x.astype(np.float16).astype(np.float32)
    load_s = time.perf_counter() - t0

    n = len(tr_ids)
    if a.holdout == "gz":
        fit, val = gz_holdout(n, 0.1, a.seed)
    else:
        perm = np.random.RandomState(a.seed).permutation(n)
        nv = round(n * 0.1)
        fit, val = sorted(perm[nv:].tolist()), sorted(perm[:nv].tolist())
    X, Y = torch.from_numpy(tr_x), torch.from_numpy(tr_y)
    Xf, Yf, Xv, Yv = X[fit], Y[fit], X[val], Y[val]
    Xt, Yt = torch.from_numpy(te_x), torch.from_numpy(te_y)
    mean = Yf.mean(0, keepdim=True)
    base_val, base_test = rmse(mean.expand_as(Yv), Yv), rmse(mean.expand_as(Yt), Yt)

    model = r["net"]()
    if r["opt"] == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=r["lr"], alpha=0.9, eps=1e-7)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    milestones = dieleman_milestones(r["epochs"]) if r["schedule"] == "dieleman" else []
    gen = torch.Generator().manual_seed(a.seed)
    aug_gen = torch.Generator().manual_seed(a.seed + 1_000_003)

    best, best_epoch, best_state, since, epochs_run = math.inf, 0, None, 0, 0
    w0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(r["epochs"]):
        if r["patience"] is not None and since >= r["patience"]:
            break
        lr = r["lr"] * 0.1 ** sum(epoch >= m for m in milestones)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        order = torch.randperm(len(fit), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), r["batch"]):
            idx = order[i:i + r["batch"]]
            xb, yb = Xf[idx], Yf[idx]
            if r["augment"]:
                xb = augment(xb, aug_gen)
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        v = rmse(predict(model, Xv), Yv)
        epochs_run += 1
        if v < best:
            best, best_epoch, since = v, epoch + 1, 0
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
        else:
            since += 1
        if a.verbose:
            mark = " *" if since == 0 else ""
            print(f"epoch {epoch + 1:3d} loss {loss_sum / len(fit):.6f} val {v:.5f}{mark} "
                  f"lr {lr:.1e} {time.perf_counter() - w0:.1f} s", file=sys.stderr, flush=True)
    train_wall, train_cpu = time.perf_counter() - w0, time.process_time() - c0
    model.load_state_dict(best_state)

    t1 = time.perf_counter()
    res = dict(recipe=a.recipe, seed=a.seed, holdout=a.holdout, filter=r["filter"], n_fit=len(fit),
               n_val=len(val),
               n_test=len(te_ids), val_rmse=round(rmse(predict(model, Xv), Yv), 5),
               test_rmse=round(rmse(predict(model, Xt), Yt), 5),
               val_rmse_tta8=round(rmse(predict(model, Xv, 8), Yv), 5),
               test_rmse_tta8=round(rmse(predict(model, Xt, 8), Yt), 5),
               tta_scored=r["tta"], train_mean_val=round(base_val, 5), train_mean_test=round(base_test, 5),
               best_epoch=best_epoch, epochs_run=epochs_run, load_s=round(load_s, 2),
               train_wall_s=round(train_wall, 2), train_cpu_s=round(train_cpu, 2),
               score_wall_s=round(time.perf_counter() - t1, 2),
               params=sum(p.numel() for p in model.parameters()),
               threads=torch.get_num_threads(), procs=a.procs, loadavg_start=[round(x, 2) for x in load_avg],
               torch=torch.__version__)
    if a.submission:
        with open(os.path.join(a.data, "training_solutions_rev1.csv")) as f:
            header = next(csv.reader(f))
        write_submission(a.submission, header, te_ids, predict(model, Xt, r["tta"]))
    print(json.dumps(res), flush=True)


def write_submission(path, header, ids, pred):
    """Kaggle's layout: the training CSV's header (GalaxyID and the 37 answers), 6 decimals."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for gid, row in zip(ids, pred.tolist()):
            w.writerow([gid] + [f"{v:.6f}" for v in row])


if __name__ == "__main__":
    main()
