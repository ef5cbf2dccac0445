"""Backward TFLOP/s of the head dims above 128 (160, 192, 256) on CUDA: Orchard's
flash_attn_func against torch SDPA's flash backend (FA2), same tensors, same process,
triton do_bench medians. The backward's time is fwd+bwd minus fwd (each timed).
Run it twice to A/B the sm80 backward's kernels: ORCHARD_BWD_TWO_PASS=1 forces the
two-pass kernel (the variable is read once per process).

    python bench/wide_head_bwd.py [--label one-pass] [--s 4096]
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import orchard


def fwd_bwd_ms(fn, q, k, v, g):
    def fwd():
        return fn(q, k, v)

    def fwd_bwd():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), g)

    return do_bench(fwd, warmup=10, rep=60), do_bench(fwd_bwd, warmup=10, rep=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="two-pass" if os.environ.get("ORCHARD_BWD_TWO_PASS") == "1" else "default")
    ap.add_argument("--s", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    s = args.s
    b = max(1, 16384 // s)
    print(f"| label | d | causal | orchard bwd TF | FA2 bwd TF | vs FA2 | max abs diff dq vs FA2 |")
    print("|---|---|---|---|---|---|---|")
    for d in (160, 192, 256):
        h = max(1, 2048 // d)
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            g = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            flops = 2.5 * 4 * b * h * s * s * d * (0.5 if causal else 1.0)

            def orch(q, k, v):
                return orchard.flash_attn_func(q, k, v, causal=causal)

            def fa2(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=causal).transpose(1, 2)

            of, ofb = fwd_bwd_ms(orch, q, k, v, g)
            ff, ffb = fwd_bwd_ms(fa2, q, k, v, g)
            dq_o = torch.autograd.grad(orch(q, k, v), q, g)[0]
            dq_f = torch.autograd.grad(fa2(q, k, v), q, g)[0]
            diff = (dq_o.float() - dq_f.float()).abs().max().item()
            ot = flops / ((ofb - of) * 1e-3) / 1e12
            ft = flops / ((ffb - ff) * 1e-3) / 1e12
            print(f"| {args.label} | {d} | {causal} | {ot:.0f} | {ft:.0f} | {ot / ft:.2f}x | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
