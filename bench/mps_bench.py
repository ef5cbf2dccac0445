"""MPS benchmark (Apple silicon, torch >= 2.7): Orchard's Metal kernels vs torch's SDPA on
MPS, same process, same tensors, forward and forward+backward.

    python bench/mps_bench.py [--reps 20] [--dtype float16]

Prints a markdown table of TFLOP/s (4*b*h*s*s*d forward, halved causal, x3.5 for
forward+backward) and Orchard/SDPA ratios. Not run yet: no Mac was available when the
Metal backend was written; its kernels are verified on an emulated execution model only
and have not been tuned on hardware.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import orchard


def median_s(fn, reps):
    fn()
    torch.mps.synchronize()
    times = []
    for _ in range(reps):
        torch.mps.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.mps.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(impl, b, h, s, d, dtype, causal, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, s, d, generator=g).to("mps", dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = orchard.scaled_dot_product_attention if impl == "orchard" else F.scaled_dot_product_attention
    with torch.no_grad():
        fwd = median_s(lambda: fn(q, k, v, is_causal=causal), reps)
    fwd_bwd = median_s(lambda: torch.autograd.grad(fn(q, k, v, is_causal=causal), (q, k, v), dout), reps)
    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args()
    if not torch.backends.mps.is_available():
        raise SystemExit("mps_bench.py: no MPS device (run it on Apple silicon)")
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.dtype}, median of {args.reps}\n")
    print("| b | h | s | d | causal | orchard fwd | sdpa fwd | ratio | orchard fwd+bwd | sdpa fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b, h, s, d in [(4, 16, 1024, 64), (2, 16, 2048, 64), (2, 16, 2048, 128), (1, 16, 4096, 128),
                       (1, 8, 2048, 256)]:
        for causal in (False, True):
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            o_f, o_fb = bench("orchard", b, h, s, d, dtype, causal, args.reps)
            t_f, t_fb = bench("sdpa", b, h, s, d, dtype, causal, args.reps)
            tf = lambda t, mult: f"{flops * mult / t / 1e12:.2f}"  # noqa: E731
            print(f"| {b} | {h} | {s} | {d} | {int(causal)} | {tf(o_f, 1)} | {tf(t_f, 1)} | {t_f / o_f:.2f} | "
                  f"{tf(o_fb, 3.5)} | {tf(t_fb, 3.5)} | {t_fb / o_fb:.2f} |")


if __name__ == "__main__":
    main()
