"""Orchard's CUDA path on CuPy arrays (marked `cuda`; skipped without CuPy, a GPU
or orchard's CUDA backend).

Two routes, both zero-copy: orchard._C (which takes any DLPack array, as
docs/numpy.md documents) called on CuPy arrays with CuPy's stream, forward and
backward; and CuPy arrays viewed as torch tensors with torch.from_dlpack, run
through the public torch API (orchard.flash_attn_func with autograd) and viewed
back with cupy.from_dlpack. Checked against a float64 NumPy reference with
flash-attn's rule (error <= 2x a naive same-dtype computation's + atol)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

cp = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")

from orchard import _C  # noqa: E402


@pytest.fixture(autouse=True)
def _cupy_gpu():
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy installed for another CUDA, or no driver
        pytest.skip(f"CuPy cannot reach a GPU: {e}")
    if n == 0:
        pytest.skip("CuPy sees no GPU")
    if not _C.build_info()["cuda_compiled"]:
        pytest.skip("this orchard build has no CUDA backend (ORCHARD_CUDA=OFF)")


def _ref(q, k, v, dout=None, causal=False, scale=None, dtype=np.float64):
    """Attention on BSHD NumPy arrays computed in `dtype` (float64: the reference;
    the inputs' dtype: the naive baseline), bottom-right causal, GQA. Returns
    (out, lse), or with dout also (dq, dk, dv)."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rep = h // hkv
    scale = dtype(1 / math.sqrt(d) if scale is None else scale)
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if causal:
        hide = np.arange(sk)[None, :] > np.arange(sq)[:, None] + (sk - sq)
        s = np.where(hide, -np.inf, s)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (np.log(p.sum(-1, keepdims=True)) + m)[..., 0]
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    if dout is None:
        return out, lse
    dout = dout.astype(dtype)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale

    def fold(x):
        return x.reshape(b, sk, hkv, rep, -1).sum(3)

    return out, lse, dq, fold(dk), fold(dv)


def _rule(got, ref, naive, atol, what):
    got = cp.asnumpy(got).astype(np.float64) if isinstance(got, cp.ndarray) else np.asarray(got, np.float64)
    naive = np.asarray(naive, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err, base = np.abs(got - ref).max(), np.abs(naive - ref).max()
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 * naive error {base:.3e} + {atol:.1e}"


def _inputs(dtype, b=2, sq=96, sk=128, h=8, hkv=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype)
            for s in ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, sq, h, d))]


_ATOL = {np.float16: 2e-4, np.float32: 2e-5}


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: t.__name__)
@pytest.mark.parametrize("causal", [False, True])
def test_c_forward_backward_on_cupy_arrays(dtype, causal):
    """orchard._C on CuPy arrays on a non-blocking CuPy stream: GQA, seqlen_q != seqlen_k."""
    qh, kh, vh, doh = _inputs(dtype)
    ref_out, ref_lse, *ref_grads = _ref(qh, kh, vh, doh, causal=causal)
    naive_out, _, *naive_grads = _ref(qh, kh, vh, doh, causal=causal, dtype=dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v, dout = (cp.asarray(a) for a in (qh, kh, vh, doh))
        out = cp.empty_like(q)
        lse = cp.empty((2, 8, 96), dtype=cp.float32)
        _C.forward(q, k, v, out, lse, None, None, causal, False, 0.0, 0, 0, stream.ptr, "cupy.attention")
        dq, dk, dv = cp.empty_like(q), cp.empty_like(k), cp.empty_like(v)
        args = (q, k, v, out, dout, lse, dq, dk, dv)
        opts = (None, causal, False, 0.0, 0, 0, False, stream.ptr, "cupy.attention")
        nbytes = _C.backward_workspace_bytes(*args, *opts)
        workspace = cp.empty(nbytes, dtype=cp.uint8) if nbytes else None
        _C.backward(*args, workspace, *opts)
    stream.synchronize()
    atol = _ATOL[dtype]
    _rule(out, ref_out, naive_out, atol, "out")
    np.testing.assert_allclose(cp.asnumpy(lse), ref_lse, atol=1e-4 if dtype == np.float32 else 2e-2, rtol=0)
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive_grads):
        _rule(g, r, n, 4 * atol, name)


def test_c_reads_transposed_cupy_views_in_place_on_the_given_stream():
    """BHSD-stored CuPy arrays passed as BSHD views; the inputs are produced on a
    busy non-blocking stream right before the call, so a launch on any other
    stream would read them unfinished."""
    qh, kh, vh, _ = _inputs(np.float16, b=1, sq=256, sk=256, h=4, hkv=4, d=64, seed=1)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        big = cp.random.standard_normal((4096, 4096), dtype=cp.float32)
        for _ in range(8):
            big = cp.tanh(big @ big / 64.0)  # keep the stream busy for a while
        # (B, H, S, D) storage, written on `stream` after the matmuls
        q, k, v = (cp.ascontiguousarray(cp.asarray(a).transpose(0, 2, 1, 3)) for a in (qh, kh, vh))
        qv, kv, vv = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # BSHD views of BHSD memory
        assert not qv.flags.c_contiguous
        out = cp.empty(qv.shape, dtype=cp.float16)
        lse = cp.empty((1, 4, 256), dtype=cp.float32)
        _C.forward(qv, kv, vv, out, lse, None, None, True, False, 0.0, 0, 0, stream.ptr, "cupy.attention")
        result = out * 1  # a consumer on the same stream
    stream.synchronize()
    ref, _ = _ref(qh, kh, vh, causal=True)
    naive, _ = _ref(qh, kh, vh, causal=True, dtype=np.float16)
    _rule(result, ref, naive, _ATOL[np.float16], "out")


def test_bad_cupy_input_is_an_op_prefixed_value_error():
    q = cp.zeros((1, 4, 3, 64), cp.float16)
    k = cp.zeros((1, 4, 2, 64), cp.float16)  # 3 query heads, 2 kv heads
    out, lse = cp.empty_like(q), cp.empty((1, 3, 4), cp.float32)
    with pytest.raises(ValueError, match=r"^cupy.attention: "):
        _C.forward(q, k, k, out, lse, None, None, False, False, 0.0, 0, 0,
                   cp.cuda.get_current_stream().ptr, "cupy.attention")


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: t.__name__)
def test_torch_from_dlpack_of_cupy_arrays_through_the_public_api(dtype):
    """CuPy -> torch.from_dlpack (zero-copy) -> orchard.flash_attn_func with autograd
    -> cupy.from_dlpack; gradients against the float64 reference."""
    import orchard

    qh, kh, vh, doh = _inputs(dtype, seed=2)
    ref_out, _, *ref_grads = _ref(qh, kh, vh, doh, causal=True)
    naive_out, _, *naive_grads = _ref(qh, kh, vh, doh, causal=True, dtype=dtype)
    q_cp, k_cp, v_cp, do_cp = (cp.asarray(a) for a in (qh, kh, vh, doh))
    cp.cuda.get_current_stream().synchronize()
    q, k, v, do = (torch.from_dlpack(a) for a in (q_cp, k_cp, v_cp, do_cp))
    assert q.is_cuda and q.data_ptr() == q_cp.data.ptr  # a view, not a copy
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = orchard.flash_attn_func(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    out_cp = cp.from_dlpack(out.detach())
    assert out_cp.data.ptr == out.data_ptr()
    torch.cuda.synchronize()
    atol = _ATOL[dtype]
    _rule(out_cp, ref_out, naive_out, atol, "out")
    for name, g, r, n in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, naive_grads):
        _rule(cp.from_dlpack(g), r, n, 4 * atol, name)
