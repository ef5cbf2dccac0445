"""FA2 (torch SDPA's flash backend) on bench/sm80_kernel_ab.cu's grid: bf16, b*s = 16k tokens,
h = 2048 / d, s 2k / 4k / 8k, causal and not, d64 / d128 / d192 / d256, and dropout 0.1 at d64 /
d128 s4k; CUDA events, median of 15 after 3 warm-ups, the backward timed alone (retain_graph).
Prints the same table columns as `sm80_kernel_ab time`."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=15):  # (gpu_bench.py has one too, but importing it needs the orchard package)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    print("| d | causal | dropout | s | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s |\n|---|---|---|---|---|---|---|---|")
    grid = [(d, causal, 0.0, s) for d in (64, 128, 192, 256) for causal in (False, True) for s in (2048, 4096, 8192)]
    grid += [(d, causal, 0.1, 4096) for d in (64, 128) for causal in (False, True)]
    for d, causal, dropout, s in grid:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            f_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
            grad = torch.randn_like(out)
            b_ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
        print(f"| {d} | {int(causal)} | {dropout:.1f} | {s} | {f_ms:.3f} | {b_ms:.3f} | {flops / f_ms * 1e-9:.1f} | "
              f"{2.5 * flops / b_ms * 1e-9:.1f} |", flush=True)
        del q, k, v, out, grad


if __name__ == "__main__":
    main()
