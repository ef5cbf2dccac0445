"""Per-call host time at a tiny CPU shape, where the kernel is ~nothing (issue 12,
"Per-call overhead"): Orchard's drop-ins vs torch SDPA, plus the layers under
Orchard's SDPA drop-in, to say where each extra µs goes.

b1 h2 s16 d16 fp32 causal, 1 thread; each row: 7 loops of n/7 calls after a warm-up,
the median µs/call (perf_counter wall time). The host path timed here is the one CUDA
runs (minus the stream); on a shared machine, run it twice and compare medians.

    PYTHONPATH=<site with orchard> python bench/overhead_tiny.py [--n 2000]
"""
from __future__ import annotations

import argparse

import time

import torch
import torch.nn.functional as F

import orchard
from orchard import _C, _ops


def bench(f, n):
    for _ in range(100):
        f()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n // 7):
            f()
        ts.append((time.perf_counter() - t) / (n // 7) * 1e6)
    return sorted(ts)[3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, 16, 16)
    qb, kb, vb = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gb = g.transpose(1, 2)
    qn, kn, vn = (t.detach() for t in (q, k, v))
    scale = 0.25

    def fwd(fn):
        def f():
            with torch.no_grad():
                fn(q, k, v, is_causal=True)
        return f

    def step(fn):
        def f():
            fn(q, k, v, is_causal=True).backward(g)
        return f

    def faf_fwd():
        with torch.no_grad():
            orchard.flash_attn_func(qb, kb, vb, causal=True)

    def faf_step():
        orchard.flash_attn_func(qb, kb, vb, causal=True).backward(gb)

    rows = [
        ("torch SDPA fwd (no_grad)", fwd(F.scaled_dot_product_attention)),
        ("torch SDPA fwd+bwd", step(F.scaled_dot_product_attention)),
        ("orchard.sdpa fwd (no_grad)", fwd(orchard.scaled_dot_product_attention)),
        ("orchard.sdpa fwd+bwd", step(orchard.scaled_dot_product_attention)),
        ("flash_attn_func fwd (no_grad)", faf_fwd),
        ("flash_attn_func fwd+bwd", faf_step),
    ]
    # fwd+bwd split: the forward with the graph recorded, and the backward of one graph
    # (retain_graph=True), so only the backward runs.
    for name, fn in (("torch SDPA", F.scaled_dot_product_attention),
                     ("orchard.sdpa", orchard.scaled_dot_product_attention)):
        o = fn(q, k, v, is_causal=True)
        rows.append((f"{name} fwd(grad)", lambda fn=fn: fn(q, k, v, is_causal=True)))
        rows.append((f"{name} bwd (retained graph)",
                     lambda o=o: torch.autograd.grad(o, (q, k, v), g, retain_graph=True)))
    # The layers under orchard.sdpa's no-grad forward (each row includes those below it).
    if _ops._SFWD_CALL is not None:
        rows.append(("  _ops.eager_forward", lambda: _ops.eager_forward(
            qn, kn, vn, scale, True, True, 0.0, False, False, "orchard.scaled_dot_product_attention",
            None, True, False)))
        rows.append(("  C++ op _flash_fwd_plain (dispatcher)", lambda: _ops._SFWD_CALL(
            qn, kn, vn, scale, True, True, 0.0, False, "orchard.scaled_dot_product_attention", None,
            True)))
    if _ops._ATEN_SDPA is not None and _ops._ATEN_LAYOUTS:
        rows.append(("  aten overrideable op (no autograd)", lambda: _ops._ATEN_SDPA(
            qn, kn, vn, None, 0.0, True, False, scale=scale)))
    # The core alone: orchard._C.forward on DLPack capsules of preallocated BSHD tensors.
    qs, ks, vs = (t.transpose(1, 2) for t in (qn, kn, vn))
    out, lse = torch.empty_like(qs), torch.empty(1, 2, 16)
    dl = torch.utils.dlpack.to_dlpack

    def core():
        _C.forward(dl(qs), dl(ks), dl(vs), dl(out), dl(lse), None, scale, True, True, 0.0, 0, 0, 0,
                   "orchard.scaled_dot_product_attention", None, None)
    rows.append(("  core: _C.forward on 5 capsules", core))
    rows.append(("  5 x to_dlpack alone", lambda: (dl(qs), dl(ks), dl(vs), dl(out), dl(lse))))
    print(f"orchard stable ops: {_ops.STABLE_OPS_STATUS}; aten route layouts: {sorted(_ops._ATEN_LAYOUTS)}")
    print("b1 h2 s16 d16 fp32 causal, 1 thread, median of 7 loops, µs/call")
    for name, f in rows:
        print(f"{name:40s} {bench(f, args.n):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
