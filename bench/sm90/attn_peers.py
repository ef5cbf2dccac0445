"""Peers for bench/sm90/sm90_attn_bench.cu, same shapes, same card: torch SDPA with the cuDNN
and flash (FA2) backends, BSHD tensors viewed as (b, h, s, d), bf16 unless named.
Prints `PEER <backend> <dtype> d<d> <causal|full> b h s  <ms> ms  <TFLOP/s> TFLOP/s` (median
of CUDA-event times, 20 reps after 3 warm-ups)."""
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from peer_timing import time_ms  # this folder (the script's, first on sys.path)

GRID = [  # (dtype, d, causal, b, h, s) = the bench's speed grid (MHA part)
    ("bf16", 128, False, 8, 16, 2048), ("bf16", 128, True, 8, 16, 2048),
    ("bf16", 128, False, 2, 16, 8192), ("bf16", 128, True, 2, 16, 8192),
    ("bf16", 128, False, 1, 16, 16384), ("bf16", 128, True, 1, 16, 16384),
    ("bf16", 64, False, 2, 32, 8192), ("bf16", 64, True, 2, 32, 8192),
    ("fp16", 128, False, 2, 16, 8192), ("bf16", 256, False, 4, 8, 4096), ("bf16", 256, True, 4, 8, 4096),
    ("bf16", 128, False, 32, 16, 512), ("bf16", 128, True, 32, 16, 512), ("bf16", 64, False, 16, 32, 1024),
    ("bf16", 64, False, 8, 32, 2048), ("bf16", 64, True, 8, 32, 2048),
    ("bf16", 192, False, 4, 10, 4096), ("bf16", 192, True, 4, 10, 4096), ("bf16", 96, False, 2, 21, 8192),
    ("bf16", 96, True, 2, 21, 8192), ("bf16", 160, False, 4, 12, 4096), ("bf16", 160, True, 4, 12, 4096),
]


def tile_grid(d):
    """PEER_GRID=d<D>: the bench's d<D> mode (one head-dim bucket's key-tile experiment)."""
    h = 10 if d == 192 else 2048 // d
    g = [("bf16", d, False, 16384 // s, h, s) for s in (1024, 2048, 4096, 8192, 16384)]
    g.append(("fp16", d, False, 4, h, 4096))
    if d == 192:
        g.append(("bf16", 160, False, 4, 12, 4096))
    return g + [("bf16", d, True, 8, h, 2048), ("bf16", d, True, 2, h, 8192)]


pg = os.environ.get("PEER_GRID", "")
for dt, d, causal, b, h, s in (tile_grid(int(pg[1:])) if pg[1:].isdigit() else GRID):
    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            print(f"PEER {name:5s} {dt} d{d:<3d} {'causal' if causal else 'full':6s} b{b:<2d} h{h:<2d} s{s:<5d} "
                  f"{ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
        except Exception as e:  # a backend that refuses the shape
            print(f"PEER {name} {dt} d{d} {'causal' if causal else 'full'} s{s}: unavailable ({type(e).__name__}: {str(e)[:80]})", flush=True)
    del q, k, v
