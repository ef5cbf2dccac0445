"""Peer baseline on the same card, same configs as `cuda_check --bench`:
torch SDPA with the FLASH_ATTENTION backend (FA2 inside torch) and cuDNN."""
import sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def median_ms(fn, iters=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'backend':>7} {'d':>4} {'s':>6} {'causal':>6} | {'fwd':>7} {'bwd':>7}")
    for name, be in backends.items():
        for d in (64, 128):
            for causal in (False, True):
                for s in (512, 1024, 2048, 4096, 8192, 16384):
                    if name == "cudnn" and s not in (2048, 8192):
                        continue
                    b, h = 16384 // s, 2048 // d
                    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    do = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                    flops = 4 * b * h * s * s * d / (2 if causal else 1)
                    try:
                        with sdpa_kernel(be):
                            tf = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            tb = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                        print(f"{name:>7} {d:>4} {s:>6} {str(causal):>6} | {flops / tf / 1e9:7.1f} "
                              f"{2.5 * flops / tb / 1e9:7.1f}", flush=True)
                    except Exception as e:  # backend unavailable for this shape
                        print(f"{name:>7} {d:>4} {s:>6} {str(causal):>6} | n/a ({type(e).__name__})", flush=True)
                    del q, k, v, do


if __name__ == "__main__":
    sys.exit(main())
