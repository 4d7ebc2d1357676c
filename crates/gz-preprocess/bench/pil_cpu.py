"""Pillow peer timed by CPU time: the `draft` and `blog` functions of ../shared/bench/pil_prep.py
run in one process, one thread, best of N passes, images/s by wall clock and by CPU time
(time.thread_time), so a busy machine does not skew the comparison with gz-preprocess's bench
(`prep_cpu_img_s`). Usage: python3 pil_cpu.py PIL_PREP_PY DIR [REPEATS] [SIZE]

With SIZE (other than 106; the crop stays the central 212 of 424) two Pillow recipes for that
size replace `draft`/`blog` (pil_prep.py has only 106):
  draft: libjpeg DCT scaling (draft mode) to the smallest scale whose crop still has SIZE
         pixels or more, crop, then Image.BOX (area) to SIZE: Pillow's fastest way there
  box:   full decode, crop 212, Image.BOX to SIZE: the exact area average gz computes"""
import importlib.util, json, os, sys, time

import numpy as np
from PIL import Image

spec = importlib.util.spec_from_file_location("pil_prep", sys.argv[1])
pp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pp)
d = sys.argv[2]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
size = int(sys.argv[4]) if len(sys.argv) > 4 else 106
files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".jpg"))


def centre(im, side):
    w, h = im.size
    l, t = (w - side) // 2, (h - side) // 2
    return im.crop((l, t, l + side, t + side))


def draft_size(p):
    im = Image.open(p)
    im.draft("RGB", (2 * size, 2 * size))  # the whole image; the crop is half of it
    im = centre(im.convert("RGB"), im.size[0] // 2).resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float16).sum()


def box_size(p):
    im = centre(Image.open(p).convert("RGB"), 212).resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float16).sum()


recipes = [("blog", pp.blog), ("draft", pp.draft)] if size == 106 else [("box", box_size), ("draft", draft_size)]
out = dict(n=len(files), procs=1, size=size)
for name, fn in recipes:
    best_wall = best_cpu = 0.0
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        for f in files:
            fn(f)
        best_wall = max(best_wall, len(files) / (time.perf_counter() - t))
        best_cpu = max(best_cpu, len(files) / (time.thread_time() - c))
    out[name + "_img_s"] = round(best_wall, 1)
    out[name + "_cpu_img_s"] = round(best_cpu, 1)
print(json.dumps(out))
