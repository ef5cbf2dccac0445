"""Thread scaling of three CPU forwards at 16 / 15 / 14 / 12 / 8 threads, Orchard against torch's
SDPA in one process (issue #15's probe of the GPU machine's 16-core host; bench/NOTES.md, session 50).

Each line: the min of 15 calls, best of two repeats (the worse repeat in parentheses, to show the
host's noise). Usage on the host, after a package build (dev/gpu_session.sh):
    bash dev/gpu_session.sh "py:bench/cpu_host_scaling.py"
"""
import torch

import orchard
from cpu_mask_bench import best_ms  # bench/ is the script's directory

THREADS = (16, 15, 14, 12, 8)
# (heads, seq, head dim, dtype): the forward points short of 1.5x in [C22] / [C47].
POINTS = [(4, 2048, 128, torch.float32), (8, 512, 128, torch.bfloat16), (8, 512, 64, torch.float32)]


def main():
    torch.manual_seed(0)
    for h, s, d, dtype in POINTS:
        q, k, v = [torch.randn(1, s, h, d, dtype=dtype) for _ in range(3)]
        qt, kt, vt = [x.transpose(1, 2) for x in (q, k, v)]
        for n in THREADS:
            torch.set_num_threads(n)
            with torch.no_grad():
                ours = [best_ms(lambda: orchard.flash_attn_func(q, k, v), 15) for _ in range(2)]
                theirs = [best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), 15)
                          for _ in range(2)]
            print(f"h{h} s{s} d{d} {str(dtype)[6:]} threads {n}: orchard {min(ours):.3f} ({max(ours):.3f}) "
                  f"torch {min(theirs):.3f} ({max(theirs):.3f}) ratio {min(theirs) / min(ours):.2f}", flush=True)


if __name__ == "__main__":
    main()
