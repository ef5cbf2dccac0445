"""Forward/backward vs a float64 math reference, with flash-attn's tolerance
rule: |orchard - ref| <= 2 * |naive same-dtype math - ref| + atol."""

import pytest
import torch

import orchard
from conftest import DEVICES
from helpers import attention_ref, check_close_rule, randn

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}

CASES = [
    # b, sq, sk, hq, hkv, d, causal
    (2, 64, 64, 4, 4, 64, False),
    (2, 64, 64, 4, 4, 64, True),
    (1, 77, 131, 4, 2, 32, True),     # sq < sk, GQA, ragged tiles
    (2, 130, 41, 6, 2, 40, True),     # sq > sk: bottom-right masks whole rows
    (1, 33, 65, 2, 1, 128, False),    # MQA, d=128
]


def _run(case, dtype, device, top_left=False):
    b, sq, sk, hq, hkv, d, causal = case
    q = randn(b, sq, hq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(b, sk, hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(b, sk, hkv, d, dtype=dtype, device=device, requires_grad=True)
    do = randn(b, sq, hq, d, dtype=dtype, device=device)
    scale = d ** -0.5
    out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, top_left, 0.0, 0, 0, False)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_ref(q64, k64, v64, scale, causal, top_left)
    rdq, rdk, rdv = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive, _ = attention_ref(qn, kn, vn, scale, causal, top_left, upcast=False)
    ndq, ndk, ndv = torch.autograd.grad(naive, (qn, kn, vn), do)
    return dict(out=(out, ref, naive), dq=(dq, rdq, ndq), dk=(dk, rdk, ndk), dv=(dv, rdv, ndv),
                lse=(lse, ref_lse))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}-{}_d{}_{}".format(*c[:6], "causal" if c[6] else "full"))
def test_fwd_bwd_vs_reference(case, dtype, device):
    r = _run(case, dtype, device)
    for name in ("out", "dq", "dk", "dv"):
        got, ref, naive = r[name]
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.isfinite(got).all(), name
        # Gradients accumulate over more terms: the rule's atol grows with it.
        atol = ATOL[dtype] * (1 if name == "out" else 4)
        check_close_rule(got, ref, naive, atol, what=f"{name} {dtype}")
    lse, ref_lse = r["lse"]
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    lse, ref_lse = lse.cpu().double(), ref_lse.cpu().double()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_top_left_causal_vs_reference(device):
    r = _run((2, 50, 70, 4, 2, 32, True), torch.float32, device, top_left=True)
    for name in ("out", "dq", "dk", "dv"):
        got, ref, naive = r[name]
        check_close_rule(got, ref, naive, 4 * ATOL[torch.float32], what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero(device):
    # sq > sk with bottom-right causal: the first sq - sk rows see no key.
    b, sq, sk, h, d = 1, 20, 8, 2, 16
    q = randn(b, sq, h, d, device=device, requires_grad=True)
    k = randn(b, sk, h, d, device=device, requires_grad=True)
    v = randn(b, sk, h, d, device=device, requires_grad=True)
    out, lse, _ = orchard.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, : sq - sk] == 0)
    assert torch.all(torch.isneginf(lse[:, :, : sq - sk]))
    assert torch.isfinite(lse[:, :, sq - sk:]).all()
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.all(q.grad[:, : sq - sk] == 0)


@pytest.mark.parametrize("device", DEVICES)
# 0.3 is not representable in float32: float64 calls must use the unrounded
# scale (FwdParams::scale_f64), or this fails at ~1e-8 relative.
@pytest.mark.parametrize("scale", [0.25, 0.3])
def test_float64_exact(device, scale):
    q = randn(1, 8, 2, 8, dtype=torch.float64, device=device)
    out, lse, mask = torch.ops.orchard.flash_attn_forward(q, q, q, scale, False, False, 0.0, 0, 0, False)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64 and mask.numel() == 0
    ref, ref_lse = attention_ref(q, q, q, scale)
    torch.testing.assert_close(out, ref.to(device), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse.to(device), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    q = randn(2, 96, 4, 32, device=device, requires_grad=True)
    k = randn(2, 96, 2, 32, device=device, requires_grad=True)
    v = randn(2, 96, 2, 32, device=device, requires_grad=True)
    do = randn(2, 96, 4, 32, device=device)
    grads = []
    for _ in range(2):
        out = orchard.flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
