"""Dropout on an H100 / H200: the sm90 kernels with dropout (ORCHARD_SM90_DROPOUT=1) against the
sm80 kernels (ORCHARD_SM90_DROPOUT=0), each in a child process (the switch is read once per
process), the default (the switch unset: sm90_dropout_measured_faster's buckets) and FA2 (SDPA's
flash backend), forward and forward + backward, same tensors and card, plus Orchard without
dropout for scale.
bf16, 16k tokens per call (b = 16384 / s), model dim 2048 (h = 2048 / d), dropout 0.1.
Kernel time by CUDA events, median of --reps calls after warm-up.

    python bench/sm90_dropout_bench.py [--reps 30] [--dims 64,128,192,256] [--seqs 2048,8192]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import orchard
from gpu_bench import median_ms as time_ms  # CUDA events, median of reps after warm-up


def shapes(args):
    for d in (int(x) for x in args.dims.split(",")):
        for s in (int(x) for x in args.seqs.split(",")):
            for causal in (False, True):
                yield d, s, causal


def tensors(d, s):
    b, h = max(1, 16384 // s), 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def fwd_and_fwdbwd(fn, q, k, v, reps):
    """(forward ms, forward + backward ms) of fn(q, k, v)."""
    with torch.no_grad():
        fwd = time_ms(lambda: fn(q, k, v), reps)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return fwd, time_ms(step, reps)


def orchard_times(args, dropout_p):
    out = {}
    for d, s, causal in shapes(args):
        q, k, v = tensors(d, s)
        out[f"{d},{s},{causal}"] = fwd_and_fwdbwd(
            lambda q, k, v: orchard.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal), q, k, v,
            args.reps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dims", default="64,128,192,256")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--child", action="store_true", help="(internal) time the switch's path, print JSON")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(orchard_times(args, 0.1)))
        return
    argv = [sys.executable, __file__, "--child", "--reps", str(args.reps), "--dims", args.dims, "--seqs", args.seqs]

    def child_times(switch):
        child = subprocess.run(argv, env=dict(os.environ, ORCHARD_SM90_DROPOUT=switch), capture_output=True,
                               text=True)
        if child.returncode != 0:
            sys.exit(child.stdout[-2000:] + child.stderr[-2000:])
        return json.loads(child.stdout.strip().splitlines()[-1])
    sm90, sm80 = child_times("1"), child_times("0")
    os.environ.pop("ORCHARD_SM90_DROPOUT", None)
    default = orchard_times(args, 0.1)
    plain = orchard_times(args, 0.0)
    print(f"### {torch.cuda.get_device_name()}, bf16, 16k tokens, model dim 2048, dropout 0.1, "
          f"median of {args.reps}, ms, forward / forward + backward\n")
    print("| d | s | causal | sm90 dropout | sm80 dropout | default | FA2 dropout | Orchard no dropout | "
          "sm90 / sm80 speed | default / FA2 speed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d, s, causal in shapes(args):
        key = f"{d},{s},{causal}"
        q, k, v = (t.transpose(1, 2) for t in tensors(d, s))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            fa2 = fwd_and_fwdbwd(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=causal), q, k, v,
                args.reps)
        a, b, c, e, f = sm90[key], sm80[key], fa2, plain[key], default[key]
        cell = lambda x: f"{x[0]:.3f} / {x[1]:.3f}"
        ratio = lambda x, y: f"{x[0] / y[0]:.2f} / {x[1] / y[1]:.2f}x"
        print(f"| {d} | {s} | {causal} | {cell(a)} | {cell(b)} | {cell(f)} | {cell(c)} | {cell(e)} | "
              f"{ratio(b, a)} | {ratio(c, f)} |", flush=True)


if __name__ == "__main__":
    main()
