"""Small forward + backward calls (bf16 and fp16, causal and not, GQA, odd
sizes, dropout, deterministic) for compute-sanitizer to watch."""
import torch

import orchard

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for causal in (False, True):
        for d in (64, 128):
            q = torch.randn(2, 77, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 131, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(2, 131, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            out = orchard.flash_attn_func(q, k, v, causal=causal, dropout_p=0.1 if d == 64 else 0.0,
                                          deterministic=causal)
            out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("sanitizer case done")
