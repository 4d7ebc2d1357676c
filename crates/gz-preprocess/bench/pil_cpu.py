"""Pillow peer timed by CPU time: the `draft` and `blog` functions of ../shared/bench/pil_prep.py
run in one process, one thread, best of N passes, images/s by wall clock and by CPU time
(time.thread_time), so a busy machine does not skew the comparison with gz-preprocess's bench
(`prep_cpu_img_s`). Usage: python3 pil_cpu.py PIL_PREP_PY DIR [REPEATS]"""
import importlib.util, json, os, sys, time

spec = importlib.util.spec_from_file_location("pil_prep", sys.argv[1])
pp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pp)
d = sys.argv[2]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".jpg"))
out = dict(n=len(files), procs=1)
for name, fn in [("blog", pp.blog), ("draft", pp.draft)]:
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
