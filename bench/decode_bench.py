"""KV-cache decode benchmark for orchard.flash_attn_with_kvcache (issue #12).

    python bench/decode_bench.py [--out PATH] [--page-size 256] [--quick] [--flex]

On one GPU, bf16, d=128, one new query row per sequence (plain decode) with one
new k/v row appended into the cache each call (cache_seqlens = L - 1, so L keys
are attended), for batch {1, 8, 64} x cache length L {1k, 8k, 32k, 128k} x
(contiguous, paged; --layouts adds head_major) x (GQA 32 q heads : 4 kv heads, MHA 32 : 32).
Layouts: contiguous = flash-attn's (b, L, h_kv, d) cache; paged = (pages, page, h_kv, d)
through a random block_table; head_major = a (b, L, h_kv, d) view of SDPA's own
(b, h_kv, L, d) tensors (no copy: the same bytes in the same order as SDPA reads them).

Columns (microseconds, median of --reps CUDA-event timings after --warmup):
  orchard        eager call through the Python API (host overhead included; the
                 device index check is off: orchard.kvcache.CHECK_DEVICE_INDICES=False)
  orchard graph  the same call replayed from a CUDA graph (device time only)
  sdpa           torch.nn.functional.scaled_dot_product_attention on the same keys in
                 its preferred (b, h, L, d) contiguous layout, enable_gqa for GQA (no
                 append, no paging: SDPA has neither), whichever backend torch picks
  flex           (--flex) torch.compile'd flex_attention on the contiguous cache
  HBM bound      bytes of K/V read / device-to-device copy bandwidth measured in
                 this run (torch copy_ of a 2 GiB buffer: 2 x bytes / time)
  vs bound       orchard graph / HBM bound (goal <= 1.2)
  vs sdpa        orchard eager / sdpa (goal <= 1.0)
  splits         the split-KV count the heuristic chose (num_splits=0)
  max|diff|      orchard vs sdpa output on that point (a sanity check)

Points that do not fit in memory (caches + SDPA copy over --mem-fraction of the
free memory) are listed as skipped. Each row is written as soon as it is measured:
the markdown file (--out, default $OUT/decode_bench.md or ./decode_bench.md) is
rewritten after every point, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

try:
    import orchard
    import orchard.kvcache as okv
except Exception as e:  # noqa: BLE001
    print(f"decode_bench: cannot import orchard: {e}", file=sys.stderr)
    raise

from gpu_bench import median_ms  # the grid's CUDA-event timer (bench/ is the script's directory)


SMOKE = False  # --smoke: tiny shapes on the CPU (tests this script without a GPU)


def time_us(fn, warmup, reps):
    if SMOKE:
        import time
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return median_ms(fn, reps, warmup) * 1e3


def time_us_batched(fn, warmup, reps, inner):
    """Median over reps of (time of `inner` back-to-back calls) / inner: for calls of a few us."""
    if SMOKE:
        return time_us(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth(nbytes=2 << 30):
    if SMOKE:
        nbytes = 64 << 20
    a = torch.empty(nbytes, dtype=torch.uint8, device="cpu" if SMOKE else "cuda")
    b = torch.empty_like(a)
    a.random_()
    us = time_us(lambda: b.copy_(a), 3, 20)
    del a, b
    if not SMOKE:
        torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6)  # bytes / s (read + write)


def lab(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def fmt(x, nd=1):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--lengths", default="1024,8192,32768,131072")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--mem-fraction", type=float, default=0.7)
    ap.add_argument("--layouts", default="contiguous,paged", help="comma list of contiguous, paged, head_major")
    ap.add_argument("--quick", action="store_true", help="batch {1, 8} x L {1k, 32k} only")
    ap.add_argument("--flex", action="store_true", help="also time torch.compile'd flex_attention (slow to compile)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: tests the script, no timing value")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    if SMOKE:
        args.batches, args.lengths, args.page_size, args.reps = "1,2", "256,512", 64, 1
    elif not torch.cuda.is_available():
        sys.exit("decode_bench: needs a CUDA GPU")
    if not SMOKE and not orchard.build_info().get("cuda_compiled"):
        sys.exit("decode_bench: this orchard build has no CUDA backend (ORCHARD_CUDA=ON needed)")
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "decode_bench.md")
    batches = [int(x) for x in args.batches.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        batches, lengths = [1, 8], [1024, 32768]
    layouts = args.layouts.split(",")
    if any(x not in ("contiguous", "paged", "head_major") for x in layouts):
        sys.exit(f"decode_bench: unknown layout in --layouts {args.layouts}")
    okv.CHECK_DEVICE_INDICES = False
    torch.manual_seed(0)
    dev = torch.device("cpu" if SMOKE else "cuda")
    dtype = torch.bfloat16
    d, hq = 128, 32
    page = args.page_size

    bw = copy_bandwidth()
    props = (torch.cuda.get_device_properties(dev) if not SMOKE
             else argparse.Namespace(name="cpu (smoke)", multi_processor_count=os.cpu_count()))
    header = [
        "# Decode (flash_attn_with_kvcache) latency",
        "",
        f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {props.name} ({props.multi_processor_count} SMs), "
        f"torch {torch.__version__}, orchard {orchard.__version__}; bf16, d={d}, {hq} q heads, 1 query row, "
        f"1 appended k/v row per call, page size {page} for paged rows. Copy bandwidth measured in this run: "
        f"{bw / 1e9:.0f} GB/s. Times in us (median of {args.reps}).",
        "",
        "| heads | batch | cache L | layout | orchard | orchard graph | sdpa | flex | HBM bound | vs bound | vs sdpa "
        "| splits | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []

    def write():
        with open(out_path, "w") as f:
            f.write("\n".join(header + rows) + "\n")

    write()
    flex = None
    if args.flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"flex_attention unavailable: {e}", file=sys.stderr)

    def point(hkv, hname, b, L):
        """Measures one (heads, batch, L) point in each layout; appends rows. Tensors die on return."""
        kv_bytes = 2 * b * L * hkv * d * 2  # K and V, bf16
        bound_us = kv_bytes / bw * 1e6
        gqa = hkv != hq
        q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
        k_new = torch.randn(b, 1, hkv, d, device=dev, dtype=dtype)
        v_new = torch.randn(b, 1, hkv, d, device=dev, dtype=dtype)
        seqlens = torch.full((b,), L - 1, dtype=torch.int32, device=dev)
        # SDPA's copy: (b, h, L, d) contiguous, holding the appended row already.
        k_sdpa = torch.randn(b, hkv, L, d, device=dev, dtype=dtype)
        v_sdpa = torch.randn(b, hkv, L, d, device=dev, dtype=dtype)
        k_sdpa[:, :, L - 1] = k_new[:, 0]
        v_sdpa[:, :, L - 1] = v_new[:, 0]
        q_sdpa = q.transpose(1, 2)

        def sdpa():
            return F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, enable_gqa=gqa)

        ref, sdpa_us, flex_us = None, None, None
        try:
            ref = sdpa().transpose(1, 2)
            sdpa_us = time_us(sdpa, args.warmup, args.reps)
        except Exception as e:  # noqa: BLE001
            print(f"sdpa failed at b={b} L={L} {hname}: {e}", file=sys.stderr)
        if flex is not None:
            try:
                flex_us = time_us(lambda: flex(q_sdpa, k_sdpa, v_sdpa, enable_gqa=gqa), 3, args.reps)
            except Exception as e:  # noqa: BLE001
                print(f"flex failed at b={b} L={L} {hname}: {e}", file=sys.stderr)
        for layout in layouts:
            kw = {}
            if layout == "contiguous":
                k_cache = k_sdpa.transpose(1, 2).contiguous()
                v_cache = v_sdpa.transpose(1, 2).contiguous()
            elif layout == "head_major":  # views: the append writes SDPA's tensors (row L - 1 is k_new already)
                k_cache = k_sdpa.transpose(1, 2)
                v_cache = v_sdpa.transpose(1, 2)
            else:
                per_seq = -(-L // page)
                table = torch.randperm(b * per_seq, device=dev).view(b, per_seq).to(torch.int32)
                k_cache = torch.zeros(b * per_seq, page, hkv, d, device=dev, dtype=dtype)
                v_cache = torch.zeros_like(k_cache)
                for bi in range(b):  # scatter sequence bi's pages (one sequence of temporaries at a time)
                    for src, dst in ((k_sdpa, k_cache), (v_sdpa, v_cache)):
                        rows_bi = torch.zeros(per_seq * page, hkv, d, device=dev, dtype=dtype)
                        rows_bi[:L] = src[bi].transpose(0, 1)
                        dst[table[bi].long()] = rows_bi.view(per_seq, page, hkv, d)
                kw["block_table"] = table

            def run():
                return orchard.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                                       cache_seqlens=seqlens, **kw)

            out = run()
            splits = okv.last_num_splits
            diff = None if ref is None else (out.float() - ref.float()).abs().max().item()
            eager_us = time_us(run, args.warmup, args.reps)
            graph_us = None
            try:
                if SMOKE:
                    raise RuntimeError("no CUDA graphs in --smoke")
                g = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(g):
                    run()
                graph_us = time_us_batched(g.replay, 3, args.reps, 10)
                del g
            except Exception as e:  # noqa: BLE001
                print(f"graph capture failed at b={b} L={L} {layout}: {e}", file=sys.stderr)
            best = graph_us if graph_us is not None else eager_us
            rows.append(
                f"| {hname} | {b} | {lab(L)} | {layout} | {fmt(eager_us)} | {fmt(graph_us)} | "
                f"{fmt(sdpa_us)} | {fmt(flex_us)} | {fmt(bound_us)} | {fmt(best / bound_us, 2)} | "
                f"{fmt(None if sdpa_us is None else eager_us / sdpa_us, 2)} | {splits} | {fmt(diff, 4)} |")
            print(rows[-1], flush=True)
            write()
            del k_cache, v_cache, kw, out

    for hkv, hname in ((4, "GQA 32:4"), (32, "MHA 32:32")):
        for b in batches:
            for L in lengths:
                kv_bytes = 2 * b * L * hkv * d * 2
                if not SMOKE:
                    torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0] if not SMOKE else 8 << 30
                if 2.2 * kv_bytes > args.mem_fraction * free:  # SDPA's copy + orchard's cache
                    rows.append(f"| {hname} | {b} | {lab(L)} | both | skipped: {2.2 * kv_bytes / 2**30:.0f} GiB "
                                f"needed, {free / 2**30:.0f} GiB free | | | | | | | | |")
                    write()
                    continue
                try:
                    point(hkv, hname, b, L)
                except torch.OutOfMemoryError:
                    rows.append(f"| {hname} | {b} | {lab(L)} | - | out of memory | | | | | | | | |")
                    write()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append(f"| {hname} | {b} | {lab(L)} | - | error (see stderr) | | | | | | | | |")
                    write()
                if not SMOKE:
                    torch.cuda.empty_cache()
    rows.append("")
    rows.append("splits: the split-KV count the call used (num_splits=0: the heuristic). GQA 32:4 puts the 8 query "
                "heads of a kv head in one CTA, so each K/V row is read once.")
    write()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
