"""Feature benchmark (GPU): Orchard against the peers that have each feature,
same process, same card, same tensors, bf16, forward and forward+backward.

  varlen   a packed batch of mixed lengths, causal: Orchard's varlen kernels (and,
           with two equal offset tensors, the sm80 kernels on Hopper) vs FA2's varlen
           kernel (torch SDPA on nested jagged tensors) and vs SDPA flash and cuDNN on
           the batch padded to the longest sequence. varlen64: d64 h32;
           varlen_short: 64 sequences of 64-1024 tokens.
  window   causal sliding window (left 1024): vs FlexAttention (compiled, block
           mask) and SDPA efficient with the materialized bool mask.
  softcap  Gemma-2 softcap 50, causal: vs FlexAttention (score_mod tanh).
  alibi    causal ALiBi: vs FlexAttention (score_mod bias).
  mask     SDPA key-padding bool mask (B, 1, 1, S) broadcast: vs SDPA efficient
           and cuDNN with the same mask.
  bias     SDPA additive float bias (1, H, S, S) (batch-broadcast, bf16): vs SDPA
           efficient and cuDNN with the same bias.
  dmask    SDPA dense bool mask (B, 1, S, S) (heads broadcast, 10 % of keys hidden): vs SDPA
           efficient and cuDNN with the same mask.
  mask64, bias64, dmask64   the same three at d64 (h32); the others run d128 (h16).
TFLOP/s count only the visible (unpadded, unmasked) score entries: 4*d per
entry forward, 2.5x that backward. Timing: triton do_bench median.

    python bench/feature_bench.py --out $OUT [--quick] [--only mask,bias]
(--only mask,bias: the two masked-SDPA sections alone, well under a minute.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard
from gpu_bench import do_bench_ms  # the grid's timer (bench/ is the script's directory)

DT = torch.bfloat16
DEV = "cuda"



def timed(fn, grads_of):
    """(fwd ms, fwd+bwd ms) of fn(); grads_of(out) runs the backward."""
    fwd = do_bench_ms(fn)

    def fb():
        grads_of(fn())
    return fwd, do_bench_ms(fb)


def flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception as e:  # noqa: BLE001
        print(f"[bench] FlexAttention unavailable: {e}", file=sys.stderr)
        return None, None


def rows_to_md(title, rows):
    lines = [f"### {title}", "", "| impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | vs orchard (fwd / fwd+bwd) |",
             "|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["impl"] == "orchard" and "fwd_ms" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error'][:80]} | | | | |")
            continue
        ratio = ""
        if base:
            ratio = f"{r['fwd_ms'] / base['fwd_ms']:.2f}x / {r['fb_ms'] / base['fb_ms']:.2f}x time"
        lines.append(f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fb_ms']:.3f} | "
                     f"{r['fb_tflops']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def measure(impl, fn, grads_of, flops):
    try:
        fwd, fb = timed(fn, grads_of)
        return dict(impl=impl, fwd_ms=fwd, fb_ms=fb, fwd_tflops=flops / fwd / 1e9,
                    fb_tflops=3.5 * flops / fb / 1e9)
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return dict(impl=impl, error=f"{type(e).__name__}: {e}")


def bench_varlen(h, d, quick, shortest=256, longest=4096, count=16):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(shortest, (longest if not quick else min(longest, 1024)) + 1, (count,), generator=g).tolist()
    total, maxlen = sum(lens), max(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(DEV)
    q, k, v = (torch.randn(total, h, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
    flops = sum(4 * h * d * l * (l + 1) / 2 for l in lens)
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    rows = [measure("orchard", lambda: orchard.flash_attn_varlen_func(q, k, v, cu, cu, maxlen, maxlen, causal=True),
                    grads, flops)]
    # Two offset tensors with the same values: the sm80 kernels on Hopper (the sm90 kernels take
    # varlen only when q and k share one cu_seqlens tensor, sm90_call_support.h).
    cu_k = cu.clone()
    rows.append(measure("orchard, distinct cu_seqlens_k (sm80 kernels)",
                        lambda: orchard.flash_attn_varlen_func(q, k, v, cu, cu_k, maxlen, maxlen, causal=True),
                        grads, flops))

    offsets = cu.to(torch.int64)

    def nested():
        nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(nq, nk, nv, is_causal=True).transpose(1, 2).values()
    rows.append(measure("sdpa_flash_nested (FA2 varlen)", nested, grads, flops))

    qp, kp, vp = (torch.randn(len(lens), maxlen, h, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))

    def padded(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                                      is_causal=True)
        return run
    for name, backend in (("sdpa_flash_padded", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn_padded", SDPBackend.CUDNN_ATTENTION)):
        rows.append(measure(name, padded(backend),
                            lambda o: torch.autograd.grad(o, (qp, kp, vp), torch.ones_like(o)), flops))
    return f"varlen: {len(lens)} sequences, {total} tokens (max {maxlen}), h{h} d{d}, causal", rows


def bench_window(b, s, h, d, left):
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
    visible = sum(min(i, left) + 1 for i in range(s))
    flops = 4 * b * h * d * visible
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    rows = [measure("orchard", lambda: orchard.flash_attn_func(q, k, v, causal=True, window_size=(left, 0)),
                    grads, flops)]
    fa, create_block_mask = flex()
    if fa is not None:
        def sliding(b_, h_, qi, ki):
            return (qi >= ki) & (qi - ki <= left)
        bm = create_block_mask(sliding, None, None, s, s, device=DEV)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        rows.append(measure("flex_attention", lambda: fa(qt, kt, vt, block_mask=bm), grads, flops))
    i = torch.arange(s, device=DEV)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= left)

    def sdpa_masked():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask)
    rows.append(measure("sdpa_efficient_mask", sdpa_masked, grads, flops))
    return f"sliding window: b{b} s{s} h{h} d{d}, causal, left {left}", rows


def bench_score_mod(name, b, s, h, d):
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
    flops = 4 * b * h * d * s * (s + 1) / 2
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEV, dtype=torch.float32)
    kw = dict(softcap=50.0) if name == "softcap" else dict(alibi_slopes=slopes)
    rows = [measure("orchard", lambda: orchard.flash_attn_func(q, k, v, causal=True, **kw), grads, flops)]
    fa, create_block_mask = flex()
    if fa is not None:
        if name == "softcap":
            def mod(score, b_, h_, qi, ki):
                return 50.0 * torch.tanh(score / 50.0)
        else:
            def mod(score, b_, h_, qi, ki):
                return score - slopes[h_] * (qi - ki).abs()
        bm = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=DEV)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        rows.append(measure("flex_attention", lambda: fa(qt, kt, vt, score_mod=mod, block_mask=bm), grads, flops))
    return f"{name}: b{b} s{s} h{h} d{d}, causal", rows


def bench_mask(b, s, h, d):
    q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
    g = torch.Generator().manual_seed(1)
    valid = torch.randint(s // 2, s + 1, (b,), generator=g).to(DEV)
    mask = (torch.arange(s, device=DEV)[None, :] < valid[:, None])[:, None, None, :]  # (B, 1, 1, S)
    flops = 4 * h * d * s * float(valid.sum())
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    rows = [measure("orchard", lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask), grads, flops)]
    for name, be in (("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        rows.append(measure(name, run, grads, flops))
    return f"SDPA key-padding bool mask (B,1,1,S): b{b} s{s} h{h} d{d}", rows


def bench_bias(b, s, h, d, dense_mask=False):
    q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
    if dense_mask:  # (B, 1, S, S) bool, as transformers builds it: heads broadcast, 10 % of keys hidden
        bias = torch.rand(b, 1, s, s, device=DEV) > 0.1
    else:
        bias = torch.randn(1, h, s, s, device=DEV, dtype=DT)  # (1, H, S, S): batch dim broadcast (stride 0)
    flops = 4 * b * h * d * float(s) * s
    grads = lambda o: torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    rows = [measure("orchard", lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias), grads, flops)]
    for name, be in (("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        rows.append(measure(name, run, grads, flops))
    kind = "bool mask (B,1,S,S)" if dense_mask else "float bias (1,H,S,S) bf16"
    return f"SDPA {kind}: b{b} s{s} h{h} d{d}", rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections: varlen,varlen64,varlen_short,window,softcap,alibi,mask,bias,mask64,bias64,"
                    "dmask,dmask64")
    args = ap.parse_args()
    torch.manual_seed(0)
    s = 2048 if args.quick else 8192
    sections = {
        "varlen": lambda: bench_varlen(16, 128, args.quick),
        "varlen64": lambda: bench_varlen(32, 64, args.quick),
        "varlen_short": lambda: bench_varlen(16, 128, args.quick, 64, 1024, 64),
        "window": lambda: bench_window(2, s, 16, 128, 1024),
        "softcap": lambda: bench_score_mod("softcap", 2, s, 16, 128),
        "alibi": lambda: bench_score_mod("alibi", 2, s, 16, 128),
        "mask": lambda: bench_mask(4, s // 2, 16, 128),
        "bias": lambda: bench_bias(4, s // 2, 16, 128),
        "mask64": lambda: bench_mask(4, s // 2, 32, 64),
        "bias64": lambda: bench_bias(4, s // 2, 32, 64),
        "dmask": lambda: bench_bias(4, s // 2, 16, 128, dense_mask=True),
        "dmask64": lambda: bench_bias(4, s // 2, 32, 64, dense_mask=True),
    }
    only = [x for x in args.only.split(",") if x]
    if any(x not in sections for x in only):
        ap.error(f"--only: sections are {', '.join(sections)}")
    sections = [f for name, f in sections.items() if not only or name in only]
    md = [f"## Feature bench ({torch.cuda.get_device_name()}, torch {torch.__version__}, bf16)\n"]
    results = []
    for sec in sections:
        try:
            title, rows = sec()
        except Exception as e:  # noqa: BLE001
            title, rows = f"section failed: {type(e).__name__}: {e}", []
        results.append(dict(title=title, rows=rows))
        md.append(rows_to_md(title, rows))
        print(md[-1], flush=True)
        with open(os.path.join(args.out, "feature_bench.md"), "w") as f:
            f.write("\n".join(md))
        with open(os.path.join(args.out, "feature_bench.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
