"""The aten route (issue 12, _ops._aten_forward): _C_torch.so serves
aten::_scaled_dot_product_fused_attention_overrideable (+ _backward) on CPU and CUDA
tensors, so the drop-ins' training calls can take torch's C++ autograd node instead of a
Python autograd.Function. Same kernels, so outputs and gradients must equal the Function
path's bit for bit; what the route cannot serve must take the Function path; the aten op
itself must implement SDPA's contract (checked against a float64 math reference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orchard
from orchard import _ops

from conftest import DEVICES
from helpers import eager_and_graph_replay, randn

ROUTE = bool(getattr(_ops, "_ATEN_LAYOUTS", None)) and getattr(_ops, "_ATEN_SDPA", None) is not None
needs_route = pytest.mark.skipif(not ROUTE, reason=f"aten route off (stable ops: {_ops.STABLE_OPS_STATUS})")
NODE = "ScaledDotProductFusedAttentionOverrideableBackward0"
FUNCTION = "GeneratedBackwardFor_orchard_flash_attn_forward_defaultBackward"
OV = torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default


def _dtype(device):
    return torch.float64 if device == "cpu" else torch.bfloat16


def _grads(fn, inputs, dout):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dout)


def _both_routes(monkeypatch, fn, inputs, dout, layouts=frozenset((True,))):
    """(out, grads, grad_fn name) with the route on (`layouts`) and off."""
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", layouts)
    out, grads = _grads(fn, inputs, dout)
    name = type(out.grad_fn).__name__
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset())
    ref, ref_grads = _grads(fn, inputs, dout)
    assert type(ref.grad_fn).__name__ in (FUNCTION, "TransposeBackward0", "SqueezeBackward1", "ViewBackward0")
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    return name


@needs_route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["causal", "causal_l_ne_s", "gqa", "plain", "bshd_storage", "rank3"])
def test_sdpa_dropin_route_matches_function(monkeypatch, device, case):
    dt = _dtype(device)
    b, hq, hkv, lq, lk, d = 2, 4, 4, 9, 9, 16
    causal, gqa = case.startswith("causal"), case == "gqa"
    if case == "causal_l_ne_s":
        lq, lk = 5, 11
    if gqa:
        hkv = 2
    if case == "bshd_storage":  # (B, H, S, D) views of BSHD tensors, read in place
        q, k, v = (randn(b, s, n, d, dtype=dt, device=device).transpose(1, 2).detach().requires_grad_()
                   for n, s in ((hq, lq), (hkv, lk), (hkv, lk)))
    elif case == "rank3":
        q, k, v = (randn(b, s, d, dtype=dt, device=device, requires_grad=True) for s in (lq, lk, lk))
    else:
        q, k, v = (randn(b, n, s, d, dtype=dt, device=device, requires_grad=True)
                   for n, s in ((hq, lq), (hkv, lk), (hkv, lk)))
    dout = randn(*q.shape, dtype=dt, device=device)

    def fn(q, k, v):
        return orchard.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    name = _both_routes(monkeypatch, fn, (q, k, v), dout)
    assert name == (NODE if case != "rank3" else "SqueezeBackward1"), name


def _mask(case, b, hq, lq, lk, dt, device):
    if case == "key_padding":  # (B, 1, 1, S) bool, one batch entry with no key
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)
        m[0, ..., 6:] = False
        m[1] = False
        return m
    if case == "dense_bool":  # (B, H, L, S) bool, a row hidden entirely
        m = torch.rand(b, hq, lq, lk, device=device) > 0.4
        m[:, :, 2] = False
        return m
    return randn(1, hq, lq, lk, dtype=dt, device=device)  # a float bias that needs no gradient


@needs_route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["key_padding", "dense_bool", "float_bias"])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_masked_route_matches_function(monkeypatch, device, case, gqa):
    # attn_mask through the aten op's attn_bias: torch's C++ node, the Function's results.
    dt = _dtype(device)
    b, hq, hkv, lq, lk, d = 2, 4, 2 if gqa else 4, 9, 11, 16
    q = randn(b, hq, lq, d, dtype=dt, device=device, requires_grad=True)
    k, v = (randn(b, hkv, lk, d, dtype=dt, device=device, requires_grad=True) for _ in range(2))
    mask = _mask(case, b, hq, lq, lk, dt, device)
    dout = randn(*q.shape, dtype=dt, device=device)

    def fn(q, k, v):
        return orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    assert _both_routes(monkeypatch, fn, (q, k, v), dout) == NODE


@needs_route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["key_padding", "dense_bool", "float_bias"])
def test_sdpa_masked_inference_through_the_aten_op(monkeypatch, device, case):
    # No gradient wanted (no_grad, or no input requires one): the aten op serves the call, with
    # the Function path's output bit for bit.
    dt = _dtype(device)
    q = randn(2, 4, 9, 16, dtype=dt, device=device)
    k, v = (randn(2, 2, 11, 16, dtype=dt, device=device) for _ in range(2))
    mask = _mask(case, 2, 4, 9, 11, dt, device)
    calls = []
    real = _ops._aten_forward
    monkeypatch.setattr(_ops, "_aten_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = []
    for layouts in (frozenset((True,)), frozenset()):
        monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", layouts)
        with torch.no_grad():
            outs.append(orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        outs.append(orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    assert len(calls) == 2  # both route-on calls, none with the route off
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert all(out.grad_fn is None for out in outs)


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_masked_calls_the_route_cannot_serve_keep_the_function(monkeypatch, device):
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True,)))
    dt = _dtype(device)
    q, k, v = (randn(1, 2, 6, 8, dtype=dt, device=device, requires_grad=True) for _ in range(3))
    bias = randn(1, 2, 6, 6, dtype=dt, device=device, requires_grad=True)  # its gradient: the Function's
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert type(out.grad_fn).__name__ != NODE  # the Function's out, transposed
    assert torch.autograd.grad(out.sum(), bias)[0].shape == bias.shape
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool, device=device)
    for kwargs in ({"dropout_p": 0.1}, {"sink": randn(2, device=device, dtype=torch.float32)}):
        out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=keep, **kwargs)
        assert type(out.grad_fn).__name__ != NODE, kwargs


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_and_leaf_backward(monkeypatch, device):
    # out.sum().backward(): a stride-0 gradient reaches the aten backward (staged by the bridge).
    dt = _dtype(device)
    qs = [randn(1, 2, 7, 8, dtype=dt, device=device) for _ in range(3)]
    grads = []
    for layouts in (frozenset((True,)), frozenset()):
        monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", layouts)
        q, k, v = (t.clone().requires_grad_() for t in qs)
        orchard.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for g, r in zip(*grads):
        assert torch.equal(g, r)


@needs_route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,lq,lk", [(True, 9, 9), (False, 5, 11), (True, 5, 11)])
def test_flash_attn_func_route_matches_function(monkeypatch, device, causal, lq, lk):
    dt = _dtype(device)
    q = randn(2, lq, 4, 16, dtype=dt, device=device, requires_grad=True)
    k, v = (randn(2, lk, 2, 16, dtype=dt, device=device, requires_grad=True) for _ in range(2))
    dout = randn(*q.shape, dtype=dt, device=device)
    name = _both_routes(monkeypatch, lambda q, k, v: orchard.flash_attn_func(q, k, v, causal=causal),
                        (q, k, v), dout, layouts=frozenset((True, False)))
    # bottom-right causal with sq != sk is not SDPA's contract: the Function serves it
    assert name == (FUNCTION if causal and lq != lk else "TransposeBackward0"), name


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_calls_the_route_cannot_serve_keep_the_function(monkeypatch, device):
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True, False)))
    dt = _dtype(device)
    q, k, v = (randn(1, 6, 2, 8, dtype=dt, device=device, requires_grad=True) for _ in range(3))
    out, lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert type(out.grad_fn).__name__ == FUNCTION and lse.requires_grad  # the lse is handed out
    out = orchard.flash_attn_func(q, k, v, causal=True, deterministic=True)
    assert type(out.grad_fn).__name__ == FUNCTION
    out = orchard.flash_attn_func(q, k, v, dropout_p=0.2)
    assert type(out.grad_fn).__name__ == FUNCTION
    qb, kb, vb = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        assert orchard.scaled_dot_product_attention(qb, kb, vb).grad_fn is None
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = orchard.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        assert type(out.grad_fn).__name__ == FUNCTION
    finally:
        torch.use_deterministic_algorithms(prev)


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_route_errors_are_the_function_paths(monkeypatch, device):
    # A call the aten op refuses re-runs on the Function path: same op-prefixed error.
    q = randn(1, 2, 5, 8, device=device, requires_grad=True)
    k = randn(1, 2, 5, 8, dtype=torch.float64, device=device, requires_grad=True)
    errors = []
    for layouts in (frozenset((True,)), frozenset()):
        monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", layouts)
        with pytest.raises(Exception) as e:
            orchard.scaled_dot_product_attention(q, k, k)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1], errors
    assert errors[0][1].startswith("orchard.scaled_dot_product_attention: "), errors


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_route_double_backward_is_refused(device):
    q = randn(1, 2, 5, 8, device=device, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, q, q)
    assert type(out.grad_fn).__name__ == NODE
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@needs_route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_aten_op_implements_sdpa(device, gqa, bias):
    # The registered kernel against torch's math SDPA in float64 (CPU) / fp32 reference (CUDA).
    dt = _dtype(device)
    q = randn(2, 4, 7, 16, dtype=dt, device=device, requires_grad=True)
    k, v = (randn(2, 2 if gqa else 4, 10, 16, dtype=dt, device=device, requires_grad=True) for _ in range(2))
    dout = randn(2, 4, 7, 16, dtype=dt, device=device)
    attn_bias = randn(2, 1, 7, 10, dtype=dt, device=device).expand(2, 4, 7, 10) if bias else None
    res = OV(q, k, v, attn_bias, 0.0, True, False, scale=0.3)
    out, lse = res[0], res[1]
    lse_dtype = torch.float64 if dt == torch.float64 else torch.float32  # Orchard's lse precision
    assert lse.shape == (2, 4, 7) and lse.dtype == lse_dtype and not lse.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    if bias:  # SDPA refuses is_causal with a mask: causal (top-left) folded into the bias
        hidden = torch.ones(7, 10, dtype=torch.bool, device=device).triu(1)
        ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=attn_bias.double().masked_fill(hidden, -torch.inf),
                                             scale=0.3, enable_gqa=gqa)
    else:
        ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=0.3, enable_gqa=gqa)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    def close(got, want):  # float64: exact to rounding; bf16: a few units of its 2^-8 epsilon
        tol = 1e-10 if dt == torch.float64 else 3e-2 * max(1.0, float(want.detach().abs().max()))
        return got.shape == want.shape and float((got.detach().double() - want.detach()).abs().max()) < tol

    assert close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert close(g, r)


@needs_route
@pytest.mark.parametrize("device", DEVICES)
def test_aten_op_refuses_what_it_cannot_serve(device):
    q = randn(1, 2, 5, 8, device=device)
    for kwargs in ({"dropout_p": 0.1}, {"return_debug_mask": True}):
        args = {"attn_bias": None, "dropout_p": 0.0, "is_causal": False, "return_debug_mask": False, **kwargs}
        with pytest.raises(RuntimeError, match="NotImplementedError.*does not take"):
            OV(q, q, q, args["attn_bias"], args["dropout_p"], args["is_causal"], args["return_debug_mask"])
    # attn_bias is served, but not its gradient
    qg = q.clone().requires_grad_()
    bias = randn(1, 2, 5, 5, device=device, requires_grad=True)
    out = OV(qg, q, q, bias.expand(1, 2, 5, 5), 0.0, False, False)[0]
    with pytest.raises(RuntimeError, match="NotImplementedError.*gradient of attn_bias"):
        torch.autograd.grad(out.sum(), (qg, bias))


@needs_route
@pytest.mark.cuda
@pytest.mark.parametrize("which", ["sdpa_dropin", "flash_attn_func"])
def test_cuda_graph_capture_through_the_route(monkeypatch, which):
    # fwd+bwd captured through the aten op (torch's C++ node) replays to the eager result.
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True, False)))
    shape = (2, 4, 128, 64) if which == "sdpa_dropin" else (2, 128, 4, 64)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def step():
        if which == "sdpa_dropin":
            out = orchard.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert type(out.grad_fn).__name__ == NODE
        else:
            out = orchard.flash_attn_func(q, k, v, causal=True)
            assert type(out.grad_fn).__name__ == "TransposeBackward0"
        return torch.autograd.grad(out, (q, k, v), do)

    eager, static = eager_and_graph_replay(step)
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_route
@pytest.mark.parametrize("masked", [False, True])
def test_route_gradcheck(monkeypatch, masked):
    # gradcheck's checks (undefined output gradients included) on torch's node around the kernels
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True,)))
    q = randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k, v = (randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = (torch.rand(1, 1, 5, 7) > 0.3) if masked else None

    def f(q, k, v):
        return orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert type(f(q, k, v).grad_fn).__name__ == NODE
    assert torch.autograd.gradcheck(f, (q, k, v))
