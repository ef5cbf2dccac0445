"""Where a short CPU forward's time goes on a many-core host (issue 15's s512 points): the
same call on fewer threads, on Orchard's own pool, and at a size where the kernel is ~nothing.

cpu_bench.py's s512 forwards are 0.3-1.5 ms calls at 16 threads; this times, back to back
(min wall ms of --reps after a warm-up call, cpu_mask_bench's timer), for each shape and dtype:
  - Orchard at each thread count of --threads (torch.set_num_threads: Orchard's OpenMP loops read
    the same setting, so the process's one libgomp team shrinks for both),
  - the same on Orchard's own task pool (ORCHARD_CPU_POOL=1, read per call),
  - torch's SDPA at the same counts,
and a tiny call (b1 h1 s64 d64) at the largest and smallest count: the fixed per-call cost.
If Orchard at fewer threads beats Orchard at all of them, the call is split too thinly; if the
tiny call's time is a large part of the s512 one, fixed costs dominate.

    OMP_NUM_THREADS=16 python bench/cpu_threads_sweep.py [--threads 16,8,4,2] [--reps 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import orchard
from cpu_bench import ab_switch, run_heading  # bench/ is the script's directory
from cpu_mask_bench import best_ms

SHAPES = [(1, 8, 512, 64), (1, 8, 512, 128), (1, 4, 2048, 128)]
TINY = (1, 1, 64, 64)


def inputs(shape, dtype, causal):
    q, k, v = (torch.randn(*shape, dtype=dtype) for _ in range(3))
    return (lambda: orchard.scaled_dot_product_attention(q, k, v, is_causal=causal),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    top, heading = run_heading("CPU threads sweep", "wall", f"min of {args.reps}, no_grad forward")
    counts = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({top, max(1, top // 2), max(1, top // 4), 2}, reverse=True)
    pool = ab_switch("ORCHARD_CPU_POOL=1")  # around the "ab" contestant's calls only
    print(heading)
    print("| b,h,s,d | dtype | causal | threads | orchard | orchard pool=1 | torch | torch / orchard |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for shape in SHAPES + [TINY]:
            for dt in args.dtypes.split(","):
                dtype = getattr(torch, dt)
                for causal in (False, True):
                    fo, ft = inputs(shape, dtype, causal)
                    for n in (counts if shape != TINY else [counts[0], counts[-1]]):
                        torch.set_num_threads(n)
                        to = best_ms(fo, args.reps)
                        with pool("ab"):
                            tp = best_ms(fo, args.reps)
                        tt = best_ms(ft, args.reps)
                        print(f"| {','.join(map(str, shape))} | {dt} | {causal} | {n} | {to:.3f} | "
                              f"{tp:.3f} | {tt:.3f} | {tt / to:.2f}x |", flush=True)
    torch.set_num_threads(top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
