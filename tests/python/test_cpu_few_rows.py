"""CPU forward calls with few query rows per kv head run on the decode kernel
(src/backends/cpu/few_rows_forward.h). Checked here against the float64 reference with
every feature that route takes, against the tiled forward (ORCHARD_CPU_FEW_ROWS=0, read
per call), through the backward (which reads the LSE the route writes), in the layouts
the drop-ins hand it; and the debug log must name the kernel that ran, so a rule that
silently stops routing (or routes a call it cannot serve) fails here."""

import os

import pytest
import torch

import orchard
from feature_reference import feature_attention_ref
from helpers import check_close_rule, randn

ATOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
BF16_MAX_ROWS = 4  # kFewRowsMaxRowsBf16Dot: the bf16 limit on CPUs with AVX512_BF16 (32 elsewhere)
DECODE = "variant=cpu_fwd_fp32_decode_kernel"

# (b, sq, sk, hq, hkv, d): query rows per kv head (hq / hkv * sq) from 1 to 32.
SHAPES = {
    "mha_one_row": (2, 1, 300, 8, 8, 64),
    "gqa_three_rows": (1, 3, 129, 8, 2, 128),
    "sixteen_rows": (2, 16, 70, 4, 4, 32),
    "gqa_sixteen_rows_d8": (1, 2, 1000, 16, 2, 8),
    "one_pair_split_kv": (1, 1, 5000, 4, 1, 64),  # fewer (batch, kv head) pairs than threads
    "d256": (1, 2, 64, 2, 1, 256),
    "more_rows_than_keys": (1, 4, 2, 2, 2, 16),  # causal: rows 0 and 1 see no key
    "gqa_thirty_two_rows": (1, 8, 150, 8, 2, 64),  # scores as one GEMM (16+ rows)
}
FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(5, 2)),
    "causal_window": dict(causal=True, window_size=(3, -1)),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi=(1,)),
    "alibi_batch_causal": dict(alibi=(2,), causal=True),
    "everything": dict(causal=True, window_size=(40, -1), softcap=8.0, alibi=(1,)),
    "sink_causal": dict(causal=True, sink=True),  # rows that see no key: out 0, lse = the sink
}


def _inputs(shape, dtype, layout="bshd", requires_grad=False):
    b, sq, sk, hq, hkv, d = shape
    if layout == "bshd":
        mk = lambda s, h: randn(b, s, h, d, dtype=dtype)  # noqa: E731
    else:  # BHSD storage read through BSHD views, as the SDPA drop-in hands them over
        mk = lambda s, h: randn(b, h, s, d, dtype=dtype).transpose(1, 2)  # noqa: E731
    q, k, v = mk(sq, hq), mk(sk, hkv), mk(sk, hkv)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _features(kw, b, hq):
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        shape = (hq,) if alibi == (1,) else (b, hq)
        kw["alibi_slopes"] = torch.rand(shape, dtype=torch.float32) * 0.3 + 0.05
    if kw.pop("sink", False):
        kw["sink"] = torch.randn(hq, dtype=torch.float32)
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"), sink=kw.get("sink"))
    return kw, ref_kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_few_rows_forward_vs_reference(shape_name, feature, dtype, debug_log):
    shape = SHAPES[shape_name]
    b, sq, sk, hq, hkv, d = shape
    if dtype == torch.bfloat16 and hq // hkv * sq > BF16_MAX_ROWS:
        pytest.skip("bf16 above 4 rows per kv head takes the bf16 tiles on an AVX512_BF16 CPU")
    torch.manual_seed(hash((shape_name, feature)) % 2**31)
    q, k, v = _inputs(shape, dtype, layout="bhsd" if feature == "plain" else "bshd")
    kw, ref_kw = _features(FEATURES[feature], b, hq)
    out, lse = orchard.flash_attn_func(q, k, v, return_softmax_lse=True, **kw)
    logged = debug_log()
    assert len(logged) == 1 and DECODE in logged[0], logged
    ref, ref_lse = feature_attention_ref(q, k, v, **ref_kw)
    naive, _ = feature_attention_ref(q, k, v, upcast=False, **ref_kw)
    check_close_rule(out, ref, naive, ATOL[dtype], f"out {shape_name} {feature}")
    # LSE in fp32 from fp32 scores either way: rows that see no key are -inf in both.
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    # The tiled forward on the same call (the switch is read per call) agrees too.
    os.environ["ORCHARD_CPU_FEW_ROWS"] = "0"
    try:
        tiled, tiled_lse = orchard.flash_attn_func(q, k, v, return_softmax_lse=True, **kw)
    finally:
        del os.environ["ORCHARD_CPU_FEW_ROWS"]
    assert DECODE not in debug_log()[-1], debug_log()[-1]
    check_close_rule(tiled, ref, naive, ATOL[dtype], f"tiled out {shape_name} {feature}")
    torch.testing.assert_close(lse, tiled_lse, atol=1e-4, rtol=1e-5)


def check_against_references(out, grads, q, k, v, dout, ref_kw, atol, what):
    """out and (dq, dk, dv) by the tolerance rule: float64 math as the reference, the same math in
    the inputs' dtype as the yardstick (4 x atol for the gradients)."""
    ref, _ = feature_attention_ref(q, k, v, **ref_kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    naive, _ = feature_attention_ref(q, k, v, upcast=False, **ref_kw)
    naive_grads = torch.autograd.grad(naive, (q, k, v), dout)
    check_close_rule(out, ref, naive, atol, f"out {what}")
    for name, g, r, n in zip("qkv", grads, ref_grads, naive_grads):
        check_close_rule(g, r, n, 4 * atol, f"d{name} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "everything", "sink_causal"])
def test_few_rows_backward_reads_the_routed_lse(feature, dtype, debug_log):
    shape = (2, 4, 200, 8, 2, 64)  # 16 rows per kv head
    b, sq, sk, hq, hkv, d = shape
    torch.manual_seed(3)
    q, k, v = _inputs(shape, dtype, requires_grad=True)
    kw, ref_kw = _features(FEATURES[feature], b, hq)
    dout = randn(b, sq, hq, d, dtype=dtype)
    out = orchard.flash_attn_func(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    logged = debug_log()
    assert [ln.split()[0] for ln in logged] == ["FWD", "BWD"] and DECODE in logged[0], logged
    check_against_references(out, grads, q, k, v, dout, ref_kw, ATOL[dtype], feature)


def test_sdpa_drop_in_decode_step_takes_the_route(debug_log):
    """A decode step through the SDPA drop-in (B, H, S, D), GQA: is_causal with one query row
    is top-left in torch's convention (row 0 sees key 0 only), which the decode kernel's
    bottom-right diagonal cannot express; without is_causal the step routes."""
    torch.manual_seed(5)
    q = randn(2, 8, 1, 64)
    k, v = randn(2, 2, 333, 64), randn(2, 2, 333, 64)
    out = orchard.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    causal = orchard.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref_causal = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                  is_causal=True, enable_gqa=True)
    torch.testing.assert_close(causal.double(), ref_causal, atol=2e-6, rtol=1e-5)
    logged = debug_log()
    assert len(logged) == 2 and DECODE in logged[0] and DECODE not in logged[1], logged


@pytest.mark.parametrize("case", ["thirty_three_rows", "bfloat16", "dropout", "dv_differs", "d_not_8"])
def test_calls_the_route_cannot_serve_stay_tiled(case, debug_log):
    """Each call sits just outside the rule (few_rows_forward.h) and must run tiled, correctly."""
    torch.manual_seed(7)
    b, sq, sk, hq, hkv, d, dv = 1, 1, 90, 4, 4, 32, 32
    dtype, kw = torch.float32, {}
    if case == "thirty_three_rows":
        sq, hq, hkv = 33, 2, 2
    elif case == "bfloat16":  # 33 rows: above the bf16 limit on any CPU
        dtype, sq, hq, hkv = torch.bfloat16, 33, 2, 2
    elif case == "dropout":
        kw = dict(dropout_p=0.3)
    elif case == "dv_differs":
        dv = 16
    elif case == "d_not_8":
        d = dv = 20
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)
    out = orchard.flash_attn_func(q, k, v, **kw)
    logged = debug_log()
    assert len(logged) == 1 and DECODE not in logged[0] and "variant=cpu_fwd_" in logged[0], logged
    if case != "dropout":
        ref, _ = feature_attention_ref(q, k, v, sink=kw.get("sink"))
        naive, _ = feature_attention_ref(q, k, v, sink=kw.get("sink"), upcast=False)
        check_close_rule(out, ref, naive, 2e-3 if dtype == torch.bfloat16 else 2e-5, case)


@pytest.mark.parametrize("sk", [300, 5000])  # 5000 keys over one kv head: split-KV on the decode kernel
def test_few_rows_nan_rows_match_the_tiled_forward(sk, debug_log):
    """A NaN in one query row: that row's output and LSE are NaN on the decode kernel, as on
    the tiled forward; the other rows are untouched."""
    torch.manual_seed(9)
    q, k, v = randn(1, 2, 4, 32), randn(1, sk, 1, 32), randn(1, sk, 1, 32)
    q[0, 1, 2, 5] = float("nan")
    out, lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert DECODE in debug_log()[-1]
    os.environ["ORCHARD_CPU_FEW_ROWS"] = "0"
    try:
        tiled, tiled_lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    finally:
        del os.environ["ORCHARD_CPU_FEW_ROWS"]
    bad = torch.zeros(1, 2, 4, dtype=torch.bool)
    bad[0, 1, 2] = True
    assert torch.equal(out.isnan().any(-1), bad) and torch.equal(tiled.isnan().any(-1), bad)
    assert torch.equal(lse.isnan(), bad.transpose(1, 2)) and torch.equal(tiled_lse.isnan(), bad.transpose(1, 2))
    torch.testing.assert_close(out[~bad], tiled[~bad], atol=2e-6, rtol=1e-5)
