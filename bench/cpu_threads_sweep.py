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

--heads 1,2,4,8,16,32 times the s512 shapes instead at the top thread count with that many heads
(b1, s512, d64 / d128; both libraries, same process; Orchard also with ORCHARD_CPU_TEAM=fit,
teams of min(threads, tasks), which libgomp answers by ending the surplus threads) and fits time = fixed + per_head * heads
over the counts with at least as many 64-row query blocks as threads: a call's fixed cost (what
no thread count shortens) against the part that scales with the work.

    OMP_NUM_THREADS=16 python bench/cpu_threads_sweep.py [--threads 16,8,4,2] [--reps 20]
    OMP_NUM_THREADS=16 python bench/cpu_threads_sweep.py --heads 1,2,4,8,16,32
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


def fit_line(xs, ys):
    """Least squares y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def head_sweep(heads, dtypes, reps, top) -> None:
    """The s512 forwards with 1..N heads at `top` threads, and the fixed + per-head fit."""
    shrink = ab_switch("ORCHARD_CPU_TEAM=fit")  # teams of min(threads, tasks), as before [C51]
    print("| d | dtype | causal | heads | orchard ms | orchard team=fit ms | torch ms | torch / orchard |")
    print("|---|---|---|---|---|---|---|---|")
    fits = []
    for d in (64, 128):
        for dt in dtypes:
            for causal in (False, True):
                rows = []
                for h in heads:
                    fo, ft = inputs((1, h, 512, d), getattr(torch, dt), causal)
                    to = best_ms(fo, reps)
                    with shrink("ab"):
                        ts = best_ms(fo, reps)
                    tt = best_ms(ft, reps)
                    rows.append((h, to, tt))
                    print(f"| {d} | {dt} | {causal} | {h} | {to:.3f} | {ts:.3f} | {tt:.3f} | {tt / to:.2f}x |",
                          flush=True)
                full = [r for r in rows if r[0] * 512 // 64 >= top]  # every thread has a query block
                if len(full) >= 2:
                    fo_a, fo_b = fit_line([r[0] for r in full], [r[1] for r in full])
                    ft_a, ft_b = fit_line([r[0] for r in full], [r[2] for r in full])
                    fits.append(f"| {d} | {dt} | {causal} | {1e3 * fo_a:.0f} | {1e3 * fo_b:.1f} | "
                                f"{1e3 * ft_a:.0f} | {1e3 * ft_b:.1f} |")
    print("\nFit over the head counts with >= one 64-row query block per thread, us: time = fixed + "
          "per_head * heads\n")
    print("| d | dtype | causal | orchard fixed | orchard per head | torch fixed | torch per head |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(fits))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="")
    ap.add_argument("--heads", default="", help="head counts for the s512 head sweep (instead of the thread sweep)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    top, heading = run_heading("CPU threads sweep", "wall", f"min of {args.reps}, no_grad forward")
    if args.heads:
        print(heading)
        with torch.no_grad():
            head_sweep([int(h) for h in args.heads.split(",")], args.dtypes.split(","), args.reps, top)
        return 0
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
