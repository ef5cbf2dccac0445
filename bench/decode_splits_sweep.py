"""Split-count sweep for the CUDA decode kernel (tunes the num_splits heuristic).

    python bench/decode_splits_sweep.py [--out PATH]

bf16 d=128, 1 query row, 1 appended row, paged (page 256) cache. For each
(kv heads, batch, L) point: CUDA-graph replay time of flash_attn_with_kvcache for
num_splits in {1, 2, 4, ..., 256} and the heuristic (0), with the effective K/V read
rate (GB/s) and the ratio to the copy-bandwidth bound. Prints a markdown table (and
writes it to --out, default $OUT/decode_splits_sweep.md).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import orchard
import orchard.kvcache as okv


def graph_us(fn, reps=30, inner=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode_splits_sweep.md"))
    args = ap.parse_args()
    okv.CHECK_DEVICE_INDICES = False
    torch.manual_seed(0)
    dev, dt, d, hq, page = "cuda", torch.bfloat16, 128, 32, 256
    a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    b_ = torch.empty_like(a)
    bw = 2 * a.numel() / (graph_us(lambda: b_.copy_(a), reps=10, inner=2) * 1e-6)
    del a, b_
    torch.cuda.empty_cache()
    lines = [f"copy bandwidth {bw / 1e9:.0f} GB/s; graph replay us (GB/s of K/V read, x bound)", "",
             "| heads | batch | L | " + " | ".join(f"s={s}" for s in (1, 2, 4, 8, 16, 32, 64, 128, 256)) +
             " | heuristic (s) |", "|" + "---|" * 13]
    for hkv, name in ((4, "GQA 32:4"), (32, "MHA 32:32")):
        for bsz, L in ((1, 8192), (1, 32768), (1, 131072), (8, 8192), (8, 32768), (64, 8192)):
            kv_bytes = 2 * bsz * L * hkv * d * 2
            if kv_bytes > 24 << 30:
                continue
            per = -(-L // page)
            kc = torch.randn(bsz * per, page, hkv, d, device=dev, dtype=dt)
            vc = torch.randn_like(kc)
            table = torch.randperm(bsz * per, device=dev).view(bsz, per).to(torch.int32)
            q = torch.randn(bsz, 1, hq, d, device=dev, dtype=dt)
            kn = torch.randn(bsz, 1, hkv, d, device=dev, dtype=dt)
            vn = torch.randn_like(kn)
            sl = torch.full((bsz,), L - 1, dtype=torch.int32, device=dev)
            cells = []
            for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 0):
                fn = lambda s=s: orchard.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=sl,  # noqa: E731
                                                                 block_table=table, num_splits=s)
                try:
                    us = graph_us(fn)
                    used = okv.last_num_splits
                    cell = f"{us:.1f} ({kv_bytes / us / 1e3:.0f}, {us / (kv_bytes / bw * 1e6):.2f})"
                    if s == 0:
                        cell += f" s={used}"
                except Exception as e:  # noqa: BLE001
                    cell = f"err {type(e).__name__}"
                cells.append(cell)
            lines.append(f"| {name} | {bsz} | {L // 1024}k | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            del kc, vc
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
