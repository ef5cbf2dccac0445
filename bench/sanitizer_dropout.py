"""Small dropout calls on every CUDA path for compute-sanitizer to watch (memcheck / racecheck):
the sm90 forward and backward (every bucket), the sm80 forward (any head dim with the keep-mask
output), the sm80 backward (deterministic calls), the per-element
draws of offsets off the 16 grid (a context-parallel block), and the float32 kernels. Odd sizes, so
tiles end inside the calls' Philox blocks.

    compute-sanitizer --tool memcheck python bench/sanitizer_dropout.py
"""
import torch

import orchard

torch.manual_seed(0)
_PLAIN = (-1, -1, 0.0, None, None, None, None, None, 0, 0)


def fwd_bwd(q, k, v, **kw):
    out = orchard.flash_attn_func(q, k, v, dropout_p=0.17, **kw)
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def qkv(d, dtype, sq=77, sk=131):
    make = lambda s, h: torch.randn(2, s, h, d, device="cuda", dtype=dtype, requires_grad=True)
    return make(sq, 4), make(sk, 2), make(sk, 2)


for dtype in (torch.bfloat16, torch.float16):
    for d in (64, 96, 128, 192, 256):
        for causal in (False, True):
            fwd_bwd(*qkv(d, dtype), causal=causal)                          # sm90 where it takes dropout
            fwd_bwd(*qkv(d, dtype), causal=causal, deterministic=True)      # the sm80 backward
        fwd_bwd(*qkv(d, dtype, 40, 300), return_attn_probs=True)            # the sm80 forward + mask kernel

# A block of a larger call at row / column offsets off the 16 grid, and on it.
q, k, v = (t.detach() for t in qkv(128, torch.bfloat16))
rng = torch.tensor([7, 11], dtype=torch.int64, device="cuda")
for row0, col0 in ((5, 8), (16, 32)):
    out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, 0.1, False, True, 0.2, 0, 0, False, False,
                                                       "orchard.flash_attn", rng, *_PLAIN, row0, col0, 0, 0)
    torch.ops.orchard.flash_attn_backward(torch.randn_like(out), q, k, v, out, lse, 0.1, False, True, 0.2, 0, 0,
                                          False, "orchard.flash_attn", rng, *_PLAIN, row0, col0, 0, 0)

fwd_bwd(*qkv(64, torch.float32))  # the float32 kernels
torch.cuda.synchronize()
print("sanitizer_dropout: done")
