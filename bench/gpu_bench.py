"""FlashAttention-grid benchmark: Orchard vs torch SDPA's flash / cuDNN /
efficient backends, timed in the same process on the same card.

Grid (FlashAttention paper's): bf16, head dim 64 and 128, model dim 2048
(heads = 2048 / d), batch * seqlen = 16k tokens, seqlen 512 .. 16k, causal and
not. FLOPs: 4*b*h*s*s*d forward (halved when causal), 2.5x that backward.
Timing (--timer, both recorded in the same run):
  events    CUDA events around each call, synchronizing after each (median of
            --reps): the time of one synchronous call, host-side work included
            (Python dispatch, autograd, allocation) while the GPU waits.
  do_bench  triton.testing.do_bench (median; L2 flushed before each call, calls
            back to back): the device time of a call when the host keeps the
            GPU queue full, as in a training loop. The issue's named method.
--timer picks which one the table shows (default do_bench); the other is in the
JSON and in a second, shorter table (Orchard vs SDPA flash).
--rounds N times every grid point N times, the implementations in a rotated order
each round (so a drift of the card's clocks lands on all of them), and reports the
median over the rounds; the JSON keeps each round and the table the largest spread
(max / min - 1 over the rounds) seen per implementation. With rounds, the ratios to the
peers are the median of each round's ratio (Orchard and the peer timed next to each other:
a drift between rounds cancels), and the table names the points whose per-round ratios fall
on both sides of 1.0. Single runs of this grid
put points up to 20 % apart (bench/RESULTS.md).

Writes JSON (+ PNG plot when matplotlib is present) and a markdown table to
--out, and prints the table last.

    python bench/gpu_bench.py --out $OUT [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_runner(backend):
    def run(q, k, v, causal):  # q: (B, S, H, D) -> SDPA wants (B, H, S, D)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            ).transpose(1, 2)
    return run


def orchard_runner(q, k, v, causal):
    return orchard.flash_attn_func(q, k, v, causal=causal)


IMPLS = {
    "orchard": orchard_runner,
    "sdpa_flash": sdpa_runner(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": sdpa_runner(SDPBackend.CUDNN_ATTENTION),
    "sdpa_efficient": sdpa_runner(SDPBackend.EFFICIENT_ATTENTION),
}


def do_bench_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_impl(run, b, s, h, d, causal, reps):
    """{timer: (fwd_ms, bwd_ms)} for both timers (module docstring)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    def fwd():
        with torch.no_grad():
            return run(q, k, v, causal)

    out = run(q, k, v, causal)

    def bwd():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    return {"events": (median_ms(fwd, reps), median_ms(bwd, reps)),
            "do_bench": (do_bench_ms(fwd), do_bench_ms(bwd))}


def rotated(items: list, r: int) -> list:
    """items in round r's order: each starts one place earlier than in the round before."""
    r %= max(len(items), 1)
    return items[r:] + items[:r]


def median_rounds(rounds: list[dict]) -> dict:
    """{timer: (fwd_ms, bwd_ms)} per round -> {timer: (median fwd_ms, median bwd_ms)}."""
    return {t: (statistics.median(x[t][0] for x in rounds), statistics.median(x[t][1] for x in rounds))
            for t in rounds[0]}


def paired_ratios(ours: list[dict], peer: list[dict]) -> dict:
    """Per round, the peer's time over ours (> 1: ours faster), for each timer and pass: the median
    over the rounds and the [min, max] range.  The two were timed next to each other in each round,
    so a drift of the card's clocks between rounds cancels in the ratio (the ratio of the medians
    mixes rounds).  Only the rounds both have (an implementation that failed stops early)."""
    n = min(len(ours), len(peer))
    out = {}
    for t in (ours[0] if n else {}):
        for i, phase in ((0, "fwd"), (1, "bwd")):
            r = [peer[k][t][i] / ours[k][t][i] for k in range(n)]
            out[f"{t}_{phase}"] = {"median": statistics.median(r), "range": [min(r), max(r)]}
    return out


def spread(values) -> float:
    """max / min - 1 (0 for one value)."""
    values = list(values)
    return max(values) / min(values) - 1 if min(values) > 0 else float("inf")


def profile_point(d: int, s: int, causal: int, out_dir: str, impls: list[str]) -> int:
    """Per implementation: each CUDA kernel's mean time per call (us), forward and backward
    profiled separately (the backward alone: its pre-pass, main kernel and dQ convert)."""
    from torch.profiler import ProfilerActivity, profile
    b, h = 16384 // s, 2048 // d
    os.makedirs(out_dir, exist_ok=True)
    calls = 10
    for name in impls:
        run = IMPLS[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for _ in range(3))
        dout = torch.randn_like(q)
        out = run(q, k, v, bool(causal))
        phases = {"fwd": lambda: run(q, k, v, bool(causal)),
                  "bwd": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)}
        lines = [f"=== {name}: d={d} s={s} causal={bool(causal)} b={b} h={h}, us per call (mean of {calls})"]
        for phase, step in phases.items():
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    step()
                torch.cuda.synchronize()
            kernels = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.time_range.elapsed_us() / calls
            total = sum(kernels.values())
            lines.append(f"  {phase}: {total:9.1f} us in {len(kernels)} kernels")
            for kname, us in sorted(kernels.items(), key=lambda x: -x[1]):
                lines.append(f"    {us:9.1f}  {100 * us / total:5.1f} %  {kname[:110]}")
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(out_dir, f"profile_{name}_d{d}_s{s}_c{causal}.txt"), "w") as f:
            f.write(text + "\n")
        del q, k, v, out
        torch.cuda.empty_cache()
    return 0


def git_commit() -> str:
    # ORCHARD_COMMIT first: device runs build an archived tree inside a repo copy whose
    # own git metadata names another commit.
    if os.environ.get("ORCHARD_COMMIT"):
        return os.environ["ORCHARD_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("ORCHARD_COMMIT", "unknown")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time each point this many times, implementations alternating (median reported)")
    ap.add_argument("--timer", choices=("do_bench", "events"), default="do_bench",
                    help="which timing the main table shows (both are measured)")
    ap.add_argument("--quick", action="store_true", help="s in {2k, 8k} only")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--dims", default="64,128", help="head dims of the grid (model dim 2048: h = 2048 // d)")
    ap.add_argument("--seqlens", default="", help="comma-separated, instead of the grid's (or --quick's)")
    ap.add_argument("--no-extras", action="store_true",
                    help="the grid only (no small-shape latency or s = 32k peak-memory rows)")
    ap.add_argument("--profile", default="", metavar="D,S,CAUSAL",
                    help="instead of the grid: each --impls' kernels (us per call, forward and backward "
                         "profiled apart) at grid points D,S,CAUSAL (',' or ':' between fields; several "
                         "points separated by ';' or '+', e.g. 128:2048:0+64:2048:1)")
    args = ap.parse_args()
    if args.profile:
        for point in args.profile.replace("+", ";").split(";"):
            profile_point(*(int(x) for x in point.replace(":", ",").split(",")), args.out, args.impls.split(","))
        return 0

    card = torch.cuda.get_device_name()
    seqlens = [2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    if args.seqlens:
        seqlens = [int(x) for x in args.seqlens.split(",")]
    impls = args.impls.split(",")
    rows = []
    for d in (int(x) for x in args.dims.split(",")):
        h = 2048 // d
        for causal in (False, True):
            for s in seqlens:
                b = 16384 // s
                flops = 4 * b * h * s * s * d // (2 if causal else 1)
                row = {"d": d, "causal": causal, "s": s, "b": b, "h": h}
                per_round = {name: [] for name in impls}
                for r in range(max(args.rounds, 1)):
                    for name in rotated(impls, r):
                        if name in row:  # failed in an earlier round
                            continue
                        try:
                            per_round[name].append(time_impl(IMPLS[name], b, s, h, d, causal, args.reps))
                        except Exception as e:  # a peer may not support a shape
                            row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                        torch.cuda.empty_cache()
                for name in impls:
                    if name in row:
                        continue
                    cell = {}
                    for timer, (fwd_ms, bwd_ms) in median_rounds(per_round[name]).items():
                        cell[timer] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_tflops": flops / fwd_ms / 1e9,
                                       "bwd_tflops": 2.5 * flops / bwd_ms / 1e9}
                    if len(per_round[name]) > 1:
                        cell["rounds"] = per_round[name]
                        cell["spread"] = max(spread(x[t][i] for x in per_round[name])
                                             for t in per_round[name][0] for i in (0, 1))
                    row[name] = {**cell[args.timer], **cell}
                if args.rounds > 1 and "orchard" in impls and "error" not in row["orchard"]:
                    row["orchard"]["paired"] = {p: paired_ratios(per_round["orchard"], per_round[p])
                                                for p in impls if p != "orchard" and "error" not in row[p]}
                rows.append(row)
                print(json.dumps(row), flush=True)

    # Per-call latency at a small shape (b=2, h=4, s=64, d=64).
    lat = {}
    impls_extra = [] if args.no_extras else impls
    q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name in impls_extra:
        try:
            with torch.no_grad():
                lat[name] = median_ms(lambda: IMPLS[name](q, k, v, False), 200, warmup=20) * 1000
        except Exception as e:
            lat[name] = f"{type(e).__name__}"

    # Peak memory, fwd+bwd at s = 32k (b=1, h=16, d=128).
    peak = {}
    for name in ("orchard", "sdpa_flash"):
        if name not in impls_extra:
            continue
        torch.cuda.empty_cache()
        q, k, v = (torch.randn(1, 32768, 16, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = IMPLS[name](q, k, v, True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del q, k, v, out

    meta = {"card": card, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "reps": args.reps, "timer": args.timer, "rounds": args.rounds}
    result = {"meta": meta, "grid": rows, "latency_us_small": lat, "peak_mib_s32k": peak}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=1)

    table = render_table(result, impls)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table)
    try:
        plot(result, impls, os.path.join(args.out, "gpu_bench.png"))
    except Exception as e:
        print(f"(no plot: {e})")
    print(table)
    return 0


def fmt(cell, key):
    return f"{cell[key]:.0f}" if key in cell else "err"


def unresolved_points(result, timer: str) -> list[str]:
    """'d128c s2k fwd vs sdpa_cudnn 0.96-1.03' for each paired ratio whose range contains 1.0."""
    found = []
    for r in result["grid"]:
        for p, pr in r.get("orchard", {}).get("paired", {}).items():
            for phase in ("fwd", "bwd"):
                lo, hi = pr[f"{timer}_{phase}"]["range"]
                if lo < 1.0 < hi:
                    found.append(f"d{r['d']}{'c' if r['causal'] else ''} s{r['s']} {phase} vs {p} {lo:.2f}-{hi:.2f}")
    return found


def render_table(result, impls):
    m = result["meta"]
    how = ("triton do_bench, median" if m.get("timer") == "do_bench" else
           f"CUDA events, synchronized per call, median of {m['reps']}")
    if m.get("rounds", 1) > 1:
        how += f"; median of {m['rounds']} alternating rounds"
    lines = [f"### {m['card']}, {m['date']}, commit {m['commit']}, torch {m['torch']} (TFLOP/s, {how})", ""]
    peers = [p for p in impls if p != "orchard"]
    hdr = "| d | causal | s | b | " + " | ".join(f"{p} fwd/bwd" for p in impls) + " | " + \
          " | ".join(f"vs {p} fwd/bwd" for p in peers) + " |"
    lines += [hdr, "|" + "---|" * (4 + len(impls) + len(peers))]
    for r in result["grid"]:
        cells = [str(r["d"]), "yes" if r["causal"] else "no", str(r["s"]), str(r["b"])]
        cells += [f"{fmt(r[p], 'fwd_tflops')}/{fmt(r[p], 'bwd_tflops')}" for p in impls]
        o = r.get("orchard", {})
        for p in peers:
            pr = o.get("paired", {}).get(p)
            if pr:  # several rounds: the median of the per-round ratios
                cells.append(f"{pr[m['timer'] + '_fwd']['median']:.2f}x/{pr[m['timer'] + '_bwd']['median']:.2f}x")
            elif "fwd_tflops" in o and "fwd_tflops" in r[p]:
                cells.append(f"{o['fwd_tflops'] / r[p]['fwd_tflops']:.2f}x/{o['bwd_tflops'] / r[p]['bwd_tflops']:.2f}x")
            else:
                cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    other = "events" if m.get("timer") == "do_bench" else "do_bench"
    if "sdpa_flash" in impls and "orchard" in impls:
        lines += ["", f"The other timer ({other}), Orchard vs SDPA flash fwd/bwd: " + ", ".join(
            f"d{r['d']}{'c' if r['causal'] else ''} s{r['s']} "
            f"{r['orchard'][other]['fwd_tflops'] / r['sdpa_flash'][other]['fwd_tflops']:.2f}x/"
            f"{r['orchard'][other]['bwd_tflops'] / r['sdpa_flash'][other]['bwd_tflops']:.2f}x"
            for r in result["grid"] if other in r.get("orchard", {}) and other in r.get("sdpa_flash", {}))]
    if m.get("rounds", 1) > 1:
        worst = {p: max((r[p].get("spread", 0.0) for r in result["grid"]), default=0.0) for p in impls}
        lines += ["", "Largest spread over the rounds at one point (max / min - 1, either timer): " +
                  ", ".join(f"{p} {100 * v:.1f} %" for p, v in worst.items())]
        lines += ["", "Ratios to the peers: the median over the rounds of each round's ratio (the two timed "
                  "next to each other). Points whose per-round ratios fall on both sides of 1.0 (not resolved "
                  "by this run): " + (", ".join(unresolved_points(result, m["timer"])) or "none")]
    lines += ["", "Per-call forward latency, b=2 h=4 s=64 d=64 (us): " +
              ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["latency_us_small"].items()),
              "", "Peak extra memory, causal fwd+bwd, b=1 h=16 s=32k d=128 (MiB): " +
              ", ".join(f"{k} {v:.0f}" for k, v in result["peak_mib_s32k"].items()), ""]
    return "\n".join(lines)


def plot(result, impls, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for col, (d, causal) in enumerate([(64, False), (64, True), (128, False), (128, True)]):
        rows = [r for r in result["grid"] if r["d"] == d and r["causal"] == causal]
        for row_i, key in enumerate(("fwd_tflops", "bwd_tflops")):
            ax = axes[row_i][col]
            for p in impls:
                xs = [r["s"] for r in rows if key in r[p]]
                ys = [r[p][key] for r in rows if key in r[p]]
                ax.plot(xs, ys, marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{key.split('_')[0]} d={d} causal={causal}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['meta']['card']} bf16, commit {result['meta']['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main())
