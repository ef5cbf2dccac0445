"""Timing table for the sm90 kernels' sliding window / softcap / ALiBi (issue #11 x #16), one
process, one card, same tensors: Orchard with the sm90 kernels (ORCHARD_SM90=1) and with the
sm80 kernels (ORCHARD_SM90=0, the A/B), FlexAttention (compiled; block mask / score_mod) and
torch SDPA where it has the feature (window: efficient + bool mask; ALiBi: efficient + the
bf16 bias (1, H, S, S); plain: flash and cuDNN; the plain rows check that the sm90 kernels'
plain path kept its speed: compare their cuDNN ratios with bench/RESULTS.md's). bf16, b2 s8k
h16, causal unless named, d128 (and d64 for the window and plain causal), as
bench/feature_bench.py. Forward (no grad) and forward + backward ms, median of 20
CUDA-event-timed calls after 3 warm-ups; TFLOP/s over the visible scores (4 d per score fwd,
3.5x that fwd+bwd). Before timing, each Orchard call is run once with the debug log on to
record which kernels it took (variant), and the sm90 results are compared with the sm80 ones
(max |diff| / max |sm80|) at these sizes.

    python3 dev/cuda/sm90feat_bench.py --out DIR [--go FILE] [--quick]
--go FILE: compile FlexAttention and warm everything first, print "ready", then wait until
FILE exists before timing (the compile overlaps other work that must not overlap timings).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard

DT = torch.bfloat16
DEV = "cuda"  # (a CPU smoke test of this script's plumbing sets it to "cpu")


def median_ms(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def set_sm90(on):
    os.environ["ORCHARD_SM90"] = "1" if on else "0"  # read by the dispatch on every call


def variants(fn):
    """The debug log's kernel variants of one fwd+bwd call of fn."""
    d = tempfile.mkdtemp()
    os.environ["ORCHARD_DEBUG_FLASH_ATN"], os.environ["ORCHARD_LOG_DIR"] = "1", d
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        del os.environ["ORCHARD_DEBUG_FLASH_ATN"]
    path = os.path.join(d, f"orchard_flash_attn_{os.getpid()}.log")
    out = []
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        out += [w.split("=", 1)[1] for w in line.split() if w.startswith("variant=")]
    return " ".join(out)


def build_cases(quick, s=0):
    s = s or (2048 if quick else 8192)
    b, h, left = 2, 16, 1024
    flex_fa, create_block_mask = None, None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex_fa = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print(f"[bench] FlexAttention unavailable: {e}", file=sys.stderr)
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEV, dtype=torch.float32)
    i = torch.arange(s, device=DEV)
    causal_vis = s * (s + 1) / 2
    win_vis = sum(min(r, left) + 1 for r in range(s))
    cases = []
    for name, d, kw, vis in (("plain causal", 128, dict(causal=True), causal_vis),
                             ("plain non-causal", 128, dict(), float(s) * s),
                             ("plain causal", 64, dict(causal=True), causal_vis),
                             (f"window causal left {left}", 128, dict(causal=True, window_size=(left, 0)), win_vis),
                             (f"window causal left {left}", 64, dict(causal=True, window_size=(left, 0)), win_vis),
                             ("softcap 50 causal", 128, dict(causal=True, softcap=50.0), causal_vis),
                             ("ALiBi causal", 128, dict(causal=True, alibi_slopes=slopes), causal_vis)):
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=DT, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(b, s, h, d, device=DEV, dtype=DT, generator=g)
        qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
        impls = []

        def orch(kw=kw, q=q, k=k, v=v):
            return orchard.flash_attn_func(q, k, v, **kw)
        impls.append(("orchard sm90", orch, True, do))
        impls.append(("orchard sm80 (ORCHARD_SM90=0)", orch, False, do))
        if flex_fa is not None and not name.startswith("plain"):
            if "window" in name:
                bm = create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki <= left), None, None, s, s,
                                       device=DEV)
                impls.append(("flex_attention", lambda bm=bm, qt=qt, kt=kt, vt=vt: flex_fa(qt, kt, vt, block_mask=bm),
                              None, dot))
            else:
                bm = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=DEV)
                if "softcap" in name:
                    def mod(score, b_, h_, qi, ki):
                        return 50.0 * torch.tanh(score / 50.0)
                else:
                    def mod(score, b_, h_, qi, ki):
                        return score - slopes[h_] * (qi - ki).abs()
                impls.append(("flex_attention",
                              lambda bm=bm, mod=mod, qt=qt, kt=kt, vt=vt: flex_fa(qt, kt, vt, score_mod=mod, block_mask=bm),
                              None, dot))
        if name.startswith("plain"):
            for iname, be in (("sdpa flash (FA2)", SDPBackend.FLASH_ATTENTION), ("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION)):
                def run(be=be, qt=qt, kt=kt, vt=vt, causal=kw.get("causal", False)):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                impls.append((iname, run, None, dot))
        elif "window" in name:
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= left)

            def run(mask=mask, qt=qt, kt=kt, vt=vt):
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
            impls.append(("sdpa efficient + bool mask", run, None, dot))
        elif "ALiBi" in name:
            dist = (i[:, None] - i[None, :]).abs().float()
            bias = torch.where(i[:, None] >= i[None, :], -slopes[:, None, None] * dist, float("-inf")).to(DT)[None]

            def run(bias=bias, qt=qt, kt=kt, vt=vt):
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)
            impls.append(("sdpa efficient + bf16 bias (1,H,S,S)", run, None, dot))
        cases.append(dict(name=name, d=d, b=b, s=s, h=h, flops=4.0 * b * h * d * vis, q=q, k=k, v=v, impls=impls))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--go", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--s", type=int, default=0, help="sequence length (default 8192, --quick 2048)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = build_cases(args.quick, args.s)
    # Warm up (FlexAttention compiles), record variants, compare sm90 with sm80.
    for c in cases:
        q, k, v = c["q"], c["k"], c["v"]
        res = {}
        for iname, fn, sm90, do in c["impls"]:
            if sm90 is not None:
                set_sm90(sm90)
            try:
                def fb(fn=fn, do=do):
                    out = fn()
                    return (out,) + torch.autograd.grad(out, (q, k, v), do)
                if sm90 is not None:
                    c.setdefault("variants", {})[iname] = variants(fb)
                res[iname] = [t.detach().transpose(1, 2) if iname.startswith(("flex", "sdpa")) and j == 0 else t.detach()
                              for j, t in enumerate(fb())]
            except Exception as e:  # noqa: BLE001
                c.setdefault("errors", {})[iname] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.synchronize()
        a, b = res.get("orchard sm90"), res.get("orchard sm80 (ORCHARD_SM90=0)")
        if a is not None and b is not None:
            c["sm90_vs_sm80"] = {n: float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
                                 for n, x, y in zip(("out", "dq", "dk", "dv"), a, b)}
        for peer in ("flex_attention",):
            p = res.get(peer)
            if a is not None and p is not None:
                c["sm90_vs_" + peer] = {n: float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
                                        for n, x, y in zip(("out", "dq", "dk", "dv"), a, p)}
        print(f"[warm] {c['name']} d{c['d']}: variants {c.get('variants')} sm90/sm80 rel diff {c.get('sm90_vs_sm80')}"
              f" errors {c.get('errors')}", flush=True)
        del res
    torch.cuda.empty_cache()
    print("ready", flush=True)
    if args.go:
        t0 = time.time()
        while not os.path.exists(args.go) and time.time() - t0 < 600:
            time.sleep(0.5)
    rows = []
    md = [f"## sm90 features ({torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, same process)", "",
          "| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | sm90 fwd / fwd+bwd speed vs this |",
          "|---|---|---|---|---|---|---|"]
    for c in cases:
        q, k, v = c["q"], c["k"], c["v"]
        times = {}
        for iname, fn, sm90, do in c["impls"]:
            if iname in c.get("errors", {}):
                md.append(f"| {c['name']} d{c['d']} | {iname} | failed: {c['errors'][iname][:60]} | | | | |")
                continue
            if sm90 is not None:
                set_sm90(sm90)

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn()

            def fb(fn=fn, do=do):
                out = fn()
                return torch.autograd.grad(out, (q, k, v), do)
            try:
                tf, tb = median_ms(fwd), median_ms(fb)
            except Exception as e:  # noqa: BLE001
                md.append(f"| {c['name']} d{c['d']} | {iname} | failed: {type(e).__name__} | | | | |")
                continue
            times[iname] = (tf, tb)
            rows.append(dict(case=c["name"], d=c["d"], impl=iname, fwd_ms=tf, fb_ms=tb,
                             fwd_tflops=c["flops"] / tf / 1e9, fb_tflops=3.5 * c["flops"] / tb / 1e9))
        base = times.get("orchard sm90")
        for iname, (tf, tb) in times.items():
            ratio = f"{tf / base[0]:.2f}x / {tb / base[1]:.2f}x" if base else ""
            md.append(f"| {c['name']} d{c['d']} | {iname} | {tf:.3f} | {c['flops'] / tf / 1e9:.0f} | {tb:.3f} | "
                      f"{3.5 * c['flops'] / tb / 1e9:.0f} | {ratio} |")
        print("\n".join(md[-len(times):]), flush=True)
    md += ["", "ratio = that impl's time / orchard sm90's time (> 1: sm90 faster).", "",
           "| case | variants (orchard sm90 / sm80 run) | max rel diff sm90 vs sm80 (out, dq, dk, dv) | vs flex |",
           "|---|---|---|---|"]
    for c in cases:
        fmt = lambda d_: ", ".join(f"{x:.1e}" for x in d_.values()) if d_ else ""
        md.append(f"| {c['name']} d{c['d']} | {' ; '.join((c.get('variants') or {}).values())} | "
                  f"{fmt(c.get('sm90_vs_sm80'))} | {fmt(c.get('sm90_vs_flex_attention'))} |")
    os.environ.pop("ORCHARD_SM90", None)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sm90feat_bench.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "sm90feat_bench.json"), "w") as f:
        json.dump(dict(rows=rows, checks=[{k: c.get(k) for k in ("name", "d", "variants", "sm90_vs_sm80",
                                                                  "sm90_vs_flex_attention", "errors")}
                                          for c in cases]), f, indent=1)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
