"""CPU benchmark: Orchard's CPU backend vs torch's CPU SDPA (which dispatches
to its own fused flash-attention CPU kernel), same process, same threads,
same tensors, the two interleaved rep by rep.

    OMP_NUM_THREADS=2 python bench/cpu_bench.py [--reps 5] [--min-time 0.5] [--grid quick|full] [--clock cpu|wall]
        [--ab ORCHARD_CPU_POOL=1]

--ab NAME=VALUE adds a third contestant, Orchard with that environment variable
set around each of its calls (for switches the C++ side reads per call, e.g.
ORCHARD_CPU_POOL=1: Orchard's own pool instead of the OpenMP loops), interleaved
with the other two; its columns give ms and the ratio Orchard-with-it / Orchard
(> 1: the default is faster).

The default clock is the process's CPU time (time.process_time), min over
reps: on a shared machine other jobs inflate wall time but not our CPU time.
(CPU time counts OpenMP threads spinning at barriers, so load imbalance
still shows.) With more than one thread use --clock wall: Linux adds the other
threads' CPU time to the process clock only at scheduler ticks, so 2-thread CPU
times came out in 4 ms steps (16.0, 24.0, 56.0 ms ...) on the dev box. Prints a markdown table: ms per call and ratio torch/orchard
(> 1: Orchard faster) for fwd (no grad) and fwd+bwd (forward with grad,
then autograd.grad). FLOPs: 4*b*h*s*s*d fwd, halved causal, x2.5 bwd.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

import orchard

GRIDS = {
    # (b, h, s, d): h shrinks with s so one call stays under ~1 s on one core.
    "quick": [(1, 8, 1024, 64), (1, 4, 1024, 128)],
    "full": [(1, 8, 512, 64), (1, 8, 512, 128), (1, 4, 2048, 64), (1, 4, 2048, 128),
             (1, 2, 4096, 64), (1, 2, 4096, 128), (1, 1, 8192, 64), (1, 1, 8192, 128)],
    # the full grid's s = 512 shapes: where per-call overhead shows at 16 threads
    "small": [(1, 8, 512, 64), (1, 8, 512, 128)],
    # the full grid's s >= 2k shapes: long enough for 2-thread CPU time (see above)
    "large": [(1, 4, 2048, 64), (1, 4, 2048, 128), (1, 2, 4096, 64), (1, 2, 4096, 128),
              (1, 1, 8192, 64), (1, 1, 8192, 128)],
}


def run_heading(title, clock, how):
    """Sets torch's threads from OMP_NUM_THREADS; returns (threads, a markdown heading naming
    the machine, threads, date, commit, torch and the clock). An archived tree on the device
    names its commit in ORCHARD_COMMIT (dev/gpu_session.sh)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    commit = os.environ.get("ORCHARD_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    return threads, (f"### {title}: {platform.processor() or platform.machine()}, {threads} threads, "
                     f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}Z, commit {commit}, "
                     f"torch {torch.__version__}, {clock} time, {how}\n")


# Switches the C++ side reads once per process (README's variable table): --ab cannot A/B them.
READ_ONCE = ("ORCHARD_CPU_AMX", "ORCHARD_CPU_AMX_BM", "ORCHARD_CPU_AMX_BN", "ORCHARD_CPU_FP32_AMX",
             "ORCHARD_CPU_GEMM512", "ORCHARD_CPU_DROPOUT512", "ORCHARD_CPU_SOFTMAX")


def ab_switch(spec):
    """--ab NAME=VALUE: returns env_for(contestant), a context manager that sets the
    variable around the "ab" contestant's calls only (a no-op for the others)."""
    name, _, value = spec.partition("=")
    if name in READ_ONCE:
        raise SystemExit(f"cpu_bench: {name} is read once per process, so --ab would time the default "
                         f"twice; run two processes instead ({name}={value} python bench/cpu_bench.py ...)")

    @contextlib.contextmanager
    def env_for(contestant):
        if contestant != "ab" or not name:
            yield
            return
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return env_for


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds: more reps (up to 100) where --reps rounds of a point take less")
    ap.add_argument("--grid", default="quick", choices=sorted(GRIDS))
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--ab", default="", help="NAME=VALUE: also time Orchard with this env var set")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    _, heading = run_heading("CPU", args.clock, f"min of {args.reps}+ (>= {args.min_time} s per point)")
    print(heading)
    ab_head = f" orchard {args.ab} fwd / f+b ms | its time / default's fwd / f+b |" if args.ab else ""
    print("| b,h,s,d | dtype | causal | orchard fwd / f+b ms | torch fwd / f+b ms | ratio fwd | ratio f+b |"
          + ab_head)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.ab else ""), flush=True)

    def ms(t):  # "-" for a phase not timed (--no-bwd)
        return "-" if math.isinf(t) else f"{1e3 * t:.1f}"

    env_for = ab_switch(args.ab)
    ratios = []
    for (b, h, s, d) in GRIDS[args.grid]:
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            for causal in [bool(int(c)) for c in args.causal.split(",")]:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(b, h, s, d, dtype=dtype, generator=g).requires_grad_()
                           for _ in range(3))
                dout = torch.randn(b, h, s, d, dtype=dtype, generator=g)
                fns = {"orchard": orchard.scaled_dot_product_attention,
                       "torch": F.scaled_dot_product_attention}
                if args.ab:
                    fns["ab"] = orchard.scaled_dot_product_attention

                def fwd(fn):
                    with torch.no_grad():
                        fn(q, k, v, is_causal=causal)

                def fwdbwd(fn):
                    out = fn(q, k, v, is_causal=causal)
                    torch.autograd.grad(out, (q, k, v), dout)

                best = {(n, ph): math.inf for n in fns for ph in ("f", "fb")}
                phases = [("f", fwd)] + ([] if args.no_bwd else [("fb", fwdbwd)])
                t_round = time.perf_counter()
                for n, fn in fns.items():  # warm-up, and one round's time
                    for _, ph in phases:
                        with env_for(n):
                            ph(fn)
                t_round = time.perf_counter() - t_round
                # Small calls (s512: ~1 ms) vary more than min of 5 catches: enough rounds for min_time.
                reps = max(args.reps, min(100, math.ceil(args.min_time / max(t_round, 1e-6))))
                for _ in range(reps):
                    for n, fn in fns.items():
                        for name, ph in phases:
                            with env_for(n):
                                t0 = clock()
                                ph(fn)
                                best[(n, name)] = min(best[(n, name)], clock() - t0)
                rf = best[("torch", "f")] / best[("orchard", "f")]
                rb = best[("torch", "fb")] / best[("orchard", "fb")] if not args.no_bwd else math.nan
                ratios += [rf] + ([] if args.no_bwd else [rb])
                print(f"| {b},{h},{s},{d} | {dname} | {causal} | "
                      f"{ms(best[('orchard', 'f')])} / {ms(best[('orchard', 'fb')])} | "
                      f"{ms(best[('torch', 'f')])} / {ms(best[('torch', 'fb')])} | "
                      f"{rf:.2f}x | {'-' if args.no_bwd else f'{rb:.2f}x'} |" + (
                          f" {ms(best[('ab', 'f')])} / {ms(best[('ab', 'fb')])} | "
                          f"{best[('ab', 'f')] / best[('orchard', 'f')]:.2f} / "
                          f"{best[('ab', 'fb')] / best[('orchard', 'fb')]:.2f} |" if args.ab else ""),
                      flush=True)
    gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"\ngeomean ratio {gm:.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
