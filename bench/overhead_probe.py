"""Where the CUDA per-call gap of training steps goes (issue 12): one short GPU run.

overhead_bench.py's do_bench figures (L2 flushed before each call) and its back-to-back
loop figures disagreed for fwd+bwd (session 8, H200: Orchard 234 vs SDPA 138 µs do_bench,
but 154 vs 166 µs in the loop). do_bench measures device time between two events with a
~256 MB memset (tens of µs of GPU work) queued just before the call: host work shorter
than the memset is hidden, so a call pays there only for host time past the memset - or
for anything that WAITS on the GPU (a sync, a blocking query), which a loop on an idle
GPU hardly sees. This script tells the two apart, per call:

  host_idle   host wall µs of the call, the GPU idle when it starts (median)
  host_busy   the same with the flush memset queued just before it (the do_bench
              condition): host_busy >> host_idle means the call waits on the GPU
  dev_busy    device µs between events around the call after the flush = do_bench's figure
  flush       device µs of the flush memset alone (what host work it hides)

Calls: SDPA and orchard.flash_attn_func forward, forward with grad (graph recorded and
dropped), backward (retained graph), full step; the stable C++ ops alone (no autograd);
a trivial autograd node both ways - `clone` (C++ node) and a Python autograd.Function
doing the same clone - which prices a Python node on CUDA (the backward runs on autograd's
CUDA device thread, with GIL hand-offs) apart from Orchard's own work; and the two routes
of a training call (_ops.py: the Python autograd.Function, or the aten op
_scaled_dot_product_fused_attention_overrideable with torch's C++ node) for the SDPA
drop-in on (B, H, S, D) tensors and for flash_attn_func (transposed views), against SDPA.
--profile also writes torch.profiler tables (CPU + CUDA) of flushed steps: a long
cudaStreamSynchronize / cudaEventSynchronize / cudaMemcpy names the waiting call.

    python bench/overhead_probe.py [--out DIR] [--profile] [--reps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke test of this script (fp32, no events: dev_busy/flush are host µs)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("overhead_probe: no CUDA device", file=sys.stderr)
        return 2
    import orchard
    from orchard import _ops

    torch.set_num_threads(1)
    b, s, h, d = 1, 128, 16, 64  # the shape, causal bf16
    dtype = torch.bfloat16
    if dev == "cpu":  # smoke test: a tiny fp32 problem, host clocks for the device ones
        b, s, h, d, dtype = 1, 8, 1, 8, torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device=dev, dtype=dtype, generator=gen) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    bh = lambda t: t.transpose(1, 2)  # noqa: E731
    scale = d ** -0.5
    flush_buf = torch.empty(int(256e6 // 4) if dev == "cuda" else 1024, dtype=torch.int32, device=dev)  # do_bench's

    class HostEvent:  # --device cpu: torch.cuda.Event's interface on the host clock
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def event():
        return torch.cuda.Event(enable_timing=True) if dev == "cuda" else HostEvent()

    def sdpa(x, y, z):
        return bh(F.scaled_dot_product_attention(bh(x), bh(y), bh(z), is_causal=True))

    def faf(x, y, z):
        return orchard.flash_attn_func(x, y, z, causal=True)

    class PyClone(torch.autograd.Function):  # a Python node doing what clone's C++ node does
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    calls = {
        "sdpa fwd": lambda: sdpa(q, k, v),
        "faf fwd": lambda: faf(q, k, v),
        "sdpa fwd(grad)": lambda: sdpa(qg, kg, vg),
        "faf fwd(grad)": lambda: faf(qg, kg, vg),
        "sdpa step": lambda: torch.autograd.grad(sdpa(qg, kg, vg), (qg, kg, vg), dout),
        "faf step": lambda: torch.autograd.grad(faf(qg, kg, vg), (qg, kg, vg), dout),
        "clone step (C++ node)": lambda: torch.autograd.grad(qg.clone(), (qg,), dout),
        "PyClone step (Python node)": lambda: torch.autograd.grad(PyClone.apply(qg), (qg,), dout),
    }
    # The routes of a training call (_ops: the Python autograd.Function, or the aten op with
    # torch's C++ node, ORCHARD_ATEN_AUTOGRAD): the SDPA drop-in on (B, H, S, D) tensors and
    # flash_attn_func, each both ways; `layouts` is what _ops._ATEN_LAYOUTS is set to.
    qb, kb, vb = (bh(t).contiguous().requires_grad_() for t in (q, k, v))
    doutb = bh(dout).contiguous()
    routed = {
        "sdpa step (bhsd)": (lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(qb, kb, vb, is_causal=True), (qb, kb, vb), doutb), None),
        "orchard sdpa step (bhsd) [Function]": (lambda: torch.autograd.grad(
            orchard.scaled_dot_product_attention(qb, kb, vb, is_causal=True), (qb, kb, vb), doutb), frozenset()),
        "orchard sdpa step (bhsd) [aten]": (lambda: torch.autograd.grad(
            orchard.scaled_dot_product_attention(qb, kb, vb, is_causal=True), (qb, kb, vb), doutb),
            frozenset((True,))),
        "faf step [Function]": (calls["faf step"], frozenset()),
        "faf step [aten, transposed views]": (calls["faf step"], frozenset((True, False))),
    }
    out_s, out_f = sdpa(qg, kg, vg), faf(qg, kg, vg)
    calls["sdpa bwd(retained)"] = lambda: torch.autograd.grad(out_s, (qg, kg, vg), dout, retain_graph=True)
    calls["faf bwd(retained)"] = lambda: torch.autograd.grad(out_f, (qg, kg, vg), dout, retain_graph=True)
    if _ops._SFWD_CALL is not None:  # the stable C++ ops alone (no autograd, no Python checks)
        o, lse, _ = _ops._SFWD_CALL(q, k, v, scale, True, False, 0.0, False, "probe", None, False)
        calls["C++ op fwd"] = lambda: _ops._SFWD_CALL(q, k, v, scale, True, False, 0.0, False, "probe", None, False)
        calls["C++ op bwd"] = lambda: _ops._SBWD_CALL(dout, q, k, v, o, lse, scale, True, False, 0.0, False,
                                                      "probe", None, False)

    def measure(fn, reps):
        for _ in range(20):
            fn()
        sync()
        idle, busy, devt, flush = [], [], [], []
        e0, e1, e2 = (event() for _ in range(3))
        for _ in range(reps):  # GPU idle at the call
            sync()
            t0 = time.perf_counter()
            fn()
            idle.append((time.perf_counter() - t0) * 1e6)
        for _ in range(reps):  # the flush queued first (do_bench's condition)
            sync()
            e0.record()
            flush_buf.zero_()
            e1.record()
            t0 = time.perf_counter()
            fn()
            busy.append((time.perf_counter() - t0) * 1e6)
            e2.record()
            e2.synchronize()
            flush.append(e0.elapsed_time(e1) * 1e3)
            devt.append(e1.elapsed_time(e2) * 1e3)
        med = statistics.median
        return {"host_idle": med(idle), "host_busy": med(busy), "dev_busy": med(devt), "flush": med(flush)}

    res = {"torch": torch.__version__, "card": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "stable_ops": _ops.STABLE_OPS_STATUS, "calls": {}}
    default_layouts = getattr(_ops, "_ATEN_LAYOUTS", None)
    res["aten_route_default"] = sorted(default_layouts) if default_layouts is not None else "n/a"
    for name, fn in calls.items():
        res["calls"][name] = measure(fn, args.reps)
    for name, (fn, layouts) in routed.items():
        if layouts is not None:
            if default_layouts is None or (layouts and getattr(_ops, "_ATEN_SDPA", None) is None):
                continue  # a tree without the aten route
            _ops._ATEN_LAYOUTS = layouts
        try:
            res["calls"][name] = measure(fn, args.reps)
        finally:
            if default_layouts is not None:
                _ops._ATEN_LAYOUTS = default_layouts
    lines = [f"overhead_probe ({res['card']}, torch {res['torch']}, stable ops {res['stable_ops']}), "
             f"b{b} s{s} h{h} d{d} causal {dtype}, medians in µs",
             "| call | host_idle | host_busy | dev_busy (do_bench) | flush |", "|---|---|---|---|---|"]
    for name, r in res["calls"].items():
        lines.append(f"| {name} | {r['host_idle']:.1f} | {r['host_busy']:.1f} | {r['dev_busy']:.1f} | {r['flush']:.1f} |")
    text = "\n".join(lines)
    print(text, flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "overhead_probe.json"), "w") as f:
            json.dump(res, f, indent=1)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with open(os.path.join(args.out, "overhead_probe_profile.txt"), "w") as f:
                for name in ("faf step", "sdpa step"):
                    fn = calls[name]
                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                    with profile(activities=acts) as prof:
                        for _ in range(30):
                            sync()
                            flush_buf.zero_()
                            fn()
                        sync()
                    f.write(f"== {name}: 30 steps, each after the flush memset\n")
                    f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                    f.write("\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
