"""Small forward + backward calls (bf16 and fp16, causal and not, GQA, odd
sizes, dropout, deterministic; then every feature: windows that empty rows,
softcap, ALiBi, sinks, varlen with empty sequences, fp32) for
compute-sanitizer to watch."""
import torch

import orchard

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for causal in (False, True):
        for d in (40, 64, 96, 128, 160, 256):  # 40 / 96 / 160: the sm90 kernels' wider buckets on Hopper
            q = torch.randn(2, 77, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 131, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(2, 131, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            out = orchard.flash_attn_func(q, k, v, causal=causal, dropout_p=0.1 if d == 64 else 0.0,
                                          deterministic=causal and d == 64)
            out.backward(torch.randn_like(out))

def grad_call(fn, *tensors):
    out = fn()
    torch.autograd.grad(out, tensors, torch.randn_like(out))


slopes = torch.rand(4, device="cuda")
for dtype in (torch.bfloat16, torch.float32):
    q = torch.randn(2, 90, 4, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 50, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 50, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    sink = torch.randn(4, device="cuda", requires_grad=True)
    for kw in (dict(window_size=(3, 1)), dict(causal=True, window_size=(7, 0), softcap=5.0),
               dict(alibi_slopes=slopes, dropout_p=0.1), dict(causal=True, sink=sink, deterministic=True)):
        grad_call(lambda: orchard.flash_attn_func(q, k, v, **kw), q, k, v)
    cu_q = torch.tensor([0, 37, 37, 90], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 20, 33, 50], dtype=torch.int32, device="cuda")
    qp, kp, vp = (t[0].detach().requires_grad_() for t in (q, k, v))
    grad_call(lambda: orchard.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 53, 20, causal=True,
                                                     window_size=(9, -1)), qp, kp, vp)
torch.cuda.synchronize()
print("sanitizer case done")
