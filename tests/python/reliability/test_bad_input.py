"""Bad-input matrix: every invalid input raises an error whose message starts
with the public op's name ("orchard.flash_attn_func: ...",
"orchard.scaled_dot_product_attention: ...", "orchard_ops.flash_attn_fwd: ...",
or the op_name handed to the C binding), and the caller's tensors are left
bitwise untouched (inputs, their .grad, and preallocated outputs).

The matrix is DEFECTS x APIS: each defect builds (q, k, v, kwargs) for an API
in that API's layout; add a row to DEFECTS to cover a new invalid input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple, Type, Union

import pytest
import torch

import orchard
import orchard_ops


# ---------------------------------------------------------------- the APIs


@dataclass(frozen=True)
class Api:
    name: str        # the prefix every error message must start with
    call: Callable   # (q, k, v, **kw) -> output
    layout: str      # "bshd" or "bhsd"
    scale_kw: str    # keyword of the softmax scale


APIS = {
    "flash": Api("orchard.flash_attn_func", orchard.flash_attn_func, "bshd", "softmax_scale"),
    "sdpa": Api("orchard.scaled_dot_product_attention", orchard.scaled_dot_product_attention, "bhsd",
                "scale"),
    "ops": Api("orchard_ops.flash_attn_fwd", orchard_ops.flash_attn_fwd, "bhsd", "scale"),
}


def make(api: str, b=2, s=8, h=4, d=16, dtype=torch.float32, device="cpu", requires_grad=False):
    """A tensor of logical (batch, seq, heads, dim) in `api`'s layout."""
    shape = (b, s, h, d) if APIS[api].layout == "bshd" else (b, h, s, d)
    if dtype.is_floating_point:
        t = torch.randn(shape, dtype=torch.float32).to(dtype)
    elif dtype.is_complex:
        t = torch.randn(shape, dtype=dtype)
    elif dtype == torch.bool:
        t = torch.rand(shape) > 0.5
    else:
        t = torch.randint(0 if dtype == torch.uint8 else -3, 4, shape, dtype=dtype)
    t = t.to(device)
    if requires_grad and (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize > 1:
        t.requires_grad_()
    return t


def qkv(api, device="cpu", q=None, k=None, v=None, **common):
    """Valid q, k, v (requires_grad), with per-tensor overrides: each of q/k/v
    may be a dict of make() arguments."""
    out = []
    for over in (q, k, v):
        args = dict(common)
        args.update(over or {})
        args.setdefault("requires_grad", True)
        out.append(make(api, device=device, **args))
    return out


# ---------------------------------------------------------------- the defects

Exc = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


@dataclass(frozen=True)
class Defect:
    id: str
    build: Callable  # (api_key, device) -> (q, k, v, kwargs)
    exc: Exc = ValueError
    apis: tuple = ("flash", "sdpa", "ops")
    cuda_only: bool = False


def _dtype(qd, kd=None, vd=None):
    kd = qd if kd is None else kd
    vd = kd if vd is None else vd
    return lambda a, dev: (*qkv(a, dev, q=dict(dtype=qd), k=dict(dtype=kd), v=dict(dtype=vd)), {})


def _kw(**kw):
    """Valid tensors with bad keyword arguments; `scale` maps to each API's keyword."""
    def build(a, dev):
        args = dict(kw)
        if "scale" in args:
            args[APIS[a].scale_kw] = args.pop("scale")
        return (*qkv(a, dev), args)
    return build


def _shapes(q=None, k=None, v=None, **kw):
    return lambda a, dev: (*qkv(a, dev, q=q, k=k, v=v), dict(kw))


def _rank(q_rank, kv_rank):
    def build(a, dev):
        q, k, v = qkv(a, dev)

        def to_rank(t, r):
            t = t.detach()
            while t.dim() > r:
                t = t[0]
            while t.dim() < r:
                t = t.unsqueeze(0)
            return t.requires_grad_()
        return to_rank(q, q_rank), to_rank(k, kv_rank), to_rank(v, kv_rank), {}
    return build


def _float8():
    return getattr(torch, "float8_e4m3fn", None)


DEFECTS = [
    # dtypes
    Defect("int32", _dtype(torch.int32)),
    Defect("int64_k_only", _dtype(torch.float32, torch.int64, torch.float32)),
    Defect("uint8", _dtype(torch.uint8)),
    Defect("bool", _dtype(torch.bool)),
    Defect("complex64", _dtype(torch.complex64)),
    *([Defect("float8_e4m3fn", _dtype(_float8()))] if _float8() is not None else []),
    *([Defect("float8_e5m2_v_only", _dtype(torch.float16, torch.float16, torch.float8_e5m2))]
      if hasattr(torch, "float8_e5m2") else []),
    Defect("mixed_fp32_fp16", _dtype(torch.float32, torch.float16, torch.float16)),
    Defect("mixed_bf16_v_fp32", _dtype(torch.bfloat16, torch.bfloat16, torch.float32)),
    Defect("mixed_fp64_fp32", _dtype(torch.float64, torch.float32, torch.float32)),
    Defect("mixed_fp16_bf16", _dtype(torch.float16, torch.bfloat16, torch.bfloat16)),
    # ranks
    Defect("rank3_q_rank4_kv", _rank(3, 4)),
    Defect("rank5", _rank(5, 5), apis=("flash", "ops")),
    Defect("rank2", _rank(2, 2)),
    Defect("rank4_q_rank3_kv", _rank(4, 3)),
    # mismatched shapes
    Defect("batch_q_vs_kv", _shapes(q=dict(b=3))),
    Defect("batch_k_vs_v", _shapes(v=dict(b=1))),
    Defect("seq_k_vs_v", _shapes(v=dict(s=9))),
    Defect("head_dim_q_vs_kv", _shapes(k=dict(d=32), v=dict(d=32)), exc=(ValueError, NotImplementedError)),
    Defect("head_dim_k_only", _shapes(k=dict(d=32))),
    # (v with a head dim of its own is valid: DeepSeek-style d_qk != d_v)
    Defect("head_dim_v_257", _shapes(v=dict(d=257))),
    Defect("heads_k_vs_v", _shapes(v=dict(h=2))),
    # GQA
    Defect("hq_not_multiple_of_hkv", _shapes(q=dict(h=6), k=dict(h=4), v=dict(h=4), enable_gqa=True),
           apis=("sdpa",)),
    Defect("hq_not_multiple_of_hkv", _shapes(q=dict(h=6), k=dict(h=4), v=dict(h=4)), apis=("flash", "ops")),
    Defect("hq_less_than_hkv", _shapes(q=dict(h=2), k=dict(h=4), v=dict(h=4)), apis=("flash", "ops")),
    Defect("gqa_without_enable_gqa", _shapes(q=dict(h=4), k=dict(h=2), v=dict(h=2)), apis=("sdpa",)),
    Defect("kv_heads_zero", _shapes(k=dict(h=0), v=dict(h=0)), apis=("flash", "ops")),
    # head dim
    Defect("head_dim_0", _shapes(q=dict(d=0), k=dict(d=0), v=dict(d=0))),
    Defect("head_dim_257", _shapes(q=dict(d=257), k=dict(d=257), v=dict(d=257))),
    Defect("head_dim_512", _shapes(q=dict(d=512), k=dict(d=512), v=dict(d=512))),
    # dropout
    Defect("dropout_negative", _kw(dropout_p=-0.1)),
    Defect("dropout_nan", _kw(dropout_p=float("nan"))),
    Defect("dropout_one", _kw(dropout_p=1.0)),
    Defect("dropout_above_one", _kw(dropout_p=1.5)),
    Defect("dropout_inf", _kw(dropout_p=float("inf"))),
    # softmax scale
    Defect("scale_inf", _kw(scale=float("inf"))),
    Defect("scale_neg_inf", _kw(scale=float("-inf"))),
    Defect("scale_nan", _kw(scale=float("nan"))),
    # feature arguments out of their domain
    Defect("window_below_minus_one", _kw(window_size=(-2, 0)), apis=("flash",)),
    Defect("softcap_negative", _kw(softcap=-1.0), apis=("flash",)),
    Defect("softcap_inf", _kw(softcap=float("inf")), apis=("flash",)),
    Defect("alibi_slopes_shape", _kw(alibi_slopes=torch.ones(3)), apis=("flash",)),
    Defect("alibi_slopes_float64", _kw(alibi_slopes=torch.ones(4, dtype=torch.float64)), apis=("flash",)),
    Defect("sink_shape", _kw(sink=torch.ones(2)), apis=("flash",)),
    Defect("attn_mask_not_broadcastable", _kw(attn_mask=torch.ones(3, 8, dtype=torch.bool)),
           exc=(ValueError, RuntimeError), apis=("sdpa",)),
    Defect("attn_mask_int", _kw(attn_mask=torch.ones(8, 8, dtype=torch.int32)), apis=("sdpa",)),
    # CUDA only
    Defect("mixed_device_kv_on_cpu", lambda a, dev: (make(a, device="cuda"), make(a), make(a), {}),
           cuda_only=True),
    Defect("mixed_device_q_on_cpu", lambda a, dev: (make(a), make(a, device="cuda"), make(a, device="cuda"),
                                                    {}), cuda_only=True),
    Defect("mixed_device_v_on_cpu", lambda a, dev: (make(a, device="cuda"), make(a, device="cuda"), make(a),
                                                    {}), cuda_only=True),
    # (head dims 1..256 all run on CUDA since 0534fda: d = 12 is no longer bad input)
    Defect("cuda_head_dim_260", _shapes(q=dict(d=260), k=dict(d=260), v=dict(d=260)), cuda_only=True),
    Defect("cuda_float64", _dtype(torch.float64), exc=(ValueError, NotImplementedError), cuda_only=True),
]

PARAMS = [
    pytest.param(dfc, api, id=f"{api}-{dfc.id}", marks=[pytest.mark.cuda] if dfc.cuda_only else [])
    for dfc in DEFECTS for api in dfc.apis
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, for a bitwise (NaN-safe) comparison."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).clone() if t.numel() else t.clone()


def assert_untouched(tensors, before, grads_before=None):
    for i, (t, b) in enumerate(zip(tensors, before)):
        assert torch.equal(bits(t), b), f"tensor #{i} was modified by a failing call"
        if grads_before is not None:
            assert t.grad is None, f"tensor #{i} got a .grad from a failing call"


@pytest.mark.parametrize("defect,api", PARAMS)
def test_bad_input_raises_with_op_name_and_touches_nothing(defect: Defect, api: str):
    device = "cuda" if defect.cuda_only else "cpu"
    q, k, v, kw = defect.build(api, device)
    tensors = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor)]
    before = [bits(t) for t in tensors]
    with pytest.raises(defect.exc) as info:
        out = APIS[api].call(q, k, v, **kw)
        # an error may only surface in backward (it must not: validate first)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    msg = str(info.value)
    assert msg.startswith(APIS[api].name + ": "), \
        f"{type(info.value).__name__} message must start with '{APIS[api].name}: ', got: {msg!r}"
    assert_untouched(tensors, before, grads_before=True)


def test_matrix_covers_every_api():
    ids = {(d.id, a) for d in DEFECTS for a in d.apis}
    assert len(ids) >= 100, len(ids)


def test_not_a_tensor_raises_type_error_with_op_name():
    q = make("flash")
    with pytest.raises(TypeError, match=r"^orchard\.flash_attn_func: "):
        orchard.flash_attn_func(q.tolist(), q, q)
    with pytest.raises(TypeError, match=r"^orchard\.scaled_dot_product_attention: "):
        orchard.scaled_dot_product_attention(make("sdpa"), make("sdpa").numpy(), make("sdpa"))


def _scalar_cases():
    """(id, call, exception, message part): scalar arguments of the wrong type, or past the range the
    kernels' integers hold, at every entry point that takes them."""
    q4 = torch.randn(1, 8, 2, 16)
    qs = q4.transpose(1, 2)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    varlen = lambda **kw: orchard.flash_attn_varlen_func(q4[0], q4[0], q4[0], cu, cu, **{
        "max_seqlen_q": 8, "max_seqlen_k": 8, **kw})
    kvcache = lambda **kw: orchard.flash_attn_with_kvcache(q4[:, :1], q4, q4, **kw)
    flash = lambda **kw: orchard.flash_attn_func(q4, q4, q4, **kw)
    sdpa = lambda **kw: orchard.scaled_dot_product_attention(qs, qs, qs, **kw)
    return [
        ("flash dropout None", lambda: flash(dropout_p=None), TypeError, "dropout_p"),
        ("flash dropout str", lambda: flash(dropout_p="0.1"), TypeError, "dropout_p"),
        ("flash scale str", lambda: flash(softmax_scale="x"), ValueError, "softmax_scale"),
        ("flash scale list", lambda: flash(softmax_scale=[1.0]), TypeError, "softmax_scale"),
        ("sdpa dropout None", lambda: sdpa(dropout_p=None), TypeError, "dropout_p"),
        ("sdpa scale str", lambda: sdpa(scale="x"), ValueError, "scale"),
        ("varlen max_seqlen None", lambda: varlen(max_seqlen_q=None), TypeError, "max_seqlen_q"),
        ("varlen max_seqlen 2^63", lambda: varlen(max_seqlen_k=2**63), ValueError, "max_seqlen_k"),
        ("varlen max_seqlen -1", lambda: varlen(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
        ("varlen scale str", lambda: varlen(softmax_scale="x"), ValueError, "softmax_scale"),
        ("kvcache num_splits None", lambda: kvcache(num_splits=None), TypeError, "num_splits"),
        ("kvcache softcap None", lambda: kvcache(softcap=None), TypeError, "softcap"),
        ("kvcache scale str", lambda: kvcache(softmax_scale="x"), ValueError, "softmax_scale"),
        ("kvcache window nan", lambda: kvcache(window_size=(float("nan"), -1)), ValueError, "window_size"),
        ("flash softcap str", lambda: flash(softcap="x"), TypeError, "softcap"),
        ("ops scale str", lambda: orchard_ops.flash_attn_fwd(qs, qs, qs, "x"), ValueError, "scale"),
        ("ops dropout None", lambda: orchard_ops.flash_attn_fwd(qs, qs, qs, None, None), TypeError, "dropout_p"),
        ("combine lse None", lambda: orchard.combine_attention([q4, q4], [None, None]), TypeError, "lses"),
        ("combine not sequences", lambda: orchard.combine_attention(q4, 3), TypeError, "outs and lses"),
        ("combine meta lse", lambda: orchard.combine_attention(
            [q4, q4], [torch.zeros(1, 2, 8), torch.zeros(1, 2, 8, device="meta")]), ValueError, "lses"),
    ]


@pytest.mark.parametrize("case", _scalar_cases(), ids=lambda c: c[0])
def test_scalar_arguments_of_wrong_type_or_range_raise_with_op_name(case):
    _, call, exc, part = case
    with pytest.raises(exc, match=r"^orchard(_ops)?\.[a-z_]+: .*" + part) as info:
        call()
    assert type(info.value) is exc or issubclass(type(info.value), exc)


def test_window_bounds_past_int64_mean_unbounded():
    """A window bound past 2^63 - 1 (the kernels' int64) lies past every length: the same result as -1,
    at every entry point that takes window_size (torch's op schema refused it before)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 12, 2, 16)
    cu_q, cu_k = torch.tensor([0, 8], dtype=torch.int32), torch.tensor([0, 12], dtype=torch.int32)
    for causal in (False, True):
        for huge in ((2**63, 2**64), (2**70, 0)):
            plain = tuple(-1 if w > 2**40 else w for w in huge)
            torch.testing.assert_close(orchard.flash_attn_func(q, k, k, causal=causal, window_size=huge),
                                       orchard.flash_attn_func(q, k, k, causal=causal, window_size=plain),
                                       rtol=0, atol=0)
            torch.testing.assert_close(
                orchard.flash_attn_varlen_func(q[0], k[0], k[0], cu_q, cu_k, 8, 12, causal=causal, window_size=huge),
                orchard.flash_attn_varlen_func(q[0], k[0], k[0], cu_q, cu_k, 8, 12, causal=causal, window_size=plain),
                rtol=0, atol=0)
            torch.testing.assert_close(
                orchard.flash_attn_with_kvcache(q[:, :2], k, k, causal=causal, window_size=huge),
                orchard.flash_attn_with_kvcache(q[:, :2], k, k, causal=causal, window_size=plain), rtol=0, atol=0)


def test_valid_call_after_failures_still_works():
    q, k, v = qkv("flash")
    for bad in (dict(dropout_p=2.0), dict(softmax_scale=float("nan"))):
        with pytest.raises(ValueError):
            orchard.flash_attn_func(q, k, v, **bad)
    out = orchard.flash_attn_func(q, k, v)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


# ------------------------------------------------- the C binding: aliasing
#
# The torch ops allocate their outputs, so aliasing can only be requested
# through orchard._C directly (as NumPy/JAX users of the binding do).

OP = "orchard.flash_attn_func"


def c_forward(q, k, v, out, lse, mask=None, scale=None, causal=False, dropout_p=0.0, op=OP):
    return orchard._C.forward(q, k, v, out, lse, mask, scale, causal, False, dropout_p, 1234, 0, 0, op)


def c_backward(q, k, v, out, dout, lse, dq, dk, dv, op=OP):
    opts = (None, False, False, 0.0, 0, 0, False, 0, op)
    n = orchard._C.backward_workspace_bytes(q, k, v, out, dout, lse, dq, dk, dv, *opts)
    ws = torch.empty(n, dtype=torch.uint8) if n else None
    return orchard._C.backward(q, k, v, out, dout, lse, dq, dk, dv, ws, *opts)


def _fwd_problem(b=1, sq=8, sk=8, h=2, d=16, dtype=torch.float32):
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, sk, h, d, dtype=dtype)
    v = torch.randn(b, sk, h, d, dtype=dtype)
    out = torch.full((b, sq, h, d), 7.0, dtype=dtype)
    lse = torch.full((b, h, sq), 7.0, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return q, k, v, out, lse


def _expect_alias_error(call, tensors):
    before = [bits(t) for t in tensors]
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(OP + ": "), str(info.value)
    assert_untouched(tensors, before)
    return str(info.value)


def test_c_forward_valid_call_works():
    q, k, v, out, lse = _fwd_problem()
    c_forward(q, k, v, out, lse)
    assert torch.isfinite(out).all() and not torch.equal(out, torch.full_like(out, 7.0))


@pytest.mark.parametrize("victim", ["q", "k", "v"])
def test_c_forward_out_aliases_input(victim):
    q, k, v, out, lse = _fwd_problem()
    ins = dict(q=q, k=k, v=v)
    ins["out"] = ins[victim]  # the same shapes: out IS the input
    _expect_alias_error(lambda: c_forward(ins["q"], ins["k"], ins["v"], ins["out"], lse), [q, k, v, lse])


def test_c_forward_out_partially_overlaps_v():
    q, k, _, _, lse = _fwd_problem()
    buf = torch.randn(2 * q.numel())
    v = buf[: q.numel()].view(q.shape)
    out = buf[q.numel() // 2: q.numel() // 2 + q.numel()].view(q.shape)  # half over v
    _expect_alias_error(lambda: c_forward(q, k, v, out, lse), [q, k, buf, lse])


def test_c_forward_lse_aliases_k():
    q, k, v, out, _ = _fwd_problem()
    lse = k.view(-1)[: 2 * 8].view(1, 2, 8)  # float32 lse inside k's memory
    _expect_alias_error(lambda: c_forward(q, k, v, out, lse), [q, k, v, out])


def test_c_forward_dropout_mask_aliases_q():
    q, k, v, out, lse = _fwd_problem(sk=64)
    mask = q.view(torch.uint8).view(1, 2, 8, 64)  # q's bytes as the uint8 mask
    _expect_alias_error(lambda: c_forward(q, k, v, out, lse, mask=mask, dropout_p=0.5), [q, k, v, out, lse])


def test_c_forward_out_self_overlapping():
    q, k, v, _, lse = _fwd_problem()
    out = torch.full((1, 1, 1, 16), 7.0).expand(1, 8, 2, 16)  # every row is the same memory
    _expect_alias_error(lambda: c_forward(q, k, v, out, lse), [q, k, v, out, lse])


def test_c_forward_out_overlaps_lse():
    q, k, v, _, _ = _fwd_problem()
    buf = torch.full((q.numel() + 16,), 7.0)
    out = buf[: q.numel()].view(q.shape)
    lse = buf[q.numel() - 8: q.numel() + 8].view(1, 2, 8)
    _expect_alias_error(lambda: c_forward(q, k, v, out, lse), [q, k, v, buf])


def _bwd_problem():
    q, k, v, out, lse = _fwd_problem()
    c_forward(q, k, v, out, lse)
    dout = torch.randn_like(out)
    return q, k, v, out, dout, lse, *(torch.full_like(t, 7.0) for t in (q, k, v))


@pytest.mark.parametrize("grad,victim", [("dq", "q"), ("dk", "k"), ("dv", "v"), ("dq", "dout"), ("dv", "out"),
                                         ("dk", "lse")])
def test_c_backward_grad_aliases_input(grad, victim):
    t = dict(zip(("q", "k", "v", "out", "dout", "lse", "dq", "dk", "dv"), _bwd_problem()))
    everything = list(t.values())
    if victim == "lse":  # dk's memory begins with the lse
        n_lse, n_k = t["lse"].numel(), t["k"].numel()
        buf = torch.full((max(n_lse, n_k),), 7.0)
        buf[:n_lse] = t["lse"].reshape(-1)
        t["lse"] = buf[:n_lse].view(t["lse"].shape)
        t[grad] = buf[:n_k].view(t["k"].shape)
        everything = list(t.values()) + [buf]
    else:
        t[grad] = t[victim]
    _expect_alias_error(lambda: c_backward(*(t[n] for n in ("q", "k", "v", "out", "dout", "lse", "dq", "dk",
                                                             "dv"))), everything)


def test_c_backward_two_grads_share_memory():
    q, k, v, out, dout, lse, dq, dk, dv = _bwd_problem()
    _expect_alias_error(lambda: c_backward(q, k, v, out, dout, lse, dq, dq, dv), [q, k, v, out, dout, lse, dq, dv])


def test_c_forward_invalid_call_writes_nothing():
    """A call rejected after the outputs are known (GQA mismatch) leaves the
    caller's preallocated out/lse as they were."""
    q, _, _, out, lse = _fwd_problem(h=6)
    k = torch.randn(1, 8, 4, 16)
    before = [bits(t) for t in (q, k, out, lse)]
    with pytest.raises(ValueError, match=r"^orchard\.flash_attn_func: "):
        c_forward(q, k, k, out, lse)
    assert_untouched([q, k, out, lse], before)


@pytest.mark.cuda
def test_c_forward_cuda_inputs_cpu_outputs():
    q, k, v, out, lse = (t.cuda() for t in _fwd_problem())
    out_cpu = torch.full(tuple(out.shape), 7.0)
    before = [bits(t) for t in (q, k, v, out_cpu, lse)]
    with pytest.raises(ValueError, match=r"^orchard\.flash_attn_func: "):
        c_forward(q, k, v, out_cpu, lse)
    assert_untouched([q, k, v, out_cpu, lse], before)


@pytest.mark.cuda
def test_cuda_valid_after_bad_input():
    q, k, v = qkv("flash", device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        orchard.flash_attn_func(q, k, v, dropout_p=1.0)
    out = orchard.flash_attn_func(q, k, v)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert not math.isnan(float(out.float().sum()))
