"""Host time of the SDPA drop-in's masked calls on CUDA (issue #12's per-call overhead, for the
feature path): the launch loop's wall time per call without synchronizing (the host's cost while
the GPU keeps up), for no mask / a key-padding mask, forward without and with grad and forward +
backward, then cProfile of the masked forward with grad. b4 h16 s1024 d128 bf16 (what
bench/mask_padding_bench.py found host-bound)."""
import cProfile
import pstats
import time

import torch

import orchard

torch.manual_seed(0)
b, h, s, d = 4, 16, 1024, 128
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device="cuda")
mask[..., -256:] = False
dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)


def host_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


for name, m in (("nomask", None), ("mask", mask)):
    with torch.no_grad():
        f0 = host_us(lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=m))
    f1 = host_us(lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=m))
    fb = host_us(lambda: orchard.scaled_dot_product_attention(q, k, v, attn_mask=m).backward(dout))
    print(f"{name}: host / wall us per call: fwd no grad {f0[0]:.1f} / {f0[1]:.1f}, fwd grad "
          f"{f1[0]:.1f} / {f1[1]:.1f}, fwd+bwd {fb[0]:.1f} / {fb[1]:.1f}", flush=True)

prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dout)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(16)
