"""The stable-ABI C++ ops (orchard/_C_torch.so) and the drop-ins' eager path.

Both paths call the same C++ core, so their results must agree bit for bit with
the DLPack path (and each other) in outputs, LSE, masks, strides and gradients,
and they must raise the same op-prefixed errors. The fallback (torch < 2.10,
no _C_torch.so, ORCHARD_DISABLE_STABLE_OPS=1) is checked in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import orchard
from orchard import _ops

from conftest import DEVICES
from helpers import OrchardOpLog, randn

STABLE = _ops._SFWD is not None
needs_stable = pytest.mark.skipif(not STABLE, reason=f"stable ops: {_ops.STABLE_OPS_STATUS}")


def _torch_at_least(major, minor):
    return _ops._torch_version() >= (major, minor)


def test_stable_ops_load_when_built():
    built = os.path.exists(os.path.join(os.path.dirname(_ops.__file__), "_C_torch.so"))
    if os.environ.get("ORCHARD_DISABLE_STABLE_OPS", "") not in ("", "0"):
        assert _ops.STABLE_OPS_STATUS.startswith("disabled") and not STABLE
    elif built and _torch_at_least(2, 10):
        assert _ops.STABLE_OPS_STATUS == "loaded", _ops.STABLE_OPS_STATUS
        assert STABLE
    else:
        assert not STABLE


@needs_stable
def test_internal_schemas_match_the_public_ops():
    for public, internal in ((torch.ops.orchard.flash_attn_forward.default, _ops._SFWD),
                             (torch.ops.orchard.flash_attn_backward.default, _ops._SBWD)):
        pub, intl = public._schema, internal._schema
        assert [(a.name, str(a.type), a.default_value) for a in pub.arguments] == \
               [(a.name, str(a.type), a.default_value) for a in intl.arguments]
        assert [str(r.type) for r in pub.returns] == [str(r.type) for r in intl.returns]
    # the eager path's short forms: a subset of the same arguments, same types
    for public, plain in ((torch.ops.orchard.flash_attn_forward.default, _ops._SFWD_PLAIN),
                          (torch.ops.orchard.flash_attn_backward.default, _ops._SBWD_PLAIN)):
        types = {a.name: str(a.type) for a in public._schema.arguments}
        assert all(types[a.name] == str(a.type) for a in plain._schema.arguments if a.name != "bhsd")


def _dlpack_forward(*args):
    """The public op's CPU/CUDA kernel with the C++ ops switched off (the DLPack path)."""
    saved = _ops._SFWD, _ops._SBWD
    _ops._SFWD = _ops._SBWD = None
    try:
        return _ops._forward_kernel(*args)
    finally:
        _ops._SFWD, _ops._SBWD = saved


def _dlpack_backward(*args):
    saved = _ops._SFWD, _ops._SBWD
    _ops._SFWD = _ops._SBWD = None
    try:
        return _ops._backward_kernel(*args)
    finally:
        _ops._SFWD, _ops._SBWD = saved


def _layouts(device):
    b, sq, sk, hq, hkv, d = 2, 9, 13, 4, 2, 16
    bshd = [randn(b, s, h, d, device=device) for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    bhsd = [randn(b, h, s, d, device=device).transpose(1, 2) for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    # last-dim stride 2: the bridge stages these (one logged copy each)
    strided = [randn(b, s, h, 2 * d, device=device)[..., ::2] for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    dv = [bshd[0], bshd[1], randn(b, sk, hkv, 8, device=device)]  # value head dim 8
    return {"bshd": bshd, "bhsd": bhsd, "strided": strided, "dv8": dv}


@needs_stable
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "strided", "dv8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stable_op_matches_dlpack_path_bitwise(device, layout, dtype):
    q, k, v = (t.to(dtype) for t in _layouts(device)[layout])
    rng = torch.tensor([1234, 5], dtype=torch.int64, device=device)
    if dtype == torch.float64 and device == "cuda":  # CPU only: both paths refuse it alike
        args = (q, k, v, 0.3, False, False, 0.0, 0, 0, False, False, "orchard.test", None)
        for call in (_ops._SFWD, _dlpack_forward):
            with pytest.raises(Exception, match="float64 is supported on the CPU backend only"):
                call(*args)
        return
    for causal, top_left, p, ret in ((False, False, 0.0, False), (True, False, 0.0, True),
                                      (True, True, 0.25, True)):
        args = (q, k, v, 0.3, causal, top_left, p, 0, 0, ret, False, "orchard.test", rng if p else None)
        got = _ops._SFWD(*args)
        ref = _dlpack_forward(*args)
        plain = _ops._SFWD_PLAIN(q, k, v, 0.3, causal, top_left, p, ret, "orchard.test", rng if p else None)
        assert (plain[2] is None) == (not ret)  # the short form returns no empty mask tensor
        for g, r, pl in zip(got, ref, plain if ret else plain[:2]):
            assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride()
            assert torch.equal(g, r) and torch.equal(pl, r) and pl.stride() == r.stride()
        dout = randn(*got[0].shape, device=device, dtype=dtype)
        bargs = (dout, q, k, v, got[0], got[1], 0.3, causal, top_left, p, 0, 0, False, "orchard.test",
                 rng if p else None)
        plain = _ops._SBWD_PLAIN(dout, q, k, v, got[0], got[1], 0.3, causal, top_left, p, False,
                                 "orchard.test", rng if p else None)
        for g, r, pl in zip(_ops._SBWD(*bargs), _dlpack_backward(*bargs), plain):
            assert g.shape == r.shape and g.stride() == r.stride() and torch.equal(g, r)
            assert torch.equal(pl, r)


@needs_stable
@pytest.mark.parametrize("device", DEVICES)
def test_stable_op_with_features_matches_dlpack_path(device):
    q, k, v = (randn(2, 7, 4, 16, device=device) for _ in range(3))
    slopes = torch.rand(4, device=device)
    sink = randn(4, device=device)
    bias = randn(1, 4, 7, 7, device=device)
    for feats in ((2, 0, 5.0, slopes, sink, None, None, None, 0, 0),
                  (-1, -1, 0.0, None, None, bias, None, None, 0, 0)):
        args = (q, k, v, 0.25, False, True, 0.0, 0, 0, False, False, "orchard.test", None, *feats)
        got, ref = _ops._SFWD(*args), _dlpack_forward(*args)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
        bargs = (randn(*q.shape, device=device), q, k, v, got[0], got[1], 0.25, False, True, 0.0, 0, 0,
                 False, "orchard.test", None, *feats)
        assert all(torch.equal(g, r) for g, r in zip(_ops._SBWD(*bargs), _dlpack_backward(*bargs)))
    # varlen: (total, heads, dim), lse (heads, total_q)
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32, device=device)
    qv, kv, vv = (randn(12, 4, 16, device=device) for _ in range(3))
    args = (qv, kv, vv, 0.25, True, False, 0.0, 0, 0, False, False, "orchard.test", None,
            -1, -1, 0.0, None, None, None, cu, cu, 5, 5)
    got, ref = _ops._SFWD(*args), _dlpack_forward(*args)
    assert got[1].shape == (4, 12)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


@needs_stable
@pytest.mark.parametrize("device", DEVICES)
def test_stable_op_errors_are_the_dlpack_paths(device):
    q = randn(1, 8, 2, 8, device=device)
    op = "orchard.flash_attn_func"
    cases = {
        "rank": (q[0], q, q, 0.3, False, False, 0.0, 0, 0, False, False, op, None),
        "dropout": (q, q, q, 0.3, False, False, 1.5, 0, 0, False, False, op, None),
        "int32": (q.int(), q.int(), q.int(), 0.3, False, False, 0.0, 0, 0, False, False, op, None),
        "int64": (q.long(), q.long(), q.long(), 0.3, False, False, 0.0, 0, 0, False, False, op, None),
        "rng2d": (q, q, q, 0.3, False, False, 0.2, 0, 0, False, False, op,
                  torch.zeros(1, 2, dtype=torch.int64, device=device)),
        "rng_float": (q, q, q, 0.3, False, False, 0.2, 0, 0, False, False, op, torch.zeros(2, device=device)),
        "heads": (q, randn(1, 8, 3, 8, device=device), randn(1, 8, 3, 8, device=device), 0.3, False,
                  False, 0.0, 0, 0, False, False, op, None),
        "rng3": (q, q, q, 0.3, False, False, 0.2, 0, 0, False, False, op,
                 torch.zeros(3, dtype=torch.int64, device=device)),
        "rng_strided": (q, q, q, 0.3, False, False, 0.2, 0, 0, False, False, op,
                        torch.zeros(4, dtype=torch.int64, device=device)[::2]),
    }
    for name, args in cases.items():
        got, ref = _error(lambda: _ops._forward_kernel(*args)), _error(lambda: _dlpack_forward(*args))
        assert got is not None and got[0] is ValueError, (name, got)
        assert got[1].startswith(op + ": "), (name, got)
        assert got == ref, (name, got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_eager_path_matches_the_public_op(device, monkeypatch):
    # flash_attn_func's Function path (ORCHARD_ATEN_AUTOGRAD=all would take the aten route;
    # test_aten_route.py checks that one against this path)
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True,)))
    q, k, v = (randn(2, 11, 4, 16, device=device, requires_grad=True) for _ in range(3))
    dout = randn(2, 11, 4, 16, device=device)
    out = orchard.flash_attn_func(q, k, v, causal=True)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_orchard_flash_attn_forward_defaultBackward"
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, True, False, 0.0, 0, 0, False,
                                                       False, "orchard.flash_attn_func")
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    out2, lse2 = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert torch.equal(lse2, lse) and lse2.requires_grad
    # only some inputs need a gradient; and the lse alone (grad_out None)
    q2 = q.detach()
    dk, = torch.autograd.grad(orchard.flash_attn_func(q2, k, v.detach()), (k,), dout)
    dk_ref, = torch.autograd.grad(torch.ops.orchard.flash_attn_forward(
        q2, k, v.detach(), 0.25, False, False, 0.0, 0, 0, False)[0], (k,), dout)
    assert torch.equal(dk, dk_ref)
    # a gradient through the lse alone (grad_out None) is the public op's
    _, lse3 = orchard.flash_attn_func(q, k, v, return_softmax_lse=True)
    _, lse4, _ = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, False, False, 0.0, 0, 0, False)
    assert torch.equal(torch.autograd.grad(lse3.sum(), (q,))[0], torch.autograd.grad(lse4.sum(), (q,))[0])
    # the SDPA drop-in's eager path (BHSD views)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    o = orchard.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
    r = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, True, True, 0.0, 0, 0, False)[0].transpose(1, 2)
    assert torch.equal(o, r)


@pytest.mark.parametrize("device", DEVICES)
def test_eager_path_double_backward_is_refused_as_before(device, monkeypatch):
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True,)))  # the Function path
    q = randn(1, 5, 2, 8, device=device, requires_grad=True)
    out = orchard.flash_attn_func(q, q, q)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        g.sum().backward()


# Feature calls (masks, sinks, windows, softcap) skip the dispatcher's Python kernels
# (_ops.feature_forward, and the backward's direct C++ op): the same Function, outputs and
# gradients (those of the bias and the sink included) as the public op.
@needs_stable
@pytest.mark.parametrize("device", DEVICES)
def test_feature_calls_match_the_public_op(device, monkeypatch):
    calls = []
    real = _ops._fwd_apply
    monkeypatch.setattr(_ops, "_fwd_apply", lambda *a: calls.append(1) or real(*a))
    q, k, v = (randn(2, 3, 24, 16, device=device, requires_grad=True) for _ in range(3))
    bias = randn(2, 1, 24, 24, device=device, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert calls, "the masked drop-in call took the public op"
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    ref = torch.ops.orchard.flash_attn_forward(qt, kt, vt, 0.25, False, True, 0.0, 0, 0, False, False,
                                               "orchard.sdpa", None, -1, -1, 0.0, None, None,
                                               bias.expand(2, 3, 24, 24))[0].transpose(1, 2)
    assert type(out.grad_fn) is type(ref.grad_fn)
    assert torch.equal(out, ref)
    dout = randn(*out.shape, device=device)
    g = torch.autograd.grad(out, (q, k, v, bias), dout)
    r = torch.autograd.grad(ref, (q, k, v, bias), dout)
    assert all(torch.equal(a, b) for a, b in zip(g, r))

    sink = randn(3, device=device, requires_grad=True)
    q2, k2, v2 = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out2 = orchard.flash_attn_func(q2, k2, v2, causal=True, window_size=(5, 0), softcap=3.0, sink=sink)
    ref2 = torch.ops.orchard.flash_attn_forward(q2, k2, v2, 0.25, True, False, 0.0, 0, 0, False, False,
                                                "orchard.flash_attn_func", None, 5, 0, 3.0, None, sink)[0]
    assert torch.equal(out2, ref2) and len(calls) == 2
    g = torch.autograd.grad(out2, (q2, k2, v2, sink), dout.transpose(1, 2))
    r = torch.autograd.grad(ref2, (q2, k2, v2, sink), dout.transpose(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(g, r))
    # a double backward is refused as the public op refuses it
    (gq,) = torch.autograd.grad(orchard.flash_attn_func(q2, k2, v2, sink=sink).sum(), q2, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gq.sum().backward()
    # under a dispatch mode the public op runs, forward and backward
    with OrchardOpLog() as log:
        orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias.detach() > 0).sum().backward()
    assert log.ops == ["orchard.flash_attn_forward.default", "orchard.flash_attn_backward.default"], log.ops


@pytest.mark.parametrize("device", DEVICES)
def test_modes_and_autocast_see_the_public_op(device):
    q = randn(1, 6, 2, 8, device=device, requires_grad=True)
    with OrchardOpLog() as log:
        orchard.flash_attn_func(q, q, q).sum().backward()
        orchard.scaled_dot_product_attention(q, q, q)
    assert log.ops == ["orchard.flash_attn_forward.default", "orchard.flash_attn_backward.default",
                       "orchard.flash_attn_forward.default"]
    with torch.autocast(device, dtype=torch.bfloat16):
        assert orchard.flash_attn_func(q, q, q).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_drop_in_matches_eager(device):
    torch._dynamo.reset()
    q, k, v = (randn(1, 16, 2, 16, device=device, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return orchard.flash_attn_func(q, k, v, causal=True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    r = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g, r))


def test_one_core_per_process_in_the_debug_log(tmp_path, monkeypatch):
    """The C++ ops run the core orchard._C holds: one call counter and one log."""
    monkeypatch.setattr(_ops, "_ATEN_LAYOUTS", frozenset((True,)))  # flash_attn_func's Function path
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    q = randn(1, 4, 1, 8, requires_grad=True)
    orchard.flash_attn_func(q, q, q).sum().backward()      # eager path (C++ op when loaded)
    _dlpack_forward(q.detach(), q.detach(), q.detach(), 0.3, False, False, 0.0, 0, 0, False)
    lines = (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text().splitlines()
    calls = [int(line.split("#")[1].split()[0]) for line in lines]
    assert [line.split()[0] for line in lines] == ["FWD", "BWD", "FWD"], lines
    assert calls == sorted(calls) and len(set(calls)) == 3, lines
    assert "op=orchard.flash_attn_func" in lines[0] and "op=orchard.flash_attn_func" in lines[1]


def test_tensor_profile_reports_staging(capfd, monkeypatch):
    monkeypatch.setenv("ORCHARD_TENSOR_PROFILE", "1")
    q = randn(1, 4, 1, 16)[..., ::2]  # last-dim stride 2: staged
    orchard.flash_attn_func(q, q, q)
    err = capfd.readouterr().err
    assert "[orchard tensor]" in err and "staged" in err.lower(), err


FALLBACK_SCRIPT = textwrap.dedent("""
    import torch, orchard
    from orchard import _ops
    assert _ops._SFWD is None and _ops.STABLE_OPS_STATUS.startswith("disabled"), _ops.STABLE_OPS_STATUS
    q, k, v = (torch.randn(2, 9, 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = orchard.flash_attn_func(q, k, v, causal=True)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_orchard_flash_attn_forward_defaultBackward"
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-10
    g = torch.autograd.grad(out.sum(), (q, k, v))
    r = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(g, r))
    try:
        orchard.flash_attn_func(q[0], k, v)
    except ValueError as e:
        assert str(e).startswith("orchard.flash_attn_func: "), e
    else:
        raise AssertionError("no error")
    assert torch.library.opcheck(torch.ops.orchard.flash_attn_forward.default,
                                 (q.detach(), k.detach(), v.detach(), 0.3, True, False, 0.0, 0, 0, False))
    print("fallback ok")
""")


def test_fallback_path_in_a_subprocess():
    env = {**os.environ, "ORCHARD_DISABLE_STABLE_OPS": "1"}
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.cuda
@needs_stable
def test_stable_op_uses_the_current_stream_and_the_tensors_device():
    q, k, v = (randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = orchard.flash_attn_func(q, k, v, causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = orchard.flash_attn_func(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, ref)
    if torch.cuda.device_count() > 1:
        q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
        with torch.cuda.device(0):
            out1 = orchard.flash_attn_func(q1, k1, v1, causal=True)
        assert out1.device == torch.device("cuda:1") and torch.equal(out1.cpu(), ref.cpu())


@pytest.mark.cuda
def test_cuda_graph_capture_of_the_eager_path():
    q, k, v = (randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.autograd.grad(orchard.flash_attn_func(q, k, v, causal=True, dropout_p=0.1), (q, k, v), dout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = orchard.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    graph.replay()
    torch.cuda.synchronize()
    ref = orchard.flash_attn_func(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["contiguous", "bshd_storage", "sliced", "dv8", "gqa", "3d", "5d"])
def test_sdpa_eager_path_matches_the_public_op(device, kind):
    """The SDPA drop-in's eager path hands (B, H, S, D) tensors to the C++ op as they
    are; outputs (values and strides) and gradients must be the public op's on the
    transposed views, as the drop-in computed them before."""
    b, h, lq, lk, e = 2, 4, 9, 13, 16
    hk, ev = (2, e) if kind == "gqa" else (h, 8 if kind == "dv8" else e)
    if kind == "bshd_storage":
        q, k, v = (randn(b, s, n, d, device=device).transpose(1, 2)
                   for s, n, d in ((lq, h, e), (lk, hk, e), (lk, hk, ev)))
    elif kind == "sliced":  # not dense: torch's empty_like rules pick the layout
        q, k, v = (randn(b, n, s + 3, d, device=device)[:, :, 1:s + 1]
                   for s, n, d in ((lq, h, e), (lk, hk, e), (lk, hk, ev)))
    else:
        q, k, v = (randn(b, n, s, d, device=device) for s, n, d in ((lq, h, e), (lk, hk, e), (lk, hk, ev)))
    if kind == "3d":
        q, k, v = q[0], k[0], v[0]
    if kind == "5d":
        q, k, v = q[None], k[None], v[None]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    gqa = kind == "gqa"
    out = orchard.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    with OrchardOpLog():  # a dispatch mode: the drop-in takes the public op
        ref = orchard.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert torch.equal(out, ref) and out.stride() == ref.stride(), (out.stride(), ref.stride())
    dout = randn(*out.shape, device=device)
    g = torch.autograd.grad(out, (q, k, v), dout)
    with OrchardOpLog():
        r = torch.autograd.grad(ref, (q, k, v), dout)
    for a, c in zip(g, r):
        assert torch.equal(a, c) and a.stride() == c.stride()
    with torch.no_grad():
        assert torch.equal(orchard.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), ref)


def test_allocation_failure_is_torchs_out_of_memory_error():
    """The C++ op tags a refused CUDA allocation; the Python layer raises torch's
    OutOfMemoryError for it (what `except torch.cuda.OutOfMemoryError` expects)."""
    from orchard._ops import _stable_error
    e = _stable_error(RuntimeError("[orchard:OutOfMemoryError] orchard: torch could not allocate a tensor"))
    assert isinstance(e, torch.OutOfMemoryError) and isinstance(e, torch.cuda.OutOfMemoryError)
    assert str(e).startswith("orchard: torch could not allocate")
    plain = RuntimeError("not ours")
    assert _stable_error(plain) is plain
