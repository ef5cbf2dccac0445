"""Per-call host overhead at tiny shapes: Orchard vs torch SDPA, forward and
forward+backward, on the CPU and on CUDA (issue 12, "Per-call overhead").

Each Orchard path is timed in its own process (the path is chosen at import):
  stable   orchard/_C_torch.so loaded: flash_attn_func -> C++ op (stable ABI)
  dlpack   ORCHARD_DISABLE_STABLE_OPS=1: the torch.library + DLPack path
SDPA (torch.nn.functional.scaled_dot_product_attention) runs in every process, on the
same tensors, so each row has its own peer. Rows:
  sdpa            F.scaled_dot_product_attention on the BHSD view (torch's pick of backend)
  flash_attn_func orchard.flash_attn_func (the drop-in, BSHD)
  orchard_sdpa    orchard.scaled_dot_product_attention (the SDPA drop-in, BHSD)
  op              torch.ops.orchard.flash_attn_forward (the public custom op)
  core            (CPU, forward) orchard._C.forward on DLPack capsules of preallocated
                  tensors: the C++ core's own time, kernel included (the floor)
Timers:
  CPU   300 back-to-back calls, best of 40 loops (1 thread), as wall time
        (perf_counter) and as the process's CPU time (process_time), which a loaded
        machine inflates less.
  CUDA  triton.testing.do_bench (median; L2 flushed before each call), the issue's
        method, and CUDA events around 1,000 back-to-back calls (µs/call), which is the
        host-bound rate when the host is slower than the kernel.
fwd+bwd: forward on requires_grad inputs + autograd.grad with a fixed dout. The two
halves are also timed apart, to say which one holds a gap: fwd(grad) (the forward on
requires_grad inputs, graph recorded, no backward) and bwd (autograd.grad over one
recorded graph, retain_graph=True, so only the backward runs).
decode: flash_attn_with_kvcache eager (b1, one query row, GQA 8:1, d64, one new k/v row
appended into a 1k cache; CHECK_DEVICE_INDICES off, as decode_bench.py, and on, the default:
one copy back and sync per call) against SDPA on the same cache (no append) - the host path of
one decode call.

    python bench/overhead_bench.py [--device cpu|cuda|all] [--out DIR] [--graph] [--profile]

--graph also checks that a CUDA-graph capture of flash_attn_func (fwd and fwd+bwd)
replays to the eager result, and times a replay.
--profile writes, per (device, path), torch.profiler tables of 50 fwd+bwd steps of
flash_attn_func and of SDPA (profile_<device>_<path>.txt under --out): per-op and per-CUDA-
runtime-call counts and host times (cudaLaunchKernel, cudaMemsetAsync, cudaFuncSetAttribute,
any cudaStreamSynchronize / cudaMalloc) and the kernels' device times, which say where a
fwd+bwd gap is: host Python, API calls, launches or kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PATHS = {"stable": {}, "dlpack": {"ORCHARD_DISABLE_STABLE_OPS": "1"}}
SHAPES = {  # (b, s, h, d, causal, dtype)
    "cpu": (1, 8, 1, 8, True, "float32"),
    "cuda": (1, 128, 16, 64, True, "bfloat16"),  # the shape
}


def cpu_time_us(fn, n=300, reps=40):
    """{"wall": best µs/call of perf_counter loops, "cpu": the same with the process's CPU
    time (time.process_time: all its threads), which a loaded machine inflates less}."""
    for _ in range(200):
        fn()
    wall = cpu = float("inf")
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        t1, c1 = time.perf_counter(), time.process_time()
        wall, cpu = min(wall, (t1 - t0) / n * 1e6), min(cpu, (c1 - c0) / n * 1e6)
    return {"wall": wall, "cpu": cpu}


def cuda_times_us(fn):
    import torch
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    n = 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    loop_us = start.elapsed_time(end) * 1e3 / n
    try:
        from triton.testing import do_bench
        bench_us = float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    except Exception:  # noqa: BLE001 (no triton: the loop figure only)
        bench_us = None
    return {"do_bench": bench_us, "loop": loop_us}


def decode_calls(device, dtype):
    """One eager decode step: flash_attn_with_kvcache (append 1 row, attend) and SDPA."""
    import torch
    import torch.nn.functional as F

    import orchard
    import orchard.kvcache as okv
    okv.CHECK_DEVICE_INDICES = False  # as decode_bench.py: no host sync for the index check
    b, hq, hkv, d, cap = 1, 8, 1, 64, 1024
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(b, 1, hq, d, device=device, dtype=dtype, generator=gen)
    kc, vc = (torch.randn(b, cap, hkv, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    kn, vn = (torch.randn(b, 1, hkv, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    seqlens = torch.full((b,), cap - 1, dtype=torch.int32, device=device)
    qb, kb, vb = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    def call():
        return orchard.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True)

    def checked():  # the default: cache_seqlens copied back and checked by the core (one sync)
        okv.CHECK_DEVICE_INDICES = True
        try:
            return call()
        finally:
            okv.CHECK_DEVICE_INDICES = False

    return {"flash_attn_with_kvcache": call, "flash_attn_with_kvcache (index check)": checked,
            "sdpa": lambda: F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)}


def profile_steps(device, calls, path):
    """torch.profiler over 50 steps of each call: op and CUDA-runtime tables to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with open(path, "w") as f:
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(50):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            f.write(f"== {name}: 50 fwd+bwd steps (counts are per 50 steps)\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            if device == "cuda":  # the kernels and memsets, by device time
                f.write("\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))
            f.write("\n\n")


def measure(device: str, graph: bool, profile_dir=None) -> dict:
    import torch
    import torch.nn.functional as F

    import orchard
    from orchard import _ops

    torch.set_num_threads(1)
    b, s, h, d, causal, dtype = SHAPES[device]
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    scale = 1.0 / d ** 0.5
    bh = lambda t: t.transpose(1, 2)  # noqa: E731

    fwd = {
        "sdpa": lambda: F.scaled_dot_product_attention(bh(q), bh(k), bh(v), is_causal=causal),
        "flash_attn_func": lambda: orchard.flash_attn_func(q, k, v, causal=causal),
        "orchard_sdpa": lambda: orchard.scaled_dot_product_attention(bh(q), bh(k), bh(v), is_causal=causal),
        "op": lambda: torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, False, 0.0, 0, 0, False),
    }

    def grad_step(run):
        def step():
            out = run()
            return torch.autograd.grad(out, (qg, kg, vg), dout)
        return step

    def grad_only(run):  # the forward with the graph recorded, no backward
        return lambda: run()

    def bwd_only(run):  # the backward of one recorded graph, again and again
        out = run()
        return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    fwdbwd = {
        "sdpa": grad_step(lambda: bh(F.scaled_dot_product_attention(bh(qg), bh(kg), bh(vg), is_causal=causal))),
        "flash_attn_func": grad_step(lambda: orchard.flash_attn_func(qg, kg, vg, causal=causal)),
        "orchard_sdpa": grad_step(lambda: bh(orchard.scaled_dot_product_attention(bh(qg), bh(kg), bh(vg),
                                                                                  is_causal=causal))),
        "op": grad_step(lambda: torch.ops.orchard.flash_attn_forward(qg, kg, vg, scale, causal, False, 0.0,
                                                                     0, 0, False)[0]),
    }
    if device == "cpu":
        from torch.utils.dlpack import to_dlpack
        out, lse = torch.empty_like(q), torch.empty(b, h, s)
        fwd["core"] = lambda: orchard._C.forward(to_dlpack(q), to_dlpack(k), to_dlpack(v), to_dlpack(out),
                                                 to_dlpack(lse), None, scale, causal, False, 0.0, 0, 0, 0,
                                                 "orchard.flash_attn_func")
    halves = {  # flash_attn_func's and SDPA's fwd+bwd split into its two halves
        "sdpa": lambda: bh(F.scaled_dot_product_attention(bh(qg), bh(kg), bh(vg), is_causal=causal)),
        "flash_attn_func": lambda: orchard.flash_attn_func(qg, kg, vg, causal=causal),
    }
    timer = cpu_time_us if device == "cpu" else cuda_times_us
    result = {"device": device, "shape": SHAPES[device], "stable_ops": getattr(_ops, "STABLE_OPS_STATUS", "n/a (a tree without them)"),
              "torch": torch.__version__, "fwd": {}, "fwd_bwd": {}, "fwd_grad": {}, "bwd": {}}
    for name, fn in fwd.items():
        result["fwd"][name] = timer(fn)
    for name, fn in fwdbwd.items():
        result["fwd_bwd"][name] = timer(fn)
    for name, run in halves.items():
        result["fwd_grad"][name] = timer(grad_only(run))
        result["bwd"][name] = timer(bwd_only(run))
    result["decode"] = {name: timer(fn) for name, fn in decode_calls(device, dtype).items()}
    if profile_dir is not None:
        profile_steps(device, {name: fwdbwd[name] for name in ("flash_attn_func", "sdpa")},
                      os.path.join(profile_dir, f"profile_{device}_{os.environ.get('OVERHEAD_PATH', 'x')}.txt"))
    if graph and device == "cuda":
        result["graph"] = graph_check(q, k, v, qg, kg, vg, dout, causal)
    return result


def graph_check(q, k, v, qg, kg, vg, dout, causal):
    """CUDA-graph capture of flash_attn_func: forward, and forward+backward."""
    import torch

    import orchard
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on the side stream (allocator pools, autograd)
            orchard.flash_attn_func(q, k, v, causal=causal)
            torch.autograd.grad(orchard.flash_attn_func(qg, kg, vg, causal=causal), (qg, kg, vg), dout)
    torch.cuda.current_stream().wait_stream(stream)
    g_fwd, g_bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_fwd):
        out = orchard.flash_attn_func(q, k, v, causal=causal)
    with torch.cuda.graph(g_bwd):
        grads = torch.autograd.grad(orchard.flash_attn_func(qg, kg, vg, causal=causal), (qg, kg, vg), dout)
    g_fwd.replay()
    g_bwd.replay()
    torch.cuda.synchronize()
    ref = orchard.flash_attn_func(q, k, v, causal=causal)
    ref_grads = torch.autograd.grad(orchard.flash_attn_func(qg, kg, vg, causal=causal), (qg, kg, vg), dout)
    ok = bool(torch.equal(out, ref)) and all(torch.equal(a, r) for a, r in zip(grads, ref_grads))
    return {"replay_matches_eager": ok, "fwd_replay": cuda_times_us(g_fwd.replay),
            "fwd_bwd_replay": cuda_times_us(g_bwd.replay)}


def fmt(cell):
    return " / ".join("n/a" if c is None else f"{c:.1f}" for c in cell.values())


def table(results) -> str:
    lines = []
    for r in results:
        b, s, h, d, causal, dtype = r["shape"]
        timer = "µs, wall / process CPU time, best of 40 loops" if r["device"] == "cpu" else "µs, do_bench median / back-to-back loop"
        lines.append(f"\n{r['device']} b{b} s{s} h{h} d{d} causal={causal} {dtype}, path {r['path']} "
                     f"(stable ops: {r['stable_ops']}; torch {r['torch']}); {timer}")
        lines.append("| call | fwd | fwd+bwd | fwd(grad) | bwd |")
        lines.append("|---|---|---|---|---|")
        for name in r["fwd"]:
            cells = [r[key].get(name) for key in ("fwd_bwd", "fwd_grad", "bwd")]
            lines.append(f"| {name} | {fmt(r['fwd'][name])} | " + " | ".join("-" if c is None else fmt(c) for c in cells)
                         + " |")
        for name, cell in r.get("decode", {}).items():
            lines.append(f"| decode: {name} | {fmt(cell)} | - | - | - |")
        if "graph" in r:
            g = r["graph"]
            lines.append(f"CUDA graph: replay matches eager: {g['replay_matches_eager']}; replay fwd "
                         f"{fmt(g['fwd_replay'])}, fwd+bwd {fmt(g['fwd_bwd_replay'])} µs")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    ap.add_argument("--path", default="all", choices=("stable", "dlpack", "all"))
    ap.add_argument("--graph", action="store_true", help="CUDA-graph capture check (CUDA)")
    ap.add_argument("--out", default=None, help="directory for overhead_bench.json (and the profiles)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of fwd+bwd (needs --out)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one (device, path) measurement, JSON on stdout
        print(json.dumps(measure(args.device, args.graph, args.out if args.profile else None)))
        return 0
    import torch
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [dv for dv in devices if dv == "cpu" or torch.cuda.is_available()]
    paths = list(PATHS) if args.path == "all" else [args.path]
    results = []
    for device in devices:
        for path in paths:
            env = {**os.environ, **PATHS[path], "OVERHEAD_PATH": path}
            if path == "stable":
                env.pop("ORCHARD_DISABLE_STABLE_OPS", None)
            cmd = [sys.executable, __file__, "--child", "--device", device] + (["--graph"] if args.graph else [])
            if args.profile and args.out:
                os.makedirs(args.out, exist_ok=True)
                cmd += ["--profile", "--out", args.out]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["path"] = path
            results.append(r)
            print(table([r]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "overhead_bench.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
