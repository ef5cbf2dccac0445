"""orchard._C on NumPy arrays (CPU) and CuPy arrays (GPU, marked cuda) through
DLPack: the same build the PyTorch ops use, no torch involved in the call.
docs/numpy.md documents this usage (its examples run in test_docs.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from orchard import _C


def _attention_ref(q, k, v, scale, causal):
    """float64 NumPy reference on BSHD arrays, GQA by repeating heads; (out, lse)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:  # bottom-right aligned (flash-attn convention)
        sq, sk = s.shape[-2:]
        hide = np.arange(sk)[None, :] > np.arange(sq)[:, None] + (sk - sq)
        s = np.where(hide, -np.inf, s)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (np.log(p.sum(-1, keepdims=True)) + m)[..., 0]
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), lse, p


def _forward(q, k, v, causal, scale=None):
    b, sq, hq, _ = q.shape
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    lse = np.empty((b, hq, sq), dtype=np.float64 if q.dtype == np.float64 else np.float32)
    _C.forward(q, k, v, out, lse, None, scale, causal, False, 0.0, 0, 0, 0, "numpy.attention")
    return out, lse


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6), (np.float16, 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_numpy_reference(dtype, tol, causal):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 4, 16)).astype(dtype)
    k = rng.standard_normal((2, 9, 2, 16)).astype(dtype)  # GQA, seqlen_k != seqlen_q
    v = rng.standard_normal((2, 9, 2, 16)).astype(dtype)
    out, lse = _forward(q, k, v, causal)
    want, want_lse, _ = _attention_ref(q, k, v, 1 / 4, causal)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=tol, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=max(tol, 1e-5), rtol=0)


def test_views_and_read_only_inputs_are_read_in_place():
    """BHSD-stored arrays handed over as transposed (BSHD) views, read-only."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 10, 8)) for _ in range(3))  # (B, H, S, D) float64
    for a in (q, k, v):
        a.flags.writeable = False
    qv, kv, vv = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    assert not qv.flags.c_contiguous
    out, _ = _forward(qv, kv, vv, causal=True, scale=0.3)
    want, _, _ = _attention_ref(qv, kv, vv, 0.3, True)
    np.testing.assert_allclose(out, want, atol=1e-12)


def test_backward_matches_numpy_reference():
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((1, 6, 2, 8)) for _ in range(4))
    scale = 1 / np.sqrt(8)
    out, lse = _forward(q, k, v, causal=True)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    args = (q, k, v, out, dout, lse, dq, dk, dv)
    opts = (None, True, False, 0.0, 0, 0, False, 0, "numpy.attention")
    nbytes = _C.backward_workspace_bytes(*args, *opts)
    workspace = np.empty(nbytes, dtype=np.uint8) if nbytes else None
    _C.backward(*args, workspace, *opts)
    # analytic gradients of softmax attention in float64
    _, _, p = _attention_ref(q, k, v, scale, True)  # (b, h, q, k)
    do = dout.transpose(0, 2, 1, 3)
    vh, kh, qh = (x.transpose(0, 2, 1, 3) for x in (v, k, q))
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    want_dq = (ds @ kh * scale).transpose(0, 2, 1, 3)
    want_dk = (ds.transpose(0, 1, 3, 2) @ qh * scale).transpose(0, 2, 1, 3)
    want_dv = (p.transpose(0, 1, 3, 2) @ do).transpose(0, 2, 1, 3)
    for got, want in ((dq, want_dq), (dk, want_dk), (dv, want_dv)):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_bad_input_is_an_op_prefixed_value_error():
    q = np.zeros((1, 4, 3, 8), np.float32)
    k = np.zeros((1, 4, 2, 8), np.float32)  # 3 query heads, 2 kv heads
    with pytest.raises(ValueError, match=r"^numpy.attention: "):
        _forward(q, k, k, causal=False)
    with pytest.raises(ValueError, match="dtype"):
        _forward(q.astype(np.int16), k.astype(np.int16), k.astype(np.int16), causal=False)


def test_core_imports_and_runs_without_torch():
    """With torch unimportable, orchard imports, orchard._C serves NumPy, and the
    torch API raises a clear ImportError."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, orchard\n"
        "q = np.ones((1, 3, 1, 4), np.float32); out = np.empty_like(q)\n"
        "lse = np.empty((1, 1, 3), np.float32)\n"
        "orchard._C.forward(q, q, q, out, lse, None, None, True, False, 0.0, 0, 0, 0, 'np')\n"
        "assert np.allclose(out, 1.0), out\n"
        "try:\n    orchard.flash_attn_func(q, q, q)\nexcept ImportError as e:\n"
        "    assert 'needs torch' in str(e); print('ok')\n"
    )
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.cuda
def test_cupy_forward_on_current_stream():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    qh, kh, vh = (rng.standard_normal((2, 64, 4, 64)).astype(np.float16) for _ in range(3))
    q, k, v = (cp.asarray(a) for a in (qh, kh, vh))
    out = cp.empty_like(q)
    lse = cp.empty((2, 4, 64), dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        _C.forward(q, k, v, out, lse, None, None, True, False, 0.0, 0, 0, stream.ptr, "cupy.attention")
    stream.synchronize()
    want, _, _ = _attention_ref(qh, kh, vh, 1 / 8, True)
    np.testing.assert_allclose(cp.asnumpy(out).astype(np.float64), want, atol=2e-2)
