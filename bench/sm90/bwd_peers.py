"""Backward peers for bench/sm90/sm90_bwd_bench.cu, same shapes, same card: torch SDPA with the
cuDNN and flash (FA2) backends, BSHD tensors viewed as (b, h, s, d), bf16 unless named.
Times the backward alone (torch.autograd.grad of one forward's output, retain_graph) and prints
`PEER <backend> <dtype> d<d> <causal|full> b h s  <ms> ms  <TFLOP/s> TFLOP/s` (median of
CUDA-event times, 20 reps after 3 warm-ups; bwd FLOPs = 2.5 * 4 b h s^2 d, halved causal)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from peer_timing import time_ms  # this folder (the script's, first on sys.path)

GRID = [  # (dtype, d, causal, b, hq, hkv, s) = the bench's speed grid
    ("bf16", 128, False, 8, 16, 16, 2048), ("bf16", 128, True, 8, 16, 16, 2048),
    ("bf16", 128, False, 2, 16, 16, 8192), ("bf16", 128, True, 2, 16, 16, 8192),
    ("bf16", 128, False, 1, 16, 16, 16384), ("bf16", 128, True, 1, 16, 16, 16384),
    ("bf16", 64, False, 2, 32, 32, 8192), ("bf16", 64, True, 2, 32, 32, 8192),
    ("fp16", 128, False, 2, 16, 16, 8192), ("bf16", 128, False, 2, 16, 2, 8192),
    ("bf16", 128, False, 32, 16, 16, 512), ("bf16", 128, True, 32, 16, 16, 512),
    ("bf16", 64, False, 16, 32, 32, 1024),
]


for dt, d, causal, b, hq, hkv, s in GRID:
    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    do = torch.randn(b, s, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
    flops = 2.5 * 4 * b * hq * s * s * d / (2 if causal else 1)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
                ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            print(f"PEER {name:5s} {dt} d{d:<3d} {'causal' if causal else 'full':6s} b{b:<2d} hq{hq:<2d} hkv{hkv:<2d} s{s:<5d} "
                  f"{ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
            del out
        except Exception as e:  # a backend that refuses the shape
            print(f"PEER {name} {dt} d{d} {'causal' if causal else 'full'} hq{hq} hkv{hkv} s{s}: unavailable "
                  f"({type(e).__name__}: {str(e)[:80]})", flush=True)
    del q, k, v, do
