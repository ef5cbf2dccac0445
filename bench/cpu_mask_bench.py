"""CPU masked attention (issue #15 / #16): Orchard's SDPA drop-in against torch's CPU SDPA with the
same key-padding bool mask (B, 1, 1, S) or dense float bias (1, H, S, S), in one process, the same
thread count, forward and forward + backward (best of a few calls, wall clock, ms). The key-padding
mask hides the second half of batch entry 0's keys (all of entry 1's are visible): Orchard's CPU
kernels skip the key tiles a boolean mask hides whole (score_mods.h, bool_mask_hides_tile).

    OMP_NUM_THREADS=2 python bench/cpu_mask_bench.py [--threads 2]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import orchard


def best_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print("| dtype | b,h,s,d | mask | orchard fwd / f+b ms | torch fwd / f+b ms | ratio fwd / f+b |")
    print("|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for b, h, s, d in ((2, 8, 1024, 64), (1, 8, 2048, 128)):
            q, k, v = (torch.randn(b, h, s, d, dtype=dt, requires_grad=True) for _ in range(3))
            valid = torch.tensor([s // 2, s])[:b]
            key_padding = (torch.arange(s)[None, :] < valid[:, None])[:, None, None, :]
            bias = torch.randn(1, h, s, s, dtype=dt)
            for name, m in (("key padding", key_padding), ("bias (1,H,S,S)", bias)):
                def ours():
                    return orchard.scaled_dot_product_attention(q, k, v, attn_mask=m)

                def theirs():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                with torch.no_grad():
                    fo, ft = best_ms(ours, 5), best_ms(theirs, 5)
                bo = best_ms(lambda: ours().sum().backward(), 3)
                bt = best_ms(lambda: theirs().sum().backward(), 3)
                print(f"| {str(dt)[6:]} | {b},{h},{s},{d} | {name} | {fo:.1f} / {bo:.1f} | {ft:.1f} / {bt:.1f} | "
                      f"{ft / fo:.2f}x / {bt / bo:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
