"""Does Orchard's CPU time depend on what ran just before it? A pool that just
finished a parallel region keeps its threads spinning for a while (libgomp:
GOMP_SPINCOUNT, 300k pause iterations by default), and cpu_bench.py interleaves
Orchard and torch, so each call may start while the other's threads still spin.
(Measured 2026-12-01: with torch imported, Orchard's libgomp.so.1 is torch's
copy, so Orchard's OpenMP loops share torch's team; Orchard's own task pool,
ORCHARD_CPU_POOL=1, brings a second set of threads. See task_pool.h.)

    OMP_NUM_THREADS=16 python bench/cpu_isolation.py

Per shape and dtype, forward only, min wall ms of `--reps`: orchard alone
(back to back), torch alone, orchard right after a torch call, orchard after a
torch call and a 50 ms sleep, torch right after an orchard call, torch after an
orchard call and a 50 ms sleep (both pools asleep: what waking costs each).
Each shape runs once per `--pools` value (default "1,0"): ORCHARD_CPU_POOL=1 is
Orchard's own task pool, 0 its OpenMP loops, the default (src/backends/cpu/task_pool.h;
read per call, so both run in this one process).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import orchard


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--pools", default="1,0", help="ORCHARD_CPU_POOL values to time")
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k.startswith(("ORCHARD_", "OMP_", "GOMP_"))}
    print(f"### {threads} threads, torch {torch.__version__}, env {env}\n")
    print("| b,h,s,d | dtype | pool | orchard alone | torch alone | orchard after torch | "
          "orchard after torch + 50 ms | torch after orchard | torch after orchard + 50 ms |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    ours, theirs = orchard.scaled_dot_product_attention, F.scaled_dot_product_attention
    for (b, h, s, d) in [(1, 8, 512, 64), (1, 8, 512, 128), (1, 4, 2048, 128), (1, 1, 8192, 128)]:
        for dtype in [getattr(torch, n) for n in args.dtypes.split(",")]:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, h, s, d, dtype=dtype, generator=g) for _ in range(3))

            def call(fn):
                t0 = time.perf_counter()
                fn(q, k, v)
                return time.perf_counter() - t0

            for pool in args.pools.split(","):
                os.environ["ORCHARD_CPU_POOL"] = pool
                with torch.no_grad():
                    call(ours), call(theirs)
                    alone_o = min(call(ours) for _ in range(args.reps))
                    alone_t = min(call(theirs) for _ in range(args.reps))
                    after_t, after_sleep, after_o, after_o_sleep = [], [], [], []
                    for _ in range(args.reps):
                        call(theirs)
                        after_t.append(call(ours))
                        after_o.append(call(theirs))
                    for _ in range(max(3, args.reps // 2)):
                        call(theirs)
                        time.sleep(0.05)
                        after_sleep.append(call(ours))
                        time.sleep(0.05)
                        after_o_sleep.append(call(theirs))
                ms = lambda x: f"{1e3 * x:.2f}"  # noqa: E731
                print(f"| {b},{h},{s},{d} | {str(dtype)[6:]} | {pool} | {ms(alone_o)} | {ms(alone_t)} | "
                      f"{ms(min(after_t))} | {ms(min(after_sleep))} | {ms(min(after_o))} | "
                      f"{ms(min(after_o_sleep))} |", flush=True)


if __name__ == "__main__":
    main()
