"""CPU decode benchmark: orchard.flash_attn_with_kvcache (one new query row per
sequence over a full KV cache) vs torch's CPU SDPA on the same cache, same
process, same thread count, the two interleaved rep by rep.

    OMP_NUM_THREADS=2 python bench/cpu_decode_bench.py [--reps 15] [--grid quick|full]
        [--ab ORCHARD_CPU_POOL=1]

torch gets the cache as the (b, h_kv, cache, d) view of the (b, cache, h_kv, d)
tensor that Orchard reads (no copy made here; whatever torch copies is its
cost), the query as (b, h_q, 1, d), and enable_gqa=True for GQA. Wall clock
(decode calls are short and memory-bound, so CPU time would hide stalls),
median and min of --reps per contestant; the ratio is torch's median over
Orchard's (> 1: Orchard faster). --ab NAME=VALUE adds Orchard with that
environment variable set around its calls (ORCHARD_CPU_POOL=1: Orchard's own
pool), ratio = its median / the default's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import orchard
from cpu_bench import ab_switch, run_heading  # bench/ is the script's directory

# (batch, cache length, h_q, h_kv, d)
GRIDS = {
    "quick": [(1, 4096, 32, 4, 128), (1, 4096, 8, 8, 128)],
    "full": [(b, s, hq, hkv, 128) for b in (1, 8) for s in (4096, 32768)
             for (hq, hkv) in ((32, 4), (8, 8))],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--grid", default="quick", choices=sorted(GRIDS))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--ab", default="", help="NAME=VALUE: also time Orchard with this env var set")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    _, heading = run_heading("CPU decode", args.clock, f"median (min) of {args.reps}")
    print(heading)
    print("| b | cache | hq:hkv | d | dtype | orchard ms | torch ms | ratio |"
          + (f" orchard {args.ab} ms | its / default |" if args.ab else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.ab else ""), flush=True)
    env_for = ab_switch(args.ab)

    for (b, s, hq, hkv, d) in GRIDS[args.grid]:
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            g = torch.Generator().manual_seed(0)
            k_cache = torch.randn(b, s, hkv, d, generator=g).to(dtype)
            v_cache = torch.randn(b, s, hkv, d, generator=g).to(dtype)
            q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
            qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
            gqa = hq != hkv

            def run_orchard():
                return orchard.flash_attn_with_kvcache(q, k_cache, v_cache)

            def run_torch():
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)

            fns = {"orchard": run_orchard, "torch": run_torch}
            if args.ab:
                fns["ab"] = run_orchard
            with torch.no_grad():
                ref = run_torch().transpose(1, 2).float()
                got = run_orchard().float()
                err = (got - ref).abs().max().item()
                assert err < (5e-2 if dtype == torch.bfloat16 else 1e-3), f"orchard vs torch max |diff| {err}"
                times = {n: [] for n in fns}
                for n, fn in fns.items():  # warm-up
                    with env_for(n):
                        fn()
                for _ in range(args.reps):
                    for n, fn in fns.items():
                        with env_for(n):
                            t0 = clock()
                            fn()
                            times[n].append(clock() - t0)
            med = {n: statistics.median(t) for n, t in times.items()}
            mn = {n: min(t) for n, t in times.items()}
            cell = lambda n: f"{1e3 * med[n]:.2f} ({1e3 * mn[n]:.2f})"  # noqa: E731
            print(f"| {b} | {s} | {hq}:{hkv} | {d} | {dname} | {cell('orchard')} | {cell('torch')} | "
                  f"{med['torch'] / med['orchard']:.2f}x |"
                  + (f" {cell('ab')} | {med['ab'] / med['orchard']:.2f} |" if args.ab else ""), flush=True)
            del k_cache, v_cache, kt, vt


if __name__ == "__main__":
    main()
