"""Small flash_attn_with_kvcache calls for compute-sanitizer to watch the CUDA decode
kernels (streaming attention kernel for 16-bit caches, FMA kernel for fp32, append,
combine): paged (page 16 / 48 / 256) and contiguous caches, split-KV (forced and
heuristic), in-kernel append with rotary, leftpad, GQA groups of 8 and 20 rows
(two row chunks), d 64 / 128 / 256, windows, softcap + ALiBi, and a non-16-byte-
readable k/v (the separate append kernel).

    compute-sanitizer --tool memcheck python3 bench/sanitizer_decode.py
"""
import math

import torch

import orchard

torch.manual_seed(0)
dev = "cuda"


def case(dtype, b, sq, hq, hkv, d, cap, s_new, page=None, rotary=False, leftpad=False, **opts):
    if page:
        per = -(-cap // page)
        nb = b * per + 2
        kc = torch.randn(nb, page, hkv, d, device=dev).to(dtype)
        vc = torch.randn(nb, page, hkv, d, device=dev).to(dtype)
        kw = dict(block_table=torch.randperm(nb, device=dev)[:b * per].view(b, per).to(torch.int32))
        cap = per * page
    else:
        kc = torch.randn(b, cap, hkv, d, device=dev).to(dtype)
        vc = torch.randn(b, cap, hkv, d, device=dev).to(dtype)
        kw = {}
    q = torch.randn(b, sq, hq, d, device=dev).to(dtype)
    sl = torch.randint(cap // 2, cap - s_new + 1, (b,))
    sl[0] = cap - s_new
    kw["cache_seqlens"] = sl.to(dev, torch.int32)
    if leftpad:
        kw["cache_leftpad"] = (sl // 3).to(dev, torch.int32)
    if s_new:
        kw["k"] = torch.randn(b, s_new, hkv, d, device=dev).to(dtype)
        kw["v"] = torch.randn(b, s_new, hkv, d, device=dev).to(dtype)
    if rotary:
        ang = torch.rand(cap + 8, d // 4, device=dev) * 2 * math.pi
        kw["rotary_cos"], kw["rotary_sin"] = torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)
    out, lse = orchard.flash_attn_with_kvcache(q, kc, vc, **kw, **opts, return_softmax_lse=True)
    assert torch.isfinite(out).all()
    return out


bf, fp = torch.bfloat16, torch.float16
case(bf, 1, 1, 32, 4, 128, 3000, 1, page=256, rotary=True, causal=True)              # heuristic splits
case(bf, 2, 1, 8, 8, 128, 700, 1, page=16, causal=True, num_splits=5)                 # MHA, forced splits
case(fp, 2, 3, 8, 1, 64, 500, 3, page=48, rotary=True, leftpad=False, causal=True)    # 24 rows: 2 chunks
case(bf, 3, 2, 20, 2, 128, 300, 2, leftpad=True, rotary=True, causal=True, num_splits=3)
case(bf, 2, 4, 4, 2, 256, 400, 1, page=16, window_size=(37, 2), num_splits=2)
case(fp, 2, 2, 4, 2, 72, 200, 1, softcap=5.0, alibi_slopes=torch.rand(4, device=dev) * 0.2, causal=True)
case(torch.float32, 2, 2, 8, 2, 128, 300, 1, page=16, causal=True, num_splits=3)     # fp32 kernel
case(torch.float32, 1, 1, 4, 4, 256, 200, 1, rotary=True, causal=True)
# k / v that are not 16-byte readable: the separate append kernel, then attention.
q = torch.randn(2, 1, 8, 64, device=dev, dtype=bf)
kc = torch.randn(2, 256, 2, 64, device=dev, dtype=bf)
vc = torch.randn_like(kc)
kn = torch.randn(2, 1, 2, 65, device=dev, dtype=bf)[..., 1:]
vn = torch.randn(2, 1, 2, 65, device=dev, dtype=bf)[..., 1:]
sl = torch.tensor([200, 255], device=dev, dtype=torch.int32)
orchard.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=sl, causal=True)
torch.cuda.synchronize()
print("sanitizer decode case done")
