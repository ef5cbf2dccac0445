"""Few query rows per kv head on the CPU (a decode step, speculative decoding, a handful of
cross-attention queries) through the SDPA drop-in: Orchard against torch's CPU SDPA, same
process, same tensors, same threads, interleaved rep by rep; with --ab, Orchard again with
ORCHARD_CPU_FEW_ROWS=0 (the tiled forward instead of the decode kernel that serves these
calls, src/backends/cpu/few_rows_forward.h).

    OMP_NUM_THREADS=2 python bench/cpu_few_rows_bench.py [--reps 7] [--dtypes float32,float16,bfloat16]
        [--ab] [--sk 4096]

Forward only (no grad), not causal (torch's is_causal is top-left: one query row would see one
key), (B, H, S, D) tensors, GQA through enable_gqa. Wall clock, min over reps. Prints a
markdown table: ms per call and torch / Orchard (> 1: Orchard faster).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import orchard
from cpu_bench import ab_switch, run_heading

# (b, hq, hkv, sq, d): query rows per kv head = hq / hkv * sq.
SHAPES = [(1, 8, 8, 1, 64), (1, 8, 8, 1, 128), (1, 32, 8, 1, 128), (4, 32, 8, 1, 128), (1, 8, 8, 4, 128),
          (1, 32, 8, 4, 128), (1, 8, 8, 16, 64), (1, 8, 8, 16, 128), (1, 8, 8, 32, 128), (1, 8, 8, 64, 128)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--sk", type=int, default=4096)
    ap.add_argument("--ab", action="store_true", help="also time Orchard with ORCHARD_CPU_FEW_ROWS=0")
    args = ap.parse_args()
    _, heading = run_heading("CPU few rows", "wall", f"min of {args.reps}, sk {args.sk}")
    print(heading)
    ab = " tiled ms | tiled / default |" if args.ab else ""
    print("| b,hq,hkv,sq,d | rows / kv head | dtype | orchard ms | torch ms | torch / orchard |" + ab)
    print("|---|---|---|---|---|---|" + ("---|---|" if args.ab else ""), flush=True)
    env_for = ab_switch("ORCHARD_CPU_FEW_ROWS=0" if args.ab else "")
    ratios = []
    for (b, hq, hkv, sq, d) in SHAPES:
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(b, hq, sq, d, dtype=dtype, generator=g)
            k, v = (torch.randn(b, hkv, args.sk, d, dtype=dtype, generator=g) for _ in range(2))
            fns = {"orchard": orchard.scaled_dot_product_attention, "torch": F.scaled_dot_product_attention}
            if args.ab:
                fns["ab"] = orchard.scaled_dot_product_attention
            best = {n: math.inf for n in fns}
            with torch.no_grad():
                for rep in range(args.reps + 1):  # rep 0 warms up
                    for n, fn in fns.items():
                        with env_for(n):
                            t0 = time.perf_counter()
                            fn(q, k, v, enable_gqa=True)
                            if rep:
                                best[n] = min(best[n], time.perf_counter() - t0)
            r = best["torch"] / best["orchard"]
            ratios.append(r)
            print(f"| {b},{hq},{hkv},{sq},{d} | {hq // hkv * sq} | {dname} | {1e3 * best['orchard']:.2f} | "
                  f"{1e3 * best['torch']:.2f} | {r:.2f}x |" + (
                      f" {1e3 * best['ab']:.2f} | {best['ab'] / best['orchard']:.2f} |" if args.ab else ""),
                  flush=True)
    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"\ngeomean torch / orchard {gm:.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
