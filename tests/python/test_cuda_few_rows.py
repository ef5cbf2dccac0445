"""CUDA fp32 forward calls with few query rows per kv head run on the CUDA decode kernel
(cuda_backend.cu, fp32_takes_decode_kernel; core/forward_as_decode.h), split over the keys;
the rest take the tiled fp32 kernels (flash_fp32_tc.cu's 3xTF32 tensor-core kernels, or
flash_fp32.cu's SIMT ones). Both are checked here against the float64 reference with every
feature the route takes (test_cpu_few_rows.py's shapes and features), the tiled forward on the
same calls (ORCHARD_CUDA_FEW_ROWS=0, read per call), the tiled kernels' tile edges on both
families (ORCHARD_CUDA_FP32_TC=0: SIMT),
the backward reading the LSE the route writes, NaN rows, and a CUDA-graph capture of a call
whose split partials are allocated stream-ordered inside the capture."""

import os

import pytest
import torch

import orchard
from feature_reference import feature_attention_ref
from helpers import check_close_rule, randn
from test_cpu_few_rows import FEATURES, SHAPES, _features, check_against_references

pytestmark = pytest.mark.cuda

DECODE = "variant=cuda.fwd.fp32_decode_kernel"
TILED = ("variant=cuda.fwd.fp32_3xtf32", "variant=cuda.fwd.fp32_simt")  # the tensor-core or SIMT kernels
ATOL = 2e-5


def _is_tiled(line):
    return any(t in line for t in TILED)


def _cuda_inputs(shape, layout="bshd", requires_grad=False):
    b, sq, sk, hq, hkv, d = shape
    if layout == "bshd":
        mk = lambda s, h: randn(b, s, h, d, device="cuda")  # noqa: E731
    else:  # BHSD storage read through BSHD views, as the SDPA drop-in hands them over
        mk = lambda s, h: randn(b, h, s, d, device="cuda").transpose(1, 2)  # noqa: E731
    return [t.requires_grad_(requires_grad) for t in (mk(sq, hq), mk(sk, hkv), mk(sk, hkv))]


def _cuda_features(features, b, hq):
    """test_cpu_few_rows._features (a FEATURES-style dict) with its tensors on the GPU."""
    kw, ref_kw = _features(features, b, hq)
    for name in ("alibi_slopes", "sink"):
        if kw.get(name) is not None:
            kw[name] = ref_kw[name] = kw[name].cuda()
    return kw, ref_kw


def _tiled(call):
    before = os.environ.get("ORCHARD_CUDA_FEW_ROWS")
    os.environ["ORCHARD_CUDA_FEW_ROWS"] = "0"
    try:
        return call()
    finally:
        if before is None:
            del os.environ["ORCHARD_CUDA_FEW_ROWS"]
        else:
            os.environ["ORCHARD_CUDA_FEW_ROWS"] = before


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_fp32_few_rows_forward_vs_reference(shape_name, feature, debug_log):
    shape = SHAPES[shape_name]
    b, sq, sk, hq, hkv, d = shape
    torch.manual_seed(hash((shape_name, feature)) % 2**31)
    q, k, v = _cuda_inputs(shape, layout="bhsd" if feature == "plain" else "bshd")
    kw, ref_kw = _cuda_features(FEATURES[feature], b, hq)
    out, lse = orchard.flash_attn_func(q, k, v, return_softmax_lse=True, **kw)
    logged = debug_log()
    # The CUDA decode kernels have no sink, and hold 16 rows of a kv head's group per CTA.
    routed = "sink" not in feature and hq // hkv * sq <= 16
    assert len(logged) == 1 and (DECODE in logged[0]) == routed and "variant=cuda.fwd.fp32" in logged[0], logged
    ref, ref_lse = feature_attention_ref(q, k, v, **ref_kw)
    naive, _ = feature_attention_ref(q, k, v, upcast=False, **ref_kw)
    check_close_rule(out, ref, naive, ATOL, f"out {shape_name} {feature}")
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    tiled, tiled_lse = _tiled(lambda: orchard.flash_attn_func(q, k, v, return_softmax_lse=True, **kw))
    assert _is_tiled(debug_log()[-1]), debug_log()[-1]
    check_close_rule(tiled, ref, naive, ATOL, f"tiled out {shape_name} {feature}")
    torch.testing.assert_close(lse, tiled_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
def test_fp32_few_rows_backward_reads_the_routed_lse(feature, debug_log):
    shape = (2, 4, 3000, 8, 2, 64)  # 16 rows per kv head, enough keys to split
    b, sq, sk, hq, hkv, d = shape
    torch.manual_seed(3)
    q, k, v = _cuda_inputs(shape, requires_grad=True)
    kw, ref_kw = _cuda_features(FEATURES[feature], b, hq)
    dout = randn(b, sq, hq, d, device="cuda")
    out = orchard.flash_attn_func(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    logged = debug_log()
    assert [ln.split()[0] for ln in logged] == ["FWD", "BWD"] and DECODE in logged[0], logged
    check_against_references(out, grads, q, k, v, dout, ref_kw, ATOL, feature)


@pytest.mark.parametrize("sk", [300, 20000])  # 20000 keys over one kv head: split-KV
def test_fp32_nan_rows_on_both_forwards(sk, debug_log):
    """A NaN in one query row: that row's output and LSE are NaN on the decode kernel and on the
    tiled forward, as on the CPU; the other rows are untouched."""
    torch.manual_seed(9)
    q, k, v = randn(1, 2, 4, 32, device="cuda"), randn(1, sk, 1, 32, device="cuda"), randn(1, sk, 1, 32, device="cuda")
    q[0, 1, 2, 5] = float("nan")
    out, lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    assert DECODE in debug_log()[-1]
    tiled, tiled_lse = _tiled(lambda: orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True))
    assert _is_tiled(debug_log()[-1])
    bad = torch.zeros(1, 2, 4, dtype=torch.bool, device="cuda")
    bad[0, 1, 2] = True
    assert torch.equal(out.isnan().any(-1), bad) and torch.equal(tiled.isnan().any(-1), bad)
    assert torch.equal(lse.isnan(), bad.transpose(1, 2)) and torch.equal(tiled_lse.isnan(), bad.transpose(1, 2))
    torch.testing.assert_close(out[~bad], tiled[~bad], atol=ATOL, rtol=1e-5)


def test_fp32_decode_step_under_cuda_graph(debug_log):
    """A routed call with split-KV partials (cudaMallocAsync on the stream) captured in a CUDA
    graph and replayed on new inputs copied into its static ones."""
    torch.manual_seed(11)
    q, k, v = randn(1, 1, 8, 64, device="cuda"), randn(1, 8192, 2, 64, device="cuda"), randn(1, 8192, 2, 64, device="cuda")
    step = lambda: orchard.flash_attn_func(q, k, v)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    assert DECODE in debug_log()[-1]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        g.replay()
        torch.cuda.synchronize()
        ref, _ = feature_attention_ref(q, k, v)
        torch.testing.assert_close(static.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("sq,sk", [(1, 1), (15, 17), (16, 32), (17, 33), (40, 1000), (100, 70), (300, 300)])
@pytest.mark.parametrize("d", [8, 36, 64, 128, 200, 256])
def test_fp32_tiled_forward_shapes(sq, sk, d, fp32_family):
    """The tiled fp32 forward at the edges of its CTAs' rows (16 SIMT, 64 tensor-core) and 32-key
    tiles, head dims that are not multiples of 32 (the shared-memory row padding), causal both
    ways round."""
    torch.manual_seed(sq * 1000 + sk + d)
    q, k, v = randn(2, sq, 4, d, device="cuda"), randn(2, sk, 2, d, device="cuda"), randn(2, sk, 2, d, device="cuda")
    for causal in (False, True):
        out, lse = _tiled(lambda: orchard.flash_attn_func(q, k, v, causal=causal, return_softmax_lse=True))
        ref, ref_lse = feature_attention_ref(q, k, v, causal=causal)
        naive, _ = feature_attention_ref(q, k, v, causal=causal, upcast=False)
        check_close_rule(out, ref, naive, ATOL, f"out sq{sq} sk{sk} d{d} causal={causal}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", ["seventeen_rows", "sink", "dropout", "dv_differs", "d_not_8", "k_not_16_byte_aligned",
                                  "top_left_causal"])
def test_fp32_calls_the_route_cannot_serve_stay_tiled(case, debug_log):
    """Each call sits just outside the route's rule (fp32_takes_decode_kernel) and must run on the
    tiled kernels, correctly."""
    torch.manual_seed(7)
    b, sq, sk, hq, hkv, d, dv = 1, 1, 90, 4, 4, 32, 32
    kw, ref_kw = {}, {}
    if case == "seventeen_rows":
        sq, hq, hkv = 17, 2, 2
    elif case == "sink":
        kw["sink"] = ref_kw["sink"] = randn(hq, device="cuda")
    elif case == "dropout":
        kw = dict(dropout_p=0.3)
    elif case == "dv_differs":
        dv = 16
    elif case == "d_not_8":
        d = dv = 20
    q = randn(b, sq, hq, d, device="cuda")
    k, v = randn(b, sk, hkv, d, device="cuda"), randn(b, sk, hkv, dv, device="cuda")
    if case == "k_not_16_byte_aligned":  # rows 4 bytes past a 16-byte boundary, read in place
        k = randn(b, sk, hkv, d + 1, device="cuda")[..., 1:]
    if case == "top_left_causal":  # 2 rows against 90 keys, causal from key 0: not the decode diagonal
        sq = 2
        q = randn(b, sq, hq, d, device="cuda")
        out = orchard.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True).transpose(1, 2)
        ref, _ = feature_attention_ref(q, k, v, causal=True, top_left=True)
    else:
        out = orchard.flash_attn_func(q, k, v, **kw)
    logged = debug_log()
    assert len(logged) == 1 and DECODE not in logged[0] and _is_tiled(logged[0]), logged
    if case == "dropout":
        return
    if case == "top_left_causal":
        naive, _ = feature_attention_ref(q, k, v, causal=True, top_left=True, upcast=False)
    else:
        ref, _ = feature_attention_ref(q, k, v, **ref_kw)
        naive, _ = feature_attention_ref(q, k, v, upcast=False, **ref_kw)
    check_close_rule(out, ref, naive, ATOL, case)


@pytest.mark.parametrize("sq,sk", [(70, 100), (33, 200), (200, 40)])
@pytest.mark.parametrize("d", [36, 64, 200])
def test_fp32_tiled_backward_shapes(sq, sk, d, fp32_family):
    """The tiled backward where dQ walks several key tiles and dK / dV several query tiles of each
    head of a GQA group, partial tiles at both ends, causal and not."""
    torch.manual_seed(sq + sk + d)
    for causal in (False, True):
        q = randn(2, sq, 4, d, device="cuda", requires_grad=True)
        k, v = (randn(2, sk, 2, d, device="cuda", requires_grad=True) for _ in range(2))
        dout = randn(2, sq, 4, d, device="cuda")
        out = orchard.flash_attn_func(q, k, v, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        check_against_references(out, grads, q, k, v, dout, dict(causal=causal), ATOL,
                                 f"sq{sq} sk{sk} d{d} causal={causal}")
