"""Peers for dev/cuda/sm80_bench.cu, same shapes, same card, same timing method
(CUDA events around each call, 3 warm-ups, median of 20):
  grid: torch SDPA's FLASH_ATTENTION backend (FA2 inside torch), bf16, b*s = 16k,
        h = 2048/d, s 2k/4k/8k, causal and not; fwd and bwd (autograd.grad on a
        retained graph) TFLOP/s.
  feat: FlexAttention (compiled) for the sliding window (causal, left 1024) and ALiBi
        (causal) at b2 s8k h16 d128: fwd ms and fwd+bwd ms.
    python3 dev/cuda/sm80_peers.py [--dims 64,96,...] [--go FILE]
--go FILE: compile FlexAttention first, then wait until FILE exists before timing
(so the compile can overlap other work that must not overlap the timings).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "sm90"))
from peer_timing import time_ms as median_ms  # noqa: E402  (bench/sm90: the CUDA-event median)


def flex_cases():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention, dynamic=False)
    b, s, h, d, left = 2, 8192, 16, 128, 1024
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda", dtype=torch.float32)
    win = create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki <= left), None, None, s, s, device="cuda")
    causal = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device="cuda")

    def alibi(score, b_, h_, qi, ki):
        return score - slopes[h_] * (qi - ki).abs()
    g = torch.ones(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    cases = {
        "window b2 s8k h16 d128 causal left 1024": lambda: fa(q, k, v, block_mask=win),
        "alibi b2 s8k h16 d128 causal": lambda: fa(q, k, v, score_mod=alibi, block_mask=causal),
    }
    for fn in cases.values():  # compile fwd and bwd
        torch.autograd.grad(fn(), (q, k, v), g)
    torch.cuda.synchronize()
    return cases, (q, k, v), g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,96,128,160,192,256")
    ap.add_argument("--go", default="")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    t0 = time.time()
    try:
        cases, qkv, g = flex_cases()
        print(f"flex compiled in {time.time() - t0:.0f} s", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"FlexAttention unavailable: {type(e).__name__}: {e}", flush=True)
        cases = {}
    if args.go:
        while not os.path.exists(args.go):
            time.sleep(0.5)
    for name, fn in cases.items():
        tf = median_ms(fn)
        tfb = median_ms(lambda: torch.autograd.grad(fn(), qkv, g))
        print(f"flex {name}: fwd {tf:.3f} ms, fwd+bwd {tfb:.3f} ms", flush=True)
    print(f"{'d':>5} {'s':>6} {'b':>3} {'h':>3} {'causal':>7} | {'fwd':>8} {'bwd':>8} | ms fwd/bwd  (sdpa flash = FA2)")
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            for s in (2048, 4096, 8192):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        tf = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        tb = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                    print(f"{d:>5} {s:>6} {b:>3} {h:>3} {'yes' if causal else 'no':>7} | {flops / tf / 1e9:8.1f} "
                          f"{2.5 * flops / tb / 1e9:8.1f} | {tf:.3f}/{tb:.3f}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{d:>5} {s:>6} n/a ({type(e).__name__}: {e})", flush=True)
                del q, k, v, do


if __name__ == "__main__":
    sys.exit(main())
