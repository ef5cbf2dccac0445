"""Timing table for the sm90 kernels' sliding window / softcap / ALiBi (issue #11 x #16), one
process, one card, same tensors: Orchard with the sm90 kernels (ORCHARD_SM90=1), FlexAttention (compiled; block mask / score_mod) and
torch SDPA where it has the feature (window: efficient + bool mask; ALiBi: efficient + the
bf16 bias (1, H, S, S); plain: flash and cuDNN; the plain rows check that the sm90 kernels'
plain path kept its speed: compare their cuDNN ratios with bench/RESULTS.md's). bf16, b2 s8k
h16, causal unless named, d128 (and d64 for the window and plain causal), as
bench/feature_bench.py. Forward (no grad) and forward + backward ms, median of 20
CUDA-event-timed calls after 3 warm-ups; TFLOP/s over the visible scores (4 d per score fwd,
3.5x that fwd+bwd). Before timing, each Orchard call is run once with the debug log on to
record which kernels it took (variant). The backend reads ORCHARD_SM90 once per process, so the
sm80 A/B (ORCHARD_SM90=0) is a child process run after the parent's timings (same seeds, so the
same tensors; nothing else on the GPU meanwhile); its outputs are compared with the sm90 ones
(max |diff| / max |sm80|) at these sizes.

    python3 dev/cuda/sm90feat_bench.py --out DIR [--go FILE] [--quick] [--s S] [--d D]
--go FILE: compile FlexAttention and warm everything first, print "ready", then wait until
FILE exists before timing (the compile overlaps other work that must not overlap timings).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "sm90"))
from peer_timing import time_ms as median_ms  # noqa: E402  (bench/sm90: the CUDA-event median)

DT = torch.bfloat16
DEV = "cuda"  # (a CPU smoke test of this script's plumbing sets it to "cpu")


SM80 = "orchard sm80 (ORCHARD_SM90=0, child process)"


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


def build_cases(quick, s=0, orchard_only=False, flex=True, d=0):
    s = s or (2048 if quick else 8192)
    b, h, left = 2, 16, 1024
    flex_fa, create_block_mask = None, None
    try:
        if flex and not orchard_only:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex_fa = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print(f"[bench] FlexAttention unavailable: {e}", file=sys.stderr)
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEV, dtype=torch.float32)
    i = torch.arange(s, device=DEV)
    causal_vis = s * (s + 1) / 2
    win_vis = sum(min(r, left) + 1 for r in range(s))
    cases = []
    grid = (("plain causal", 128, dict(causal=True), causal_vis),
            ("plain non-causal", 128, dict(), float(s) * s),
            ("plain causal", 64, dict(causal=True), causal_vis),
            (f"window causal left {left}", 128, dict(causal=True, window_size=(left, 0)), win_vis),
            (f"window causal left {left}", 64, dict(causal=True, window_size=(left, 0)), win_vis),
            ("softcap 50 causal", 128, dict(causal=True, softcap=50.0), causal_vis),
            ("ALiBi causal", 128, dict(causal=True, alibi_slopes=slopes), causal_vis))
    if d:  # --d: the plain causal, window, softcap and ALiBi rows at that head dim only
        grid = tuple((name, d, kw, vis) for name, _, kw, vis in grid if name != "plain non-causal")[:1] + tuple(
            (name, d, kw, vis) for name, dd, kw, vis in grid if dd == 128 and not name.startswith("plain"))
    for name, d, kw, vis in grid:
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=DT, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(b, s, h, d, device=DEV, dtype=DT, generator=g)
        qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
        impls = []

        def orch(kw=kw, q=q, k=k, v=v):
            return orchard.flash_attn_func(q, k, v, **kw)
        impls.append((SM80 if orchard_only else "orchard sm90", orch, True, do))
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
        if orchard_only:
            pass
        elif name.startswith("plain"):
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


def rel_diff(xs, ys):
    return {n: float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
            for n, x, y in zip(("out", "dq", "dk", "dv"), xs, ys)}


def warm(cases):
    """Runs every impl once (FlexAttention compiles), records Orchard's kernel variants; returns
    the Orchard outputs (out, dq, dk, dv) per case, on the CPU."""
    kept = []
    for c in cases:
        q, k, v = c["q"], c["k"], c["v"]
        res = {}
        for iname, fn, is_orchard, do in c["impls"]:
            try:
                def fb(fn=fn, do=do):
                    out = fn()
                    return (out,) + torch.autograd.grad(out, (q, k, v), do)
                if is_orchard:
                    c.setdefault("variants", {})[iname] = variants(fb)
                res[iname] = [t.detach().transpose(1, 2) if iname.startswith(("flex", "sdpa")) and j == 0 else t.detach()
                              for j, t in enumerate(fb())]
            except Exception as e:  # noqa: BLE001
                c.setdefault("errors", {})[iname] = f"{type(e).__name__}: {e}"[:200]
                traceback.print_exc()
                torch.cuda.synchronize()
        orch = [n for n, _, is_orchard, _ in c["impls"] if is_orchard][0]
        a, p = res.get(orch), res.get("flex_attention")
        if a is not None and p is not None:
            c["sm90_vs_flex_attention"] = rel_diff(a, p)
        kept.append([t.cpu() for t in a] if a is not None else None)
        print(f"[warm] {c['name']} d{c['d']}: variants {c.get('variants')} errors {c.get('errors')}", flush=True)
        del res
    torch.cuda.empty_cache()
    return kept


def time_all(cases):
    """Forward and forward+backward median ms of every impl that warmed: c["times"][impl]."""
    for c in cases:
        q, k, v = c["q"], c["k"], c["v"]
        c["times"] = {}
        for iname, fn, _, do in c["impls"]:
            if iname in c.get("errors", {}):
                continue

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn()

            def fb(fn=fn, do=do):
                out = fn()
                return torch.autograd.grad(out, (q, k, v), do)
            try:
                c["times"][iname] = (median_ms(fwd), median_ms(fb))
            except Exception as e:  # noqa: BLE001
                c.setdefault("errors", {})[iname] = f"{type(e).__name__}: {e}"[:200]
            print(f"[time] {c['name']} d{c['d']} {iname}: {c['times'].get(iname)}", flush=True)


def run_sm80_child(args):
    """The sm80 A/B in its own process (ORCHARD_SM90=0 from its start); returns what it saved."""
    path = os.path.join(tempfile.mkdtemp(), "sm80.pt")
    env = dict(os.environ, ORCHARD_SM90="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--s", str(args.s), "--d", str(args.d)] + (["--quick"] if args.quick else [])
    r = subprocess.run(cmd, env=env, timeout=300)
    if r.returncode != 0 or not os.path.exists(path):
        print(f"[bench] sm80 child failed rc={r.returncode}", flush=True)
        return None
    return torch.load(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--go", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--s", type=int, default=0, help="sequence length (default 8192, --quick 2048)")
    ap.add_argument("--d", type=int, default=0, help="head dim of every row (default: d128 and d64 rows)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile failed on the device)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # sm80 A/B: Orchard only, saved to this file
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.child:
        cases = build_cases(args.quick, args.s, orchard_only=True, d=args.d)
        kept = warm(cases)
        time_all(cases)
        torch.save([dict(times=c["times"].get(SM80), variants=(c.get("variants") or {}).get(SM80),
                         errors=c.get("errors"), outputs=o) for c, o in zip(cases, kept)], args.child)
        return 0
    os.environ["ORCHARD_SM90"] = "1"  # before the first call: the backend reads it once
    cases = build_cases(args.quick, args.s, flex=not args.no_flex, d=args.d)
    kept = warm(cases)
    print("ready", flush=True)
    if args.go:
        t0 = time.time()
        while not os.path.exists(args.go) and time.time() - t0 < 600:
            time.sleep(0.5)
    time_all(cases)
    # The parent's CUDA tensors stay allocated but idle while the child runs.
    child = run_sm80_child(args)
    for c, mine, theirs in zip(cases, kept, child or [None] * len(cases)):
        if not theirs:
            continue
        if theirs["times"]:
            c["times"][SM80] = theirs["times"]
        if theirs["variants"]:
            c.setdefault("variants", {})[SM80] = theirs["variants"]
        if theirs["errors"]:
            c.setdefault("errors", {}).update(theirs["errors"])
        if mine is not None and theirs["outputs"] is not None:
            c["sm90_vs_sm80"] = rel_diff(mine, theirs["outputs"])
    rows = []
    md = [f"## sm90 features ({torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, one run)", "",
          "| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | sm90 fwd / fwd+bwd speed vs this |",
          "|---|---|---|---|---|---|---|"]
    for c in cases:
        for iname, err in (c.get("errors") or {}).items():
            md.append(f"| {c['name']} d{c['d']} | {iname} | failed: {err[:60]} | | | | |")
        base = c["times"].get("orchard sm90")
        for iname, (tf, tb) in c["times"].items():
            rows.append(dict(case=c["name"], d=c["d"], impl=iname, fwd_ms=tf, fb_ms=tb,
                             fwd_tflops=c["flops"] / tf / 1e9, fb_tflops=3.5 * c["flops"] / tb / 1e9))
            ratio = f"{tf / base[0]:.2f}x / {tb / base[1]:.2f}x" if base else ""
            md.append(f"| {c['name']} d{c['d']} | {iname} | {tf:.3f} | {c['flops'] / tf / 1e9:.0f} | {tb:.3f} | "
                      f"{3.5 * c['flops'] / tb / 1e9:.0f} | {ratio} |")
    md += ["", "ratio = that impl's time / orchard sm90's time (> 1: sm90 faster).", "",
           "| case | variants (orchard sm90 ; sm80 child) | max rel diff sm90 vs sm80 (out, dq, dk, dv) | vs flex |",
           "|---|---|---|---|"]
    for c in cases:
        fmt = lambda d_: ", ".join(f"{x:.1e}" for x in d_.values()) if d_ else ""
        md.append(f"| {c['name']} d{c['d']} | {' ; '.join((c.get('variants') or {}).values())} | "
                  f"{fmt(c.get('sm90_vs_sm80'))} | {fmt(c.get('sm90_vs_flex_attention'))} |")
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
