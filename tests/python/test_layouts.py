"""Layouts: BSHD, BHSD (permuted views), sliced, offset, expanded (stride 0),
last-dim-strided inputs and lazily negated views give the reference result; gradients land in the
caller's layout; the caller's inputs are never modified."""

import numpy as np
import pytest
import torch

import orchard
from orchard import _C
from conftest import DEVICES
from helpers import attention_ref, randn

B, SQ, SK, HQ, HKV, D = 2, 33, 47, 4, 2, 32


def _bshd(s, h, device):
    return randn(B, s, h, D, device=device)


def _bhsd(s, h, device):
    return randn(B, h, s, D, device=device).transpose(1, 2)


def _sliced(s, h, device):
    # Heads and sequence sliced out of a larger tensor (non-zero offset, gaps).
    big = randn(B + 1, s + 5, h + 3, D + 8, device=device)
    return big[1:, 2:2 + s, 1:1 + h, 4:4 + D]


def _offset(s, h, device):
    flat = randn(B * s * h * D + 13, device=device)
    return flat[13:].view(B, s, h, D)


def _expanded(s, h, device):
    # Batch broadcast with stride 0 (a common way to share k/v).
    return randn(1, s, h, D, device=device).expand(B, s, h, D)


def _last_dim_strided(s, h, device):
    # head_dim stride 2: not readable in place; the bridge stages one copy.
    return randn(B, s, h, 2 * D, device=device)[..., ::2]


def _fused_qkv_bhsd(s, h, device):
    # (B, H, S, 3, D)-style fused projection, split: row stride 3*D*H.
    return randn(B, s, 3, h, D, device=device)[:, :, 1]


LAYOUTS = {
    "bshd": _bshd, "bhsd": _bhsd, "sliced": _sliced, "offset": _offset,
    "expanded": _expanded, "lastdim_strided": _last_dim_strided, "fused_qkv": _fused_qkv_bhsd,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_layout_fwd_bwd(layout, causal, device):
    make = LAYOUTS[layout]
    q = make(SQ, HQ, device).requires_grad_()
    k = make(SK, HKV, device).requires_grad_()
    v = make(SK, HKV, device).requires_grad_()
    originals = [t.detach().clone() for t in (q, k, v)]
    do = _bhsd(SQ, HQ, device)  # upstream gradient in yet another layout
    out = orchard.flash_attn_func(q, k, v, causal=causal)
    out.backward(do)
    for t, o in zip((q, k, v), originals):
        assert torch.equal(t.detach(), o), "input was modified"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(q64, k64, v64, None, causal)
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, r in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_negated_views_are_read_as_negated(device):
    """A tensor with the negative bit set (torch._neg_view) stores the
    un-negated values (DLPack exports them as stored); reading its storage in
    place would be silently wrong. The dispatcher's Negative fallback resolves
    it before the op's direct CPU/CUDA path; this guards that."""
    q, k, v, do = (randn(B, s, h, D, device=device) for s, h in ((SQ, HQ), (SK, HKV), (SK, HKV), (SQ, HQ)))
    with torch.no_grad():  # no autograd in the way: the tensors reach the kernels directly
        torch.testing.assert_close(orchard.flash_attn_func(torch._neg_view(q), k, v),
                                   orchard.flash_attn_func(-q, k, v))
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    out = orchard.flash_attn_func(torch._neg_view(q1), k1, torch._neg_view(v1), causal=True)
    out.backward(torch._neg_view(do))
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = orchard.flash_attn_func(-q2, k2, -v2, causal=True)
    ref.backward(-do)
    torch.testing.assert_close(out, ref)
    for g, r in ((q1.grad, q2.grad), (k1.grad, k2.grad), (v1.grad, v2.grad)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_output_keeps_query_layout(device):
    q = randn(2, 4, 16, 32, device=device)  # contiguous (B, H, S, D)
    out = orchard.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.is_contiguous()
    qt = randn(2, 16, 4, 32, device=device).transpose(1, 2)  # BSHD storage seen as BHSD
    out = orchard.scaled_dot_product_attention(qt, qt, qt)
    assert out.stride() == qt.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_written_into_given_strided_views(device):
    """_C.backward writes dq/dk/dv through arbitrary strides and leaves the
    gaps between them untouched."""
    q, k, v = _bshd(SQ, HQ, device), _bshd(SK, HKV, device), _bshd(SK, HKV, device)
    out = torch.empty_like(q)
    lse = torch.empty(B, HQ, SQ, device=device)
    _C.forward(q, k, v, out, lse, None, None, True, False, 0.0, 0, 0, 0, "t")
    do = randn(B, SQ, HQ, D, device=device)
    sentinel = 1234.5
    dq_store = torch.full((B, HQ, SQ, D + 3), sentinel, device=device)
    dk_store = torch.full((B, HKV, SK, D * 2), sentinel, device=device)
    dv_store = torch.full((SK, B, HKV, D), sentinel, device=device)
    dq = dq_store[..., 1:1 + D].transpose(1, 2)
    dk = dk_store[..., ::2].transpose(1, 2)   # last-dim stride 2: staged, then scattered back
    dv = dv_store.permute(1, 0, 2, 3)
    opts = (None, True, False, 0.0, 0, 0, False, 0, "t")
    nbytes = _C.backward_workspace_bytes(q, k, v, out, do, lse, dq, dk, dv, *opts)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    _C.backward(q, k, v, out, do, lse, dq, dk, dv, ws, *opts)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(qr, kr, vr, None, True)
    ref.backward(do.double())
    torch.testing.assert_close(dq.double(), qr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dk.double(), kr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv.double(), vr.grad, atol=1e-4, rtol=1e-4)
    assert torch.all(dq_store[..., 0] == sentinel) and torch.all(dq_store[..., 1 + D:] == sentinel)
    assert torch.all(dk_store[..., 1::2] == sentinel)


def test_numpy_arrays_through_the_binding():
    """The extension is framework-neutral: NumPy arrays (incl. read-only
    inputs and a BHSD-permuted view) work zero-copy through DLPack/buffers."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 8, 2, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 12, 16)).astype(np.float32).transpose(0, 2, 1, 3)  # BHSD storage
    v = rng.standard_normal((2, 12, 2, 16)).astype(np.float32)
    q.flags.writeable = False
    out = np.empty_like(q)
    lse = np.empty((2, 2, 8), dtype=np.float32)
    _C.forward(q, k, v, out, lse, None, None, False, False, 0.0, 0, 0, 0, "numpy")
    ref, ref_lse = attention_ref(torch.from_numpy(q.copy()), torch.from_numpy(np.ascontiguousarray(k)),
                                 torch.from_numpy(v))
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, ref_lse.numpy(), atol=1e-5, rtol=1e-4)


def test_binding_errors_are_typed():
    q = np.ones((1, 4, 1, 8), dtype=np.float32)
    out, lse = np.empty_like(q), np.empty((1, 1, 4), np.float32)
    with pytest.raises(ValueError, match="^mybind: "):
        _C.forward(q, q, q, out, np.empty((1, 1, 5), np.float32), None, None, False, False, 0.0, 0, 0, 0, "mybind")
    with pytest.raises(ValueError, match="unsupported dtype"):
        qi = q.astype(np.int32)
        _C.forward(qi, qi, qi, out, lse, None, None, False, False, 0.0, 0, 0, 0, "mybind")
    with pytest.raises(ValueError, match="dropout_p"):
        _C.forward(q, q, q, out, lse, None, None, False, False, 1.5, 0, 0, 0, "mybind")
    info = _C.build_info()
    assert {"version", "cuda_compiled", "cuda_archs", "openmp", "cpu_threads", "cuda_devices"} <= set(info)
