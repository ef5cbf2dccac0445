"""The two tiled fp32 kernel families on CUDA: the 3xTF32 tensor-core kernels (flash_fp32_tc.cu,
the default where they fit) and the SIMT kernels (flash_fp32.cu; ORCHARD_CUDA_FP32_TC=0, read
per call). Each feature, forward and backward, on both, against the float64 reference by the
tolerance rule; the debug log names the family that ran; the tensor-core backward is bitwise
deterministic; head dims above 128 keep the backward on SIMT."""

import itertools
import zlib

import pytest
import torch

import orchard
from feature_reference import feature_attention_ref
from helpers import check_close_rule, randn
from test_cpu_few_rows import check_against_references
from test_cuda_few_rows import _cuda_features

pytestmark = pytest.mark.cuda

ATOL = 2e-5

FEATURES = {  # test_cpu_few_rows.FEATURES' form (_cuda_features)
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(37, 5)),
    "softcap_alibi": dict(softcap=6.0, alibi=(1,)),
    "sink_causal": dict(sink=True, causal=True),
    "everything": dict(causal=True, window_size=(50, -1), softcap=8.0, alibi=(1,), sink=True),
}


@pytest.mark.parametrize("d,dv", [(40, 40), (64, 64), (128, 128), (36, 72), (128, 8)])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_forward_and_backward(feature, d, dv, fp32_family, debug_log):
    torch.manual_seed(zlib.crc32(f"{feature} {d} {dv}".encode()))
    b, sq, sk, hq, hkv = 2, 130, 150, 4, 2  # GQA, partial tiles at both ends
    q = randn(b, sq, hq, d, device="cuda", requires_grad=True)
    k = randn(b, sk, hkv, d, device="cuda", requires_grad=True)
    v = randn(b, sk, hkv, dv, device="cuda", requires_grad=True)
    dout = randn(b, sq, hq, dv, device="cuda")
    kw, ref_kw = _cuda_features(FEATURES[feature], b, hq)
    out = orchard.flash_attn_func(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    logged = debug_log()
    assert [ln.split()[0] for ln in logged] == ["FWD", "BWD"], logged
    assert all(fp32_family in ln for ln in logged), logged
    check_against_references(out, grads, q, k, v, dout, ref_kw, ATOL, f"{feature} d{d} dv{dv} {fp32_family}")


def test_dropout_masks_agree(fp32_family, debug_log):
    """Dropout forward and backward on either family: the returned keep-mask is Philox's (the same
    in both families for the same seed), and out / grads match the reference that applies it."""
    torch.manual_seed(12)
    q = randn(1, 90, 4, 64, device="cuda", requires_grad=True)
    k, v = (randn(1, 110, 2, 64, device="cuda", requires_grad=True) for _ in range(2))
    dout = randn(1, 90, 4, 64, device="cuda")
    torch.manual_seed(99)
    out, _, mask = orchard.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(debug_log()) == 2 and all(fp32_family in ln for ln in debug_log()), debug_log()
    keep = mask > 0 if mask.dtype != torch.bool else mask
    ref_kw = dict(causal=True, keep_mask=keep, dropout_p=0.3)
    check_against_references(out, grads, q, k, v, dout, ref_kw, ATOL, f"dropout {fp32_family}")


def test_widest_forward(fp32_family, debug_log):
    """d = 256 (the 32-tile accumulators; 133 KB of shared memory on the tensor-core path)."""
    torch.manual_seed(13)
    q = randn(2, 100, 2, 256, device="cuda")
    k, v = randn(2, 90, 2, 256, device="cuda"), randn(2, 90, 2, 256, device="cuda")
    out = orchard.flash_attn_func(q, k, v, causal=True)
    assert len(debug_log()) == 1 and fp32_family in debug_log()[0], debug_log()
    ref, _ = feature_attention_ref(q, k, v, causal=True)
    naive, _ = feature_attention_ref(q, k, v, causal=True, upcast=False)
    check_close_rule(out, ref, naive, ATOL, f"d256 {fp32_family}")


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_masks(mask, fp32_family, debug_log):
    """attn_mask through the SDPA drop-in, broadcast over heads (stride 0, read in place)."""
    torch.manual_seed(5)
    b, h, sq, sk, d = 2, 3, 70, 90, 64
    q = randn(b, h, sq, d, device="cuda", requires_grad=True)
    k, v = (randn(b, h, sk, d, device="cuda", requires_grad=True) for _ in range(2))
    if mask == "bool":
        m = torch.rand(b, 1, sq, sk, device="cuda") > 0.3
        m[:, :, :, 0] = True  # every row sees a key
    else:
        m = randn(b, 1, sq, sk, device="cuda")
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=m)
    dout = randn(*out.shape, device="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(debug_log()) == 2 and all(fp32_family in ln for ln in debug_log()), debug_log()
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    ref_kw = dict(bias=m)
    check_against_references(out.transpose(1, 2), [g.transpose(1, 2) for g in grads], qs, ks, vs,
                             dout.transpose(1, 2), ref_kw, ATOL, f"{mask} mask {fp32_family}")


def test_varlen(fp32_family, debug_log):
    torch.manual_seed(6)
    lens_q, lens_k = [5, 0, 70, 33], [9, 4, 70, 100]
    hq, hkv, d = 4, 1, 64
    starts_q, starts_k = [0, *itertools.accumulate(lens_q)], [0, *itertools.accumulate(lens_k)]
    cu_q = torch.tensor(starts_q, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(starts_k, dtype=torch.int32, device="cuda")
    q = randn(sum(lens_q), hq, d, device="cuda", requires_grad=True)
    k, v = (randn(sum(lens_k), hkv, d, device="cuda", requires_grad=True) for _ in range(2))
    out = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    dout = randn(*out.shape, device="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(debug_log()) == 2 and all(fp32_family in ln for ln in debug_log()), debug_log()
    got = [torch.zeros_like(t) for t in (q, k, v)]
    for i in range(len(lens_q)):
        if lens_q[i] == 0:  # its keys' dk, dv stay 0
            continue
        sl_q, sl_k = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
        qi, ki, vi = (t[s].detach().clone().requires_grad_() for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
        ref, _ = feature_attention_ref(qi[None], ki[None], vi[None], causal=True)
        naive, _ = feature_attention_ref(qi[None], ki[None], vi[None], causal=True, upcast=False)
        check_close_rule(out[sl_q][None], ref, naive, ATOL, f"varlen seq {i} {fp32_family}")
        ref_grads = torch.autograd.grad(ref, (qi, ki, vi), dout[sl_q][None].double())
        got[0][sl_q], got[1][sl_k], got[2][sl_k] = ref_grads
    for name, g, r in zip("qkv", grads, got):
        torch.testing.assert_close(g.double(), r.double(), atol=4 * ATOL, rtol=1e-4, msg=f"d{name} {fp32_family}")


def test_nan_in_v_is_nan_in_out_and_grads(fp32_family, debug_log):
    """A NaN in V as CUDA ops write it (0x7fffffff): out and the gradients are NaN exactly where the
    float64 reference's are, and close to it elsewhere (the tensor-core split once carried that NaN
    into -0 and dropped it from every product; the emulator's nan_v cases pin the same)."""
    torch.manual_seed(15)
    b, s, hq, hkv, d = 1, 80, 4, 2, 64  # non-causal: every row sees the NaN key, as the reference's do
    q = randn(b, s, hq, d, device="cuda", requires_grad=True)
    k = randn(b, s, hkv, d, device="cuda", requires_grad=True)
    v = randn(b, s, hkv, d, device="cuda")
    v.view(torch.int32)[0, 3, 0, 5] = 0x7FFFFFFF
    v.requires_grad_()
    dout = randn(b, s, hq, d, device="cuda")
    out = orchard.flash_attn_func(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(debug_log()) == 2 and all(fp32_family in ln for ln in debug_log()), debug_log()
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = feature_attention_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads]):
        nan = want.isnan()
        assert nan.any() or name == "dv", f"{name}: the reference has no NaN (test setup)"
        assert torch.equal(got.isnan(), nan), f"{name} {fp32_family}: {int((got.isnan() != nan).sum())} NaN mismatches"
        torch.testing.assert_close(got.double()[~nan], want[~nan], atol=4 * ATOL, rtol=1e-4, msg=f"{name} {fp32_family}")


def test_tensor_core_backward_is_deterministic(debug_log, monkeypatch):
    monkeypatch.delenv("ORCHARD_CUDA_FP32_TC", raising=False)
    torch.manual_seed(8)
    q = randn(2, 300, 8, 64, device="cuda", requires_grad=True)
    k, v = (randn(2, 300, 2, 64, device="cuda", requires_grad=True) for _ in range(2))
    dout = randn(2, 300, 8, 64, device="cuda")
    runs = [torch.autograd.grad(orchard.flash_attn_func(q, k, v, causal=True, dropout_p=0.0), (q, k, v), dout)
            for _ in range(2)]
    assert "fp32_3xtf32" in debug_log()[-1], debug_log()[-1]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_wide_heads_keep_the_backward_on_simt(debug_log, monkeypatch):
    """d > 128: the forward on tensor cores, the backward on SIMT (dK and dV's accumulators would
    not fit the registers next to the tiles')."""
    monkeypatch.delenv("ORCHARD_CUDA_FP32_TC", raising=False)
    torch.manual_seed(4)
    q = randn(1, 70, 2, 192, device="cuda", requires_grad=True)
    k, v = (randn(1, 80, 2, 192, device="cuda", requires_grad=True) for _ in range(2))
    dout = randn(1, 70, 2, 192, device="cuda")
    out = orchard.flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    logged = debug_log()
    assert "fp32_3xtf32" in logged[0] and "fp32_simt" in logged[1], logged
    check_against_references(out, grads, q, k, v, dout, dict(causal=True), ATOL, "d192")
