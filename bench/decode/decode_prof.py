"""One decode point for a profiler: Orchard's flash_attn_with_kvcache and SDPA on the same
keys, each called --calls times after a warm-up, inside cudaProfilerStart/Stop, so that
`ncu --profile-from-start off` (bench/decode/decode_ncu.sh) sees only those kernels.

  python3 bench/decode/decode_prof.py --b 64 --hkv 8 --hq 32 --L 131072 [--paged]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import orchard
import orchard.kvcache as okv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--paged", action="store_true", help="256-row pages in a shuffled block table")
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--no-sdpa", action="store_true")
    a = ap.parse_args()
    okv.CHECK_DEVICE_INDICES = False
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(a.b, 1, a.hq, a.d, device=dev, dtype=dt)
    k_new = torch.randn(a.b, 1, a.hkv, a.d, device=dev, dtype=dt)
    v_new = torch.randn_like(k_new)
    seqlens = torch.full((a.b,), a.L - 1, dtype=torch.int32, device=dev)
    if a.paged:
        page = 256
        nblk = a.b * a.L // page
        k_cache = torch.randn(nblk, page, a.hkv, a.d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(nblk, device=dev, dtype=torch.int64).to(torch.int32).view(a.b, a.L // page)
    else:
        k_cache = torch.randn(a.b, a.L, a.hkv, a.d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        table = None

    def ours():
        return orchard.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                              block_table=table)

    gqa = a.hq != a.hkv
    qs = q.transpose(1, 2)
    ks = torch.randn(a.b, a.hkv, a.L, a.d, device=dev, dtype=dt) if not a.no_sdpa else None
    vs = torch.randn_like(ks) if ks is not None else None

    def sdpa():
        return F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=gqa)

    for _ in range(3):
        ours()
        if ks is not None:
            sdpa()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(a.calls):
        ours()
    torch.cuda.synchronize()
    if ks is not None:
        for _ in range(a.calls):
            sdpa()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"decode_prof: b{a.b} hkv{a.hkv} hq{a.hq} L{a.L} d{a.d} paged={a.paged}: done")


if __name__ == "__main__":
    main()
