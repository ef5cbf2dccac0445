"""Key-padding masks (B, 1, 1, S) of several padding patterns, Orchard's SDPA drop-in against
torch's SDPA cuDNN and efficient backends with the same mask, same tensors, same process (bf16).

Patterns: none (every key visible: the mask's own cost), right / left padding of a fixed
fraction of every batch entry, and random right padding (each entry keeps s/2..s keys, as
feature_bench.py's mask section). The sm90 kernels drop the key tiles such a mask hides from
every row (sm90/attn_bias_fragment.cuh), so their time follows the visible keys. Also timed:
Orchard with no mask on the same tensors (the kernels without the mask's reads).

Ratios are peer time / Orchard time (> 1: Orchard faster). do_bench medians (gpu_bench.py) of
eager calls, or with --graph of CUDA-graph replays (Orchard and cuDNN: the GPU's time alone).
    python bench/mask_padding_bench.py [--quick] [--rounds 2] [--graph]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard
from feature_bench import timed
from gpu_bench import do_bench_ms

DT = torch.bfloat16


def padding_mask(pattern, b, s):
    keep = torch.ones(b, s, dtype=torch.bool)
    if pattern.startswith("right") or pattern.startswith("left"):
        n = int(s * int(pattern.split("_")[1]) / 100)
        if pattern.startswith("right"):
            keep[:, s - n:] = False
        else:
            keep[:, :n] = False
    elif pattern == "random":
        g = torch.Generator().manual_seed(1)
        valid = torch.randint(s // 2, s + 1, (b,), generator=g)
        keep = torch.arange(s)[None, :] < valid[:, None]
    return keep[:, None, None, :].cuda()


def graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream): its replay, whose time is the
    GPU's alone (no host time between the kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timed_graph(fn, grads_of):
    """(fwd ms, fwd+bwd ms) of fn() replayed from CUDA graphs."""
    return do_bench_ms(graphed(fn)), do_bench_ms(graphed(lambda: grads_of(fn())))


def run_point(b, s, h, d, pattern, graph):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=DT, requires_grad=True) for _ in range(3))
    mask = padding_mask(pattern, b, s)
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    impls = {"orchard": lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    if pattern == "none":
        impls["orchard_nomask"] = lambda: orchard.scaled_dot_product_attention(q, k, v)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def peer(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        impls[name] = peer
    if graph:
        impls = {f"{name}_graph": fn for name, fn in impls.items() if name in ("orchard", "cudnn")}
    out = {}
    for name, fn in impls.items():
        try:
            out[name] = timed_graph(fn, grads) if graph else timed(fn, grads)
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize()
            out[name] = None
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:100]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="s4k only")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--graph", action="store_true", help="Orchard and cuDNN replayed from CUDA graphs "
                    "(GPU time alone) instead of eager calls")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"mask padding bench: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, ms (fwd / fwd+bwd)")
    seqs = [4096] if args.quick else [1024, 4096]
    patterns = ["none", "right_25", "right_50", "left_50", "random"]
    for r in range(args.rounds):
        for d, h in ((128, 16), (64, 32)):
            for s in seqs:
                for pat in patterns:
                    t = run_point(4, s, h, d, pat, args.graph)
                    first = "orchard_graph" if args.graph else "orchard"
                    o = t[first]
                    if o is None:
                        continue
                    parts = [f"round {r} d{d} s{s} {pat:9s} {first} {o[0]:.3f} / {o[1]:.3f}"]
                    for name in ("orchard_nomask", "cudnn", "efficient", "orchard_nomask_graph", "cudnn_graph"):
                        if name in t and t[name] is not None:
                            p = t[name]
                            parts.append(f"{name} {p[0]:.3f} / {p[1]:.3f} ({p[0] / o[0]:.2f}x / {p[1] / o[1]:.2f}x)")
                    print(" | ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
