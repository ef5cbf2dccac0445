"""CPU benchmark: Orchard's CPU backend vs torch's CPU SDPA (which dispatches
to its own fused flash-attention CPU kernel), same process, same threads.

    python bench/cpu_bench.py [--reps 5]

Prints a markdown table (GFLOP/s: 4*b*h*s*s*d fwd, halved causal, x2.5 bwd).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import orchard


def median_s(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(impl, b, h, s, d, dtype, causal, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(b, h, s, d, dtype=dtype, generator=g)
    fn = orchard.scaled_dot_product_attention if impl == "orchard" else F.scaled_dot_product_attention
    with torch.no_grad():
        fwd = median_s(lambda: fn(q, k, v, is_causal=causal), reps)
    out = fn(q, k, v, is_causal=causal)
    bwd = median_s(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), reps)
    return fwd, bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    print(f"### CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{datetime.date.today()}, commit {commit}, torch {torch.__version__}\n")
    print("| shape (b,h,s,d) | dtype | causal | orchard fwd/bwd GFLOP/s | torch SDPA fwd/bwd GFLOP/s | ratio fwd/bwd |")
    print("|---|---|---|---|---|---|")
    for (b, h, s, d) in [(1, 8, 512, 64), (1, 8, 1024, 64), (1, 8, 1024, 128), (2, 8, 2048, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                of, ob = bench("orchard", b, h, s, d, dtype, causal, args.reps)
                tf, tb = bench("torch", b, h, s, d, dtype, causal, args.reps)
                print(f"| {b},{h},{s},{d} | {str(dtype).split('.')[1]} | {causal} | "
                      f"{flops / of / 1e9:.1f} / {2.5 * flops / ob / 1e9:.1f} | "
                      f"{flops / tf / 1e9:.1f} / {2.5 * flops / tb / 1e9:.1f} | {tf / of:.2f}x / {tb / ob:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
