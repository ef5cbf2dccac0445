"""Feature parity with flash-attn / SDPA: sliding windows, softcap, ALiBi, sinks,
attn_mask, varlen (+ packed forms), a value head dim of its own, LSE return and
combine_attention — forward and backward on every backend, against the float64
dense reference (feature_reference.py) with flash-attn's error rule."""

import pytest
import torch
import torch.nn.functional as F

import orchard
from conftest import DEVICES
from feature_reference import feature_attention_ref, varlen_attention_ref
from helpers import check_close_rule, randn

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (shape (b, sq, sk, hq, hkv, d, dv), flash_attn_func kwargs)
CASES = {
    "window_8_4": ((2, 70, 70, 4, 2, 64, 64), dict(window_size=(8, 4))),
    "window_left_only": ((1, 65, 129, 4, 4, 32, 32), dict(window_size=(17, -1))),
    "window_right_only": ((1, 96, 64, 2, 2, 64, 64), dict(window_size=(-1, 3))),
    "window_0_0": ((1, 40, 40, 2, 1, 32, 32), dict(window_size=(0, 0))),
    "causal_window": ((2, 100, 140, 4, 2, 64, 64), dict(causal=True, window_size=(24, -1))),
    "window_empty_rows": ((1, 90, 30, 2, 2, 32, 32), dict(window_size=(2, 1))),  # sq > sk
    "softcap": ((2, 64, 80, 4, 4, 64, 64), dict(softcap=2.5)),
    "softcap_causal": ((1, 77, 77, 4, 2, 128, 128), dict(softcap=30.0, causal=True)),
    "alibi": ((2, 64, 96, 4, 4, 64, 64), dict(alibi=(4,))),
    "alibi_batch_causal": ((2, 80, 80, 4, 2, 32, 32), dict(alibi=(2, 4), causal=True)),
    "sink": ((2, 64, 64, 4, 4, 64, 64), dict(sink=True)),
    "sink_causal_empty_rows": ((1, 70, 40, 4, 2, 32, 32), dict(sink=True, causal=True)),
    "dv_differs": ((2, 48, 80, 4, 2, 64, 32), dict()),
    "dv_differs_causal": ((1, 64, 64, 2, 2, 96, 64), dict(causal=True)),
    "everything": ((2, 72, 100, 4, 2, 64, 48),
                   dict(window_size=(20, 10), softcap=5.0, alibi=(4,), sink=True)),
}


def _make_features(kw, b, hq, device):
    kw = dict(kw)
    extra = {}
    if "alibi" in kw:
        shape = kw.pop("alibi")
        extra["alibi_slopes"] = (torch.rand(*shape, dtype=torch.float64) * 0.5).float().to(device)
    if kw.pop("sink", False):
        extra["sink"] = randn(hq, dtype=torch.float32, device=device, requires_grad=True)
    return kw, extra


def _ref_kwargs(kw, extra):
    r = dict(window=tuple(kw.get("window_size", (-1, -1))), causal=kw.get("causal", False),
             softcap=kw.get("softcap", 0.0))
    if "alibi_slopes" in extra:
        r["alibi_slopes"] = extra["alibi_slopes"]
    return r


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def _op_vs_reference(q, k, v, dout, scale, features, ref_kw, atol, *, causal=False, top_left=False,
                     dropout_p=0.0, seed=0, deterministic=False, what=""):
    """The torch ops' forward and backward (BSHD, `features` as they take them) against the
    float64 reference with flash-attn's rule (the naive low-precision reference sets the
    tolerance); with dropout, the reference applies the mask the forward returned.
    Returns (out, lse, grads, ref_lse)."""
    out, lse, keep = torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, top_left, dropout_p, seed, 0,
                                                          dropout_p > 0, False, "orchard.flash_attn", None,
                                                          *features)
    grads = torch.ops.orchard.flash_attn_backward(dout, q, k, v, out, lse, scale, causal, top_left, dropout_p, seed,
                                                  0, deterministic, "orchard.flash_attn", None, *features)
    if dropout_p > 0:
        ref_kw = dict(ref_kw, keep_mask=keep.cpu(), dropout_p=dropout_p)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    low = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = feature_attention_ref(*leaves, **ref_kw)
    naive, _ = feature_attention_ref(*low, upcast=False, **ref_kw)
    check_close_rule(out, ref, naive, atol, f"out{what}")
    want = _grads(ref, leaves, dout.cpu().double())
    want_naive = _grads(naive, low, dout.cpu())
    for name, g, w, n in zip("qkv", grads, want, want_naive):
        check_close_rule(g, w, n, atol, f"d{name}{what}")
    return out, lse, grads, ref_lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_feature_fwd_bwd_vs_reference(name, dtype, device):
    (b, sq, sk, hq, hkv, d, dv), kw = CASES[name]
    kw, extra = _make_features(kw, b, hq, device)
    q = randn(b, sq, hq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(b, sk, hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(b, sk, hkv, dv, dtype=dtype, device=device, requires_grad=True)
    do = randn(b, sq, hq, dv, dtype=dtype, device=device)
    sink = extra.get("sink")
    out, lse = orchard.flash_attn_func(q, k, v, **kw, **extra, return_softmax_lse=True)
    inputs = (q, k, v) + ((sink,) if sink is not None else ())
    got = _grads(out, inputs, do)

    rkw = _ref_kwargs(kw, extra)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = None if sink is None else sink.detach().double().requires_grad_()
    ref, ref_lse = feature_attention_ref(q64, k64, v64, sink=s64, **rkw)
    ref_grads = _grads(ref, (q64, k64, v64) + ((s64,) if s64 is not None else ()), do.double())

    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sn = None if sink is None else sink.detach().clone().requires_grad_()
    naive, _ = feature_attention_ref(qn, kn, vn, sink=sn, upcast=False, **rkw)
    naive_grads = _grads(naive, (qn, kn, vn) + ((sn,) if sn is not None else ()), do)

    assert out.shape == (b, sq, hq, dv) and out.dtype == dtype
    check_close_rule(out, ref, naive, ATOL[dtype], what=f"out {name} {dtype}")
    for gname, g, r, n in zip(("dq", "dk", "dv", "dsink"), got, ref_grads, naive_grads):
        assert torch.isfinite(g).all(), gname
        # dsink sums over every row: its atol scales with the number of rows.
        atol = ATOL[dtype] * (4 if gname != "dsink" else 4 * b * sq)
        check_close_rule(g, r, n, atol, what=f"{gname} {name} {dtype}")
    lse64, ref_lse = lse.detach().cpu().double(), ref_lse.detach().cpu()
    assert torch.equal(torch.isfinite(lse64), torch.isfinite(ref_lse)), "LSE -inf pattern"
    fin = torch.isfinite(ref_lse)
    assert (lse64[fin] - ref_lse[fin]).abs().max() <= 1e-3 + 1e-4 * ref_lse[fin].abs().max()


def _random_cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


VARLEN = {
    "plain": (dict(), [37, 0, 64, 5], [50, 3, 64, 0]),
    "causal": (dict(causal=True), [40, 17, 1, 64], [40, 30, 9, 20]),
    "window_alibi": (dict(window_size=(6, 3), alibi=(4,)), [33, 70], [45, 70]),
    "softcap_sink_causal": (dict(softcap=4.0, sink=True, causal=True), [20, 0, 48], [25, 8, 48]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_vs_reference(name, dtype, device):
    kw, lq, lk = VARLEN[name]
    hq, hkv, d = 4, 2, 64
    kw, extra = _make_features(kw, len(lq), hq, device)
    cu_q, cu_k = _random_cu(lq, device), _random_cu(lk, device)
    q = randn(sum(lq), hq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(sum(lk), hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(sum(lk), hkv, d, dtype=dtype, device=device, requires_grad=True)
    do = randn(sum(lq), hq, d, dtype=dtype, device=device)
    sink = extra.get("sink")
    out, lse = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw,
                                              **extra, return_softmax_lse=True)
    inputs = (q, k, v) + ((sink,) if sink is not None else ())
    got = _grads(out, inputs, do)

    rkw = _ref_kwargs(kw, extra)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = None if sink is None else sink.detach().double().requires_grad_()
    ref, ref_lse = varlen_attention_ref(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), sink=s64, **rkw)
    ref_grads = _grads(ref, (q64, k64, v64) + ((s64,) if s64 is not None else ()), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sn = None if sink is None else sink.detach().clone().requires_grad_()
    naive, _ = varlen_attention_ref(qn, kn, vn, cu_q.cpu(), cu_k.cpu(), sink=sn, upcast=False, **rkw)
    naive_grads = _grads(naive, (qn, kn, vn) + ((sn,) if sn is not None else ()), do)

    assert out.shape == (sum(lq), hq, d) and lse.shape == (hq, sum(lq))
    check_close_rule(out, ref, naive, ATOL[dtype], what=f"out {name}")
    for gname, g, r, n in zip(("dq", "dk", "dv", "dsink"), got, ref_grads, naive_grads):
        if r is None:
            continue
        atol = ATOL[dtype] * (4 if gname != "dsink" else 4 * sum(lq))
        check_close_rule(g, r, n, atol, what=f"{gname} {name}")
    lse64, ref_lse = lse.detach().cpu().double(), ref_lse.detach().cpu()
    assert torch.equal(torch.isfinite(lse64), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse64[fin] - ref_lse[fin]).abs().max() <= 1e-3


def _poison_allocator(device, *shapes_dtypes):
    """Frees NaN-filled blocks of these sizes, so the allocations that follow (the caching
    allocator on CUDA, malloc's free lists on the CPU) are likely to get poisoned memory."""
    blocks = [torch.full(shape, float("nan"), dtype=dt, device=device) for shape, dt in shapes_dtypes]
    del blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_rows_past_the_last_offset(device, dtype, causal):
    """Packed rows past cu_seqlens[-1] belong to no sequence: out and the gradients are 0 there
    and the LSE -inf (not left unwritten, where NaN would reach the caller's weights), and the
    owned rows are bit-identical to the call without the padding rows."""
    lq, lk, pad_q, pad_k, hq, hkv, d = [30, 0, 21], [25, 40, 0], 13, 11, 4, 2, 32
    nq, nk = sum(lq), sum(lk)
    cu_q, cu_k = _random_cu(lq, device), _random_cu(lk, device)
    q = randn(nq + pad_q, hq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(nk + pad_k, hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(nk + pad_k, hkv, d, dtype=dtype, device=device, requires_grad=True)
    do = randn(nq + pad_q, hq, d, dtype=dtype, device=device)
    _poison_allocator(device, (q.shape, dtype), (k.shape, dtype), (k.shape, dtype), ((hq, nq + pad_q), torch.float32))
    out, lse = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                              return_softmax_lse=True)
    _poison_allocator(device, (q.shape, dtype), (k.shape, dtype), (k.shape, dtype))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.equal(out[nq:], torch.zeros_like(out[nq:]))
    assert torch.equal(lse[:, nq:], torch.full_like(lse[:, nq:], float("-inf")))
    for name, g, n in (("dq", dq, nq), ("dk", dk, nk), ("dv", dv, nk)):
        assert torch.equal(g[n:], torch.zeros_like(g[n:])), f"{name} rows past the last offset"

    qs, ks, vs = (t.detach()[:n].clone().requires_grad_() for t, n in ((q, nq), (k, nk), (v, nk)))
    out_s, lse_s = orchard.flash_attn_varlen_func(qs, ks, vs, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                  return_softmax_lse=True)
    grads_s = torch.autograd.grad(out_s, (qs, ks, vs), do[:nq])
    assert torch.equal(out[:nq], out_s) and torch.equal(lse[:, :nq], lse_s)
    for g, gs, n in zip((dq, dk, dv), grads_s, (nq, nk, nk)):
        torch.testing.assert_close(g[:n], gs, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_sink_grad_with_rows_past_the_last_offset(device):
    """The sink's gradient takes no share from packed rows no sequence owns (their LSE is -inf
    and their out 0: exp(sink - lse) * 0 was NaN): the same dsink as without those rows."""
    lens, pad, hq, d = [30, 0, 21], 9, 4, 32
    n = sum(lens)
    cu = _random_cu(lens, device)
    q, k, v = (randn(n + pad, hq, d, device=device) for _ in range(3))
    do = randn(n + pad, hq, d, device=device)
    sink = randn(hq, dtype=torch.float32, device=device, requires_grad=True)
    out = orchard.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, sink=sink)
    (dsink,) = torch.autograd.grad(out, (sink,), do)
    out_s = orchard.flash_attn_varlen_func(q[:n], k[:n], v[:n], cu, cu, max(lens), max(lens), causal=True,
                                           sink=sink)
    (dsink_s,) = torch.autograd.grad(out_s, (sink,), do[:n])
    assert torch.isfinite(dsink).all()
    torch.testing.assert_close(dsink, dsink_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_no_rows_owned(device):
    """Every sequence empty (or no sequence at all): every packed row is padding. Also with
    strided offsets, whose entry b is not at element b of their storage."""
    strided = torch.tensor([0, 99, 0, 99], dtype=torch.int32, device=device)[::2]  # offsets [0, 0]
    for lens, cu in (([0, 0], None), ([], None), ([0], strided)):
        cu = _random_cu(lens, device) if cu is None else cu
        q = randn(6, 2, 16, device=device, requires_grad=True)
        k = randn(5, 2, 16, device=device, requires_grad=True)
        v = randn(5, 2, 16, device=device, requires_grad=True)
        _poison_allocator(device, (q.shape, q.dtype), ((2, 6), torch.float32))
        out, lse = orchard.flash_attn_varlen_func(q, k, v, cu, cu, 0, 0, return_softmax_lse=True)
        assert torch.equal(out, torch.zeros_like(out)), lens
        assert torch.equal(lse, torch.full_like(lse, float("-inf"))), lens
        _poison_allocator(device, (q.shape, q.dtype), (k.shape, k.dtype), (k.shape, k.dtype))
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), lens


@pytest.mark.parametrize("device", DEVICES)
def test_packed_forms_match_unpacked(device):
    b, s, h, d = 2, 48, 4, 32
    qkv = randn(b, s, 3, h, d, device=device, requires_grad=True)
    out = orchard.flash_attn_qkvpacked_func(qkv, causal=True)
    ref = orchard.flash_attn_func(*qkv.detach().unbind(2), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()
    q = randn(b, s, h, d, device=device)
    kv = randn(b, s, 2, 2, d, device=device)
    torch.testing.assert_close(orchard.flash_attn_kvpacked_func(q, kv),
                               orchard.flash_attn_func(q, *kv.unbind(2)), rtol=0, atol=0)
    lens = [20, 28]
    cu = _random_cu(lens, device)
    qkv_v = randn(sum(lens), 3, h, d, device=device)
    torch.testing.assert_close(
        orchard.flash_attn_varlen_qkvpacked_func(qkv_v, cu, max(lens), causal=True),
        orchard.flash_attn_varlen_func(*qkv_v.unbind(1), cu, cu, max(lens), max(lens), causal=True),
        rtol=0, atol=0)
    kv_v = randn(sum(lens), 2, 2, d, device=device)
    torch.testing.assert_close(
        orchard.flash_attn_varlen_kvpacked_func(qkv_v[:, 0], kv_v, cu, cu, max(lens), max(lens)),
        orchard.flash_attn_varlen_func(qkv_v[:, 0], *kv_v.unbind(1), cu, cu, max(lens), max(lens)),
        rtol=0, atol=0)


MASK_SHAPES = [(2, 4, 40, 56), (40, 56), (1, 4, 1, 56), (2, 1, 40, 1), (4, 40, 56)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_sdpa_attn_mask_vs_torch(shape, kind, device):
    b, h, lq, lk, e = 2, 4, 40, 56, 32
    q = randn(b, h, lq, e, device=device, requires_grad=True)
    k = randn(b, h, lk, e, device=device, requires_grad=True)
    v = randn(b, h, lk, e, device=device, requires_grad=True)
    if kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
        # torch returns NaN for rows the mask hides entirely: keep one key visible.
        mask = mask | (torch.arange(lk, device=device) == 0)
    else:
        mask = randn(*shape, device=device)
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64,
                                         attn_mask=mask if kind == "bool" else mask.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    do = randn(*out.shape, device=device)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


# Causal together with an attn_mask: the SDPA drop-in rejects it as torch does, but the torch op
# and the C++ API take it. The sm80 CUDA kernels run it as the non-causal mask kernel with the
# causal bound as its window's right edge (launch.h: causal_runs_as_window), so this checks that
# route against the float64 reference: both alignments, sq above and below sk (empty rows), a
# left window on top, bool and float masks, forward and backward (atomic and deterministic dQ).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("top_left,sq,sk,window_left,d,deterministic",
                         [(False, 70, 90, -1, 64, False), (True, 90, 70, -1, 128, False),
                          (False, 96, 64, 20, 64, True), (True, 64, 100, 30, 192, True)])
def test_causal_with_attn_mask_op(device, dtype, kind, top_left, sq, sk, window_left, d, deterministic):
    b, hq, hkv, scale = 1, 4, 2, d ** -0.5
    q = randn(b, sq, hq, d, dtype=dtype, device=device)
    k = randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = randn(b, sk, hkv, d, dtype=dtype, device=device)
    dout = randn(b, sq, hq, d, dtype=dtype, device=device)
    if kind == "bool":
        mask = torch.rand(b, 1, sq, sk, device=device) > 0.3
        mask[:, :, 5] = False  # a row the mask hides entirely
    else:
        mask = randn(b, 1, sq, sk, dtype=dtype, device=device)
    features = (window_left, -1, 0.0, None, None, mask)
    ref_kw = dict(scale=scale, causal=True, top_left=top_left, window=(window_left, -1), bias=mask.cpu())
    _, lse, _, ref_lse = _op_vs_reference(q, k, v, dout, scale, features, ref_kw, ATOL[dtype], causal=True,
                                          top_left=top_left, deterministic=deterministic)
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), visible), "rows that see no key: LSE -inf"
    torch.testing.assert_close(lse.cpu().double()[visible], ref_lse[visible], atol=1e-3, rtol=1e-3)


# Boolean masks that hide whole key tiles: a key-padding mask's long tail, a batch entry whose
# keys are all hidden, a dense mask with a hidden block. The CPU kernels skip such tiles
# (bool_mask_hides_tile: the forward unless it returns a dropout mask, every backward tile),
# which must leave every output as computing them would: against the float64 reference (forward,
# LSE, gradients; GQA; dropout off, and on through the returned mask), and bit for bit against the
# forward that computes them (dropout with the mask returned).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["key_padding", "dense_block"])
def test_bool_mask_hiding_whole_tiles(device, dtype, layout):
    b, sq, sk, hq, hkv, d, scale = 3, 300, 520, 4, 2, 64, 0.125
    q = randn(b, sq, hq, d, dtype=dtype, device=device)
    k = randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = randn(b, sk, hkv, d, dtype=dtype, device=device)
    dout = randn(b, sq, hq, d, dtype=dtype, device=device)
    if layout == "key_padding":
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=device)
        mask[0, ..., 130:] = False  # every key tile past the first three hidden
        mask[1] = False  # no key at all: out 0, LSE -inf, zero gradients
    else:
        mask = torch.rand(b, hq, sq, sk, device=device) > 0.2
        mask[:, :, :200, 128:448] = False  # a hidden block of rows x key tiles
    features = (-1, -1, 0.0, None, None, mask)
    ref_kw = dict(scale=scale, bias=mask.cpu())
    out, lse, grads, ref_lse = _op_vs_reference(q, k, v, dout, scale, features, ref_kw, ATOL[dtype])
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), visible)
    torch.testing.assert_close(lse.cpu().double()[visible], ref_lse[visible], atol=1e-4, rtol=1e-4)
    if layout == "key_padding":
        assert (out[1] == 0).all() and (grads[0][1] == 0).all() and (grads[1][1] == 0).all()
    # Dropout on, the mask returned: the forward computes every tile (it records the mask in
    # column order), the backward still skips the hidden ones; against the reference with that mask.
    out_d, lse_d, _, _ = _op_vs_reference(q, k, v, dout, scale, features, ref_kw, ATOL[dtype], dropout_p=0.3,
                                          seed=7, what=" (dropout)")
    # The same draw without returning the mask: the forward skips the hidden tiles too, which must
    # change nothing at all (a hidden tile adds exact zeros).
    out_s, lse_s, _ = torch.ops.orchard.flash_attn_forward(q, k, v, scale, False, False, 0.3, 7, 0, False, False,
                                                           "orchard.flash_attn", None, *features)
    assert torch.equal(out_s, out_d) and torch.equal(lse_s, lse_d)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_mask_reads_broadcast_in_place_and_hidden_rows_are_zero(device, monkeypatch, capfd):
    q = randn(1, 2, 8, 16, device=device)
    k = randn(1, 2, 8, 16, device=device)
    v = randn(1, 2, 8, 16, device=device)
    mask = torch.ones(8, 8, dtype=torch.bool, device=device)
    mask[3] = False  # row 3 sees nothing
    monkeypatch.setenv("ORCHARD_TENSOR_PROFILE", "1")
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 3] == 0).all() and torch.isfinite(out).all()
    err = capfd.readouterr().err
    assert "staged" not in err


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_value_head_dim(device):
    q = randn(2, 4, 33, 64, device=device)
    k = randn(2, 4, 47, 64, device=device)
    v = randn(2, 4, 47, 24, device=device)
    out = orchard.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.shape == (2, 4, 33, 24)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_attention_equals_attention_over_the_union(device):
    b, sq, sk, h, d = 2, 37, 90, 4, 32
    q = randn(b, sq, h, d, device=device)
    k = randn(b, sk, h, d, device=device)
    v = randn(b, sk, h, d, device=device)
    full, full_lse = orchard.flash_attn_func(q, k, v, return_softmax_lse=True)
    parts = [(0, 30), (30, 31), (31, 90), (90, 90)]  # an empty key set contributes nothing
    outs, lses = [], []
    for a, e in parts:
        o, l = orchard.flash_attn_func(q, k[:, a:e], v[:, a:e], return_softmax_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = orchard.combine_attention(outs, lses)
    torch.testing.assert_close(out, full, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=2e-6, rtol=1e-6)
    # Rows no partial saw: 0 and -inf, never NaN.
    ninf = torch.full_like(lses[0], float("-inf"))
    out0, lse0 = orchard.combine_attention([outs[0], outs[1]], [ninf, ninf])
    assert (out0 == 0).all() and torch.isneginf(lse0).all()


def test_combine_attention_is_differentiable():
    outs = [randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [randn(1, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *t: orchard.combine_attention(t[:3], t[3:]),
                                    (*outs, *lses))


GRADCHECK = {
    "window": dict(window_size=(3, 2)),
    "softcap": dict(softcap=1.5),
    "alibi_causal": dict(causal=True, alibi=(2,)),
    "sink_window": dict(sink=True, window_size=(2, 0)),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    kw, extra = _make_features(GRADCHECK[name], 1, 2, "cpu")
    q = randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    k = randn(1, 11, 1, 8, dtype=torch.float64, requires_grad=True)
    v = randn(1, 11, 1, 6, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v]
    if "sink" in extra:
        extra["sink"] = extra["sink"].detach().double().requires_grad_()

    def fn(q, k, v, *rest):
        e = dict(extra)
        if rest:
            e["sink"] = rest[0].float() if False else rest[0]
        return orchard.flash_attn_func(q, k, v, **kw, **e)
    if "sink" in extra:
        # sink is float32 in the API; check its gradient against finite differences in float64
        # of the reference instead (the float32 parameter cannot take float64 perturbations).
        sink32 = extra["sink"].float().detach().requires_grad_()
        extra["sink"] = sink32
        assert torch.autograd.gradcheck(lambda q, k, v: orchard.flash_attn_func(q, k, v, **kw, sink=sink32),
                                        (q, k, v))
    else:
        assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_gradcheck_sdpa_float_mask():
    q = randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    bias = randn(1, 2, 7, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_with_features_matches_reference_with_returned_mask(device):
    b, s, h, d = 1, 64, 2, 32
    q, k, v = (randn(b, s, h, d, device=device) for _ in range(3))
    slopes = torch.rand(h, device=device)
    kw = dict(window_size=(10, 5), softcap=3.0)
    out, lse, keep = orchard.flash_attn_func(q, k, v, dropout_p=0.25, alibi_slopes=slopes,
                                             return_attn_probs=True, **kw)
    ref, _ = feature_attention_ref(q, k, v, window=(10, 5), softcap=3.0, alibi_slopes=slopes,
                                   keep_mask=keep.transpose(0, 0), dropout_p=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


BAD = [
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, window_size=(-2, 0)), "window_size"),
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, window_size=(1,)), "window_size"),
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, softcap=-1.0), "softcap"),
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64)),
     "alibi_slopes must be float32"),
    (lambda q, k, v: orchard.flash_attn_func(q, k, v, sink=torch.ones(5)), "sink"),
    (lambda q, k, v: orchard.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=torch.ones(3, 5, dtype=torch.bool)), "does not broadcast"),
    (lambda q, k, v: orchard.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), "is_causal"),
    (lambda q, k, v: orchard.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=torch.ones(8, 8, dtype=torch.int64)), "bool or floating"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_feature_input(case):
    fn, msg = BAD[case]
    q, k, v = (randn(1, 8, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match=msg) as e:
        fn(q, k, v)
    assert str(e.value).startswith("orchard.")


VARLEN_BAD = [
    (dict(cu_q=[0, 4, 8], dtype=torch.int64), "int32"),
    (dict(cu_q=[0, 6, 4, 8]), "non-decreasing"),
    (dict(cu_q=[0, 4, 8, 12]), "exceeds"),
    (dict(max_q=2), "max_seqlen"),
    (dict(cu_k=[0, 4]), "same length"),
]


@pytest.mark.parametrize("case", range(len(VARLEN_BAD)))
def test_bad_varlen_input(case):
    over, msg = VARLEN_BAD[case]
    q, k, v = (randn(8, 2, 16) for _ in range(3))
    cu_q = torch.tensor(over.get("cu_q", [0, 3, 5, 8]), dtype=over.get("dtype", torch.int32))
    cu_k = torch.tensor(over.get("cu_k", [0, 3, 5, 8]), dtype=torch.int32)
    with pytest.raises(ValueError, match=msg) as e:
        orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, over.get("max_q", 8), 8)
    assert str(e.value).startswith("orchard.flash_attn_varlen_func:")
    assert q.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 4, 24, 40), (24, 40), (1, 4, 1, 40), (2, 1, 24, 1)], ids=str)
def test_learnable_bias_gradient_matches_torch(shape, device):
    b, h, hkv, lq, lk, e = 2, 4, 2, 24, 40, 16
    q = randn(b, h, lq, e, device=device, requires_grad=True)
    k = randn(b, hkv, lk, e, device=device, requires_grad=True)
    v = randn(b, hkv, lk, e, device=device, requires_grad=True)
    bias = randn(*shape, device=device, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    do = randn(*out.shape, device=device)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=True)
    want = torch.autograd.grad(ref, leaves, do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=name)


def test_gradcheck_learnable_bias_float64():
    q = randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    v = randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    bias = randn(2, 1, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, bias: orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q, k, v, bias))
