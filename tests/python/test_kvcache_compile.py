"""flash_attn_with_kvcache under torch.compile: the call is the traceable op
orchard::kvcache_forward (caches declared mutated, a fake kernel), so a compiled decode
step is one graph that appends to the caches in place and gives the eager call's answer
bit for bit; opcheck on the op; on a GPU, the compiled step under CUDA graphs
(mode="reduce-overhead")."""

from __future__ import annotations

import pytest
import torch

import orchard
from orchard import kvcache


def _caches(device, dtype, b=2, hkv=2, d=64, capacity=64, page=None):
    if page is None:
        shape = (b, capacity, hkv, d)
        table = None
    else:
        pages = b * capacity // page
        shape = (pages, page, hkv, d)
        table = torch.randperm(pages, device=device).to(torch.int32).view(b, -1)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), table


def _decode_loop(step, device, dtype, kc, vc, table, steps=4, hq=4, hkv=2, d=64, b=2):
    gen = torch.Generator().manual_seed(0)
    rot = torch.rand(64, 16, generator=gen)
    cos, sin = rot.cos().to(device), rot.sin().to(device)
    outs = []
    with torch.no_grad():
        for t in range(steps):
            q, k, v = (torch.randn(b, 1, h, d, generator=gen).to(device, dtype) for h in (hq, hkv, hkv))
            seqlens = torch.tensor([3 + t, 17 + 2 * t], dtype=torch.int32, device=device)
            outs.append(step(q, k, v, kc, vc, seqlens, table, cos, sin))
    return outs


def _step(q, k, v, kc, vc, seqlens, table, cos, sin):
    return orchard.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens, block_table=table,
                                           rotary_cos=cos, rotary_sin=sin, causal=True, return_softmax_lse=True)


@pytest.mark.parametrize("page", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_steps_are_one_graph_and_append_in_place(page, dtype):
    torch._dynamo.reset()
    kc_e, vc_e, table = _caches("cpu", dtype, page=page)
    kc_c, vc_c = kc_e.clone(), vc_e.clone()
    ptrs = (kc_c.data_ptr(), vc_c.data_ptr())
    eager = _decode_loop(_step, "cpu", dtype, kc_e, vc_e, table)
    compiled_step = torch.compile(_step, fullgraph=True, dynamic=False)
    compiled = _decode_loop(compiled_step, "cpu", dtype, kc_c, vc_c, table)
    for (oe, le), (oc, lc) in zip(eager, compiled):
        torch.testing.assert_close(oc, oe, atol=0, rtol=0)
        torch.testing.assert_close(lc, le, atol=0, rtol=0)
    # The appended rows landed in the caller's caches (no functionalization copy).
    assert (kc_c.data_ptr(), vc_c.data_ptr()) == ptrs
    torch.testing.assert_close(kc_c, kc_e, atol=0, rtol=0)
    torch.testing.assert_close(vc_c, vc_e, atol=0, rtol=0)
    assert kc_c.abs().sum() > 0


def test_compiled_call_without_lse_or_new_keys():
    torch._dynamo.reset()
    kc, vc, _ = _caches("cpu", torch.float32)
    kc.normal_()
    vc.normal_()
    q = torch.randn(2, 3, 4, 64)
    seqlens = torch.tensor([9, 40], dtype=torch.int32)

    def f(q):
        return orchard.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True) * 2

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(q), f(q), atol=0, rtol=0)


def test_opcheck():
    kc, vc, table = _caches("cpu", torch.float32, page=16)
    q, k, v = torch.randn(2, 2, 4, 64), torch.randn(2, 2, 2, 64), torch.randn(2, 2, 2, 64)
    seqlens = torch.tensor([5, 30], dtype=torch.int32)
    args = (q, kc, vc, k, v, None, None, seqlens, None, None, table, None, None, True, -1, -1, 0.0, True, 0, True)
    torch.library.opcheck(kvcache._TRACED, args)


@pytest.mark.cuda
def test_cuda_compiled_decode_under_cuda_graphs():
    torch._dynamo.reset()
    kc_e, vc_e, table = _caches("cuda", torch.bfloat16, page=16)
    kc_c, vc_c = kc_e.clone(), vc_e.clone()
    eager = _decode_loop(_step, "cuda", torch.bfloat16, kc_e, vc_e, table, steps=6)
    compiled_step = torch.compile(_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    compiled = _decode_loop(compiled_step, "cuda", torch.bfloat16, kc_c, vc_c, table, steps=6)
    for (oe, le), (oc, lc) in zip(eager, compiled):
        torch.testing.assert_close(oc, oe, atol=0, rtol=0)
        torch.testing.assert_close(lc, le, atol=0, rtol=0)
    torch.testing.assert_close(kc_c, kc_e, atol=0, rtol=0)
