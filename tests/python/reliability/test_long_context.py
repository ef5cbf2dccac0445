"""Long context: s = 128k (b=1, h=16, d=128, bf16, causal) forward+backward
runs, is finite, matches spot checks against a float32 reference, and its
peak memory is far below one S x S buffer (which alone would be 32 GiB in
bf16 per head). The peak is printed for the device log."""

from __future__ import annotations

import math
import os

import pytest
import torch

import orchard

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

S = int(os.environ.get("ORCHARD_LONG_CONTEXT_S", 128 * 1024))
B, H, D = 1, 16, 128
N = 16  # rows / keys spot-checked at each end
PEAK_LIMIT = 8 * 2 ** 30


def _err(got, ref):
    return ((got.float() - ref.float()).abs().max() / max(1.0, ref.float().abs().max().item())).item()


def test_long_context_128k_causal_fwd_bwd():
    dev = torch.device("cuda")
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(B, S, H, D, device=dev, generator=g).to(dt) for _ in range(4))
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = orchard.flash_attn_func(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(f"\n[long-context] s={S} b={B} h={H} d={D} bf16 causal: peak allocated {peak / 2**30:.2f} GiB "
          f"({(peak - base) / 2**30:.2f} GiB above the inputs; an S x S bf16 matrix per head would be "
          f"{S * S * 2 / 2**30:.0f} GiB)")
    assert peak < PEAK_LIMIT, f"peak {peak / 2**30:.2f} GiB >= 8 GiB"
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"

    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        qf, kf, vf, dof = (t.detach().float() for t in (q, k, v, dout))
        # first N query rows only see the first N keys: a small full problem
        s = torch.einsum("bihd,bjhd->bhij", qf[:, :N], kf[:, :N]) * scale
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        p = s.softmax(-1)
        o_first = torch.einsum("bhij,bjhd->bihd", p, vf[:, :N])
        assert _err(out[:, :N], o_first) < 2e-2, "first rows of out"
        dp = torch.einsum("bihd,bjhd->bhij", dof[:, :N], vf[:, :N])
        dd = (dof[:, :N] * o_first).sum(-1).transpose(1, 2)[..., None]
        dq_first = torch.einsum("bhij,bjhd->bihd", p * (dp - dd), kf[:, :N]) * scale
        assert _err(dq[:, :N], dq_first) < 3e-2, "first rows of dq"

        # last N query rows see every key; the last N keys are seen only by them
        s = torch.einsum("bihd,bjhd->bhij", qf[:, -N:], kf) * scale
        cols = torch.arange(S, device=dev)
        rows = torch.arange(S - N, S, device=dev)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        p = s.softmax(-1)
        o_last = torch.einsum("bhij,bjhd->bihd", p, vf)
        assert _err(out[:, -N:], o_last) < 2e-2, "last rows of out"
        dp = torch.einsum("bihd,bjhd->bhij", dof[:, -N:], vf)
        dd = (dof[:, -N:] * o_last).sum(-1).transpose(1, 2)[..., None]
        ds = p * (dp - dd)
        dk_last = torch.einsum("bhij,bihd->bjhd", ds[..., -N:], qf[:, -N:]) * scale
        dv_last = torch.einsum("bhij,bihd->bjhd", p[..., -N:], dof[:, -N:])
        assert _err(dk[:, -N:], dk_last) < 3e-2, "last keys of dk"
        assert _err(dv[:, -N:], dv_last) < 2e-2, "last keys of dv"
