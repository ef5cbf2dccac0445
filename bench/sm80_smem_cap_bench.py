"""The sm80-class backward as GPUs with less shared memory run it: Orchard's backward alone
(retain_graph, CUDA events, median of 15 after 3 warm-ups) on the FlashAttention grid's shapes
(bf16, b*s = 16k tokens, h = 2048 / d), under whatever ORCHARD_CUDA_SMEM_OPTIN / ORCHARD_SM90 the
caller set (both are read once per process), with FA2 (SDPA flash) timed in the same process.
On an H100 with ORCHARD_SM90=0: no cap runs the two-stage tiles, 166912 (an A100's opt-in) the
one-stage ones, 101376 (sm_86 / sm_89) the compact 64 x 64 tiles (flash_bwd_kernel.cuh).

    ORCHARD_SM90=0 ORCHARD_CUDA_SMEM_OPTIN=101376 python bench/sm80_smem_cap_bench.py [--dims 64,128]
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard
from sm80_kernel_peer import median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="32,64,96,128")
    ap.add_argument("--seqlens", default="2048,8192")
    args = ap.parse_args()
    cap = os.environ.get("ORCHARD_CUDA_SMEM_OPTIN", "none")
    print(f"cap {cap}, ORCHARD_SM90={os.environ.get('ORCHARD_SM90', '')}")
    print("| d | causal | s | orchard bwd ms | FA2 bwd ms | orchard TFLOP/s | FA2 / orchard time |\n|---|---|---|---|---|---|---|")
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            for s in (int(x) for x in args.seqlens.split(",")):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                out = orchard.flash_attn_func(q, k, v, causal=causal)
                grad = torch.randn_like(out)
                o_ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    gt = grad.transpose(1, 2)
                    f_ms = median_ms(lambda: torch.autograd.grad(ref, (qt, kt, vt), gt, retain_graph=True))
                flops = 2.5 * 4.0 * b * h * s * s * d / (2 if causal else 1)
                print(f"| {d} | {int(causal)} | {s} | {o_ms:.3f} | {f_ms:.3f} | {flops / o_ms * 1e-9:.1f} | "
                      f"{f_ms / o_ms:.3f} |", flush=True)
                del q, k, v, out, grad, qt, kt, vt, ref


if __name__ == "__main__":
    main()
