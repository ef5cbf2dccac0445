"""orchard.flash_attn_with_kvcache against the naive float64 reference of kvcache_reference.py
(in-place append, rotary both styles, paged caches, cache_batch_idx, cache_leftpad,
GQA, causal with several query rows, windows, softcap, ALiBi, LSE, split-KV), and its
bad-input errors (raised before anything is written). CPU always; CUDA cases carry
the `cuda` marker (run on a GPU)."""

from __future__ import annotations

import pytest
import torch

import orchard
from conftest import DEVICES
from kvcache_reference import ATOL, DTYPES, check, kvcache_ref, make_case

OP = "orchard.flash_attn_with_kvcache"


# ---- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("sq,causal", [(1, False), (1, True), (4, False), (4, True)])
def test_contiguous(device, dtype, hq, hkv, sq, causal):
    q, kc, vc, kw = make_case(device, dtype, sq=sq, hq=hq, hkv=hkv, d=32)
    check(q, kc, vc, kw, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page", [None, 16, 32, 256])
@pytest.mark.parametrize("s_new,sq", [(1, 1), (3, 3), (5, 2)])
def test_append(device, page, s_new, sq):
    q, kc, vc, kw = make_case(device, torch.bfloat16, sq=sq, s_new=s_new, page=page, capacity=300)
    k_before = kc.clone()
    check(q, kc, vc, kw, causal=True)
    assert not torch.equal(kc, k_before), "append wrote nothing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page", [16, 32, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged(device, page, dtype):
    q, kc, vc, kw = make_case(device, dtype, b=3, sq=2, hq=8, hkv=2, page=page, capacity=400)
    check(q, kc, vc, kw, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("page", [None, 16])
def test_rotary(device, interleaved, causal, rotary_dim, page):
    q, kc, vc, kw = make_case(device, torch.float16, sq=3, s_new=2, rotary_dim=rotary_dim, page=page)
    check(q, kc, vc, kw, causal=causal, rotary_interleaved=interleaved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s_new", [0, 2])
def test_cache_batch_idx(device, s_new):
    q, kc, vc, kw = make_case(device, torch.bfloat16, b=3, sq=2, s_new=s_new, batch_idx=True)
    check(q, kc, vc, kw, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page", [None, 32])
@pytest.mark.parametrize("rotary", [False, True])
def test_leftpad(device, page, rotary):
    q, kc, vc, kw = make_case(device, torch.bfloat16, b=3, sq=2, s_new=2, leftpad=True, page=page,
                              rotary_dim=32 if rotary else 0)
    check(q, kc, vc, kw, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,causal", [((16, 0), False), ((8, 4), False), ((20, -1), True), ((-1, 3), False)])
@pytest.mark.parametrize("page", [None, 16])
def test_window(device, window, causal, page):
    q, kc, vc, kw = make_case(device, torch.bfloat16, sq=4, s_new=1, page=page)
    check(q, kc, vc, kw, causal=causal, window_size=window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_alibi(device, per_batch, causal):
    q, kc, vc, kw = make_case(device, torch.float32, sq=3, hq=4, hkv=2)
    slopes = torch.rand((2, 4) if per_batch else (4,), device=device) * 0.2
    check(q, kc, vc, kw, causal=causal, softcap=5.0, alibi_slopes=slopes, softmax_scale=0.3)
    check(q, kc, vc, kw, causal=causal, alibi_slopes=slopes)
    check(q, kc, vc, kw, causal=causal, softcap=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 0, 50])
@pytest.mark.parametrize("page", [None, 16])
def test_splits(device, num_splits, page):
    q, kc, vc, kw = make_case(device, torch.bfloat16, b=1, sq=2, hq=8, hkv=2, capacity=700, page=page, s_new=1)
    kw_ref = {key: (val.clone() if torch.is_tensor(val) else val) for key, val in kw.items()}
    kc0, vc0 = kc.clone(), vc.clone()
    out, _ = check(q, kc, vc, kw, causal=True, num_splits=num_splits)
    if num_splits != 1:  # the split count changes nothing but rounding
        ref = orchard.flash_attn_with_kvcache(q, kc0, vc0, **kw_ref, causal=True, num_splits=1)
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_no_seqlens_and_int_seqlens(device):
    q, kc, vc, kw = make_case(device, torch.float16, seqlens=False)
    check(q, kc, vc, kw)
    q, kc, vc, kw = make_case(device, torch.float16, s_new=1)
    kw["cache_seqlens"] = 100
    kw_t = dict(kw, cache_seqlens=torch.full((2,), 100, dtype=torch.int32, device=device))
    ref_out, _, _, _ = kvcache_ref(q, kc, vc, **kw_t)
    out = orchard.flash_attn_with_kvcache(q, kc, vc, **kw)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=ATOL[q.dtype], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_cache_rows_and_masked(device):
    # cache_seqlens 0 and no append: every row sees nothing -> out 0, lse -inf.
    q, kc, vc, kw = make_case(device, torch.bfloat16)
    kw["cache_seqlens"] = torch.zeros(2, dtype=torch.int32, device=device)
    out, lse = orchard.flash_attn_with_kvcache(q, kc, vc, **kw, return_softmax_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # Causal with fewer keys than query rows: the first rows of batch 0 see nothing.
    q, kc, vc, kw = make_case(device, torch.bfloat16, sq=4)
    kw["cache_seqlens"] = torch.tensor([2, 100], dtype=torch.int32, device=device)
    check(q, kc, vc, kw, causal=True)
    check(q, kc, vc, kw, window_size=(1, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_q_and_head_dims(device):
    for d in (8, 128, 256):
        q, kc, vc, kw = make_case(device, torch.bfloat16, d=d, sq=2, s_new=1)
        check(q, kc, vc, kw, causal=True)
    # q as a permuted (BHSD storage) view and a cache view with a padded head stride
    q, kc, vc, kw = make_case(device, torch.float32, d=32, sq=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    big_k = torch.randn(kc.shape[0], kc.shape[1], kc.shape[2], 48, device=device)
    big_v = torch.randn_like(big_k)
    check(q, big_k[..., :32], big_v[..., :32], kw, causal=True)


def test_grad_is_refused():
    q, kc, vc, kw = make_case("cpu", torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only"):
        orchard.flash_attn_with_kvcache(q, kc, vc, **kw)
    with torch.no_grad():
        orchard.flash_attn_with_kvcache(q, kc, vc, **kw)


# ---- bad input: a ValueError / NotImplementedError naming the op, the cache untouched -----

def _bad_cases(device):
    def base(**kw):
        return make_case(device, torch.bfloat16, s_new=1, **kw)

    cases = []
    q, kc, vc, kw = base(page=16)
    kw["block_table"] = kw["block_table"].clone()
    kw["block_table"][1, 0] = kc.shape[0]
    cases.append(("block_table entry", q, kc, vc, kw, {}, ValueError, "block_table"))
    q, kc, vc, kw = base(page=16)
    kw["block_table"] = kw["block_table"].long()
    cases.append(("block_table dtype", q, kc, vc, kw, {}, ValueError, "block_table"))
    q, kc, vc, kw = base()
    kw["cache_seqlens"] = torch.full((2,), kc.shape[1], dtype=torch.int32, device=device)
    cases.append(("seqlens overflow", q, kc, vc, kw, {}, ValueError, "longer than the cache"))
    q, kc, vc, kw = make_case(device, torch.bfloat16, page=None)
    kc, vc = kc[:, :48].reshape(-1, 24, *kc.shape[2:]), vc[:, :48].reshape(-1, 24, *vc.shape[2:])
    kw["block_table"] = torch.zeros(2, 2, dtype=torch.int32, device=device)
    kw["cache_seqlens"] = torch.ones(2, dtype=torch.int32, device=device)
    cases.append(("page size 24", q, kc, vc, kw, {}, NotImplementedError, "page size 24"))
    q, kc, vc, kw = base()
    cases.append(("head count", q[:, :, :3], kc, vc, kw, {}, ValueError, "head count mismatch"))
    q, kc, vc, kw = base()
    cases.append(("head dim", q[..., :32], kc, vc, kw, {}, ValueError, "head dim mismatch"))
    q, kc, vc, kw = base()
    del kw["cache_seqlens"]
    cases.append(("k without seqlens", q, kc, vc, kw, {}, ValueError, "need cache_seqlens"))
    q, kc, vc, kw = base()
    cases.append(("cache dtype", q, kc.float(), vc.float(), kw, {}, ValueError, "k_cache must be bfloat16"))
    q, kc, vc, kw = base()
    kw["k"] = kw["k"].float()
    cases.append(("new k dtype", q, kc, vc, kw, {}, ValueError, "k must be bfloat16"))
    q, kc, vc, kw = base()
    kw["cache_seqlens"] = kw["cache_seqlens"].long()
    cases.append(("seqlens dtype", q, kc, vc, kw, {}, ValueError, "cache_seqlens"))
    q, kc, vc, kw = base(leftpad=True)
    kw["cache_leftpad"] = kw["cache_seqlens"] + 1
    cases.append(("leftpad", q, kc, vc, kw, {}, ValueError, "cache_leftpad"))
    q, kc, vc, kw = base(batch_idx=True)
    kw["cache_batch_idx"] = kw["cache_batch_idx"].clone()
    kw["cache_batch_idx"][0] = -1
    cases.append(("batch idx", q, kc, vc, kw, {}, ValueError, "cache_batch_idx"))
    q, kc, vc, kw = base(rotary_dim=32)
    kw["rotary_cos"] = kw["rotary_cos"][:10]
    kw["rotary_sin"] = kw["rotary_sin"][:10]
    cases.append(("rotary too short", q, kc, vc, kw, {}, ValueError, "rotary_cos"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    for what, q, kc, vc, kw, opts, exc, match in _bad_cases(device):
        k_before, v_before = kc.clone(), vc.clone()
        with pytest.raises(exc) as info:
            orchard.flash_attn_with_kvcache(q, kc, vc, **kw, **opts)
        msg = str(info.value)
        assert msg.startswith(OP + ":"), f"{what}: {msg}"
        assert match in msg, f"{what}: {msg!r} lacks {match!r}"
        assert torch.equal(kc, k_before) and torch.equal(vc, v_before), f"{what}: cache written before the error"


# ---- CUDA at decode sizes (split-KV heuristic, long caches) -----------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("page", [None, 16, 64, 256])
@pytest.mark.parametrize("hq,hkv", [(32, 4), (8, 8)])
@pytest.mark.parametrize("b", [1, 4])
def test_cuda_long_cache(page, hq, hkv, b):
    q, kc, vc, kw = make_case("cuda", torch.bfloat16, b=b, sq=1, hq=hq, hkv=hkv, d=128, capacity=4096, s_new=1,
                              page=page)
    check(q, kc, vc, kw, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 72, 128, 256])
@pytest.mark.parametrize("page", [None, 16, 48, 256])
def test_cuda_kernel_shapes(dtype, d, page):
    # The CUDA kernels' instantiations (d 64 / 128 / 256, a d that is not a multiple of 16),
    # page sizes, GQA groups of 1, 8 and 20 rows (two row chunks of 16), forced and
    # heuristic splits, with the in-kernel append and rotary.
    for num_splits, hq, hkv, sq in ((1, 20, 2, 2), (7, 8, 8, 1), (0, 32, 4, 1)):
        q, kc, vc, kw = make_case("cuda", dtype, b=2, sq=sq, hq=hq, hkv=hkv, d=d, capacity=1100, s_new=1, page=page,
                                  rotary_dim=32)
        check(q, kc, vc, kw, causal=True, num_splits=num_splits)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    q, kc, vc, kw = make_case("cuda", torch.bfloat16, b=3, sq=4, hq=16, hkv=2, d=128, capacity=1000, s_new=2,
                              page=32, rotary_dim=64, leftpad=True)
    cpu_kw = {key: val.cpu() for key, val in kw.items()}
    kc_cpu, vc_cpu = kc.cpu(), vc.cpu()
    out = orchard.flash_attn_with_kvcache(q, kc, vc, **kw, causal=True, num_splits=5)
    ref = orchard.flash_attn_with_kvcache(q.cpu(), kc_cpu, vc_cpu, **cpu_kw, causal=True, num_splits=2)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(kc.cpu().float(), kc_cpu.float(), atol=2e-2, rtol=0)


@pytest.mark.cuda
def test_cuda_graph_capture():
    q, kc, vc, kw = make_case("cuda", torch.bfloat16, b=2, sq=1, hq=16, hkv=2, d=128, capacity=2048, page=256)
    out = orchard.flash_attn_with_kvcache(q, kc, vc, **kw, causal=True)  # warm-up (checks, allocations)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = orchard.flash_attn_with_kvcache(q, kc, vc, **kw, causal=True)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_g, out)


@pytest.mark.cuda
@pytest.mark.parametrize("stable_op", [True, False], ids=["cxx_op", "dlpack"])
def test_cuda_device_index_check(monkeypatch, stable_op):
    """The core's check of device-resident index tensors (copied back, one sync): strided and
    broadcast block_tables read right, a bad entry in the used range caught, one outside it
    ignored, and CHECK_DEVICE_INDICES=False passing through to the core (the kernels then clamp)."""
    import orchard.kvcache as okv
    from orchard import _ops
    if not stable_op:
        monkeypatch.setattr(_ops, "_SKVCACHE_CALL", None)
    q, kc, vc, kw = make_case("cuda", torch.bfloat16, b=3, s_new=1, page=16, leftpad=True)
    b, cols = kw["block_table"].shape
    # a row pitch of cols + 5 (the 2-D copy) holding the same table
    padded = torch.full((b, cols + 5), -7, dtype=torch.int32, device="cuda")
    padded[:, :cols] = kw["block_table"]
    kw_pad = dict(kw, block_table=padded[:, :cols])
    check(q, kc.clone(), vc.clone(), kw_pad, causal=True)
    bad = padded.clone()
    bad[1, 0] = kc.shape[0]  # block 0 of row 1: used unless leftpad skips it
    kw_bad = dict(kw, block_table=bad[:, :cols], cache_leftpad=torch.zeros_like(kw["cache_leftpad"]))
    k_before = kc.clone()
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = %d is outside" % kc.shape[0]):
        orchard.flash_attn_with_kvcache(q, kc, vc, **kw_bad)
    assert torch.equal(kc, k_before)
    # a broadcast table (row stride 0: one copy per row; no append, which would make the rows
    # write the same cache row); a bad entry past every row's end is not read
    row_bad = kw["block_table"][0].clone()
    row_bad[-1] = -1
    seqlens = torch.full((b,), 16 * (cols - 1), dtype=torch.int32, device="cuda")
    kw_b = {"block_table": row_bad.expand(b, cols), "cache_seqlens": seqlens}
    check(q, kc.clone(), vc.clone(), kw_b, causal=True)
    with pytest.raises(ValueError, match=r"block_table\[0, %d\] = -1" % (cols - 1)):
        orchard.flash_attn_with_kvcache(q, kc, vc, **dict(kw_b, cache_seqlens=seqlens + 16))
    # the switch: the same bad cache_batch_idx raises with the check and not without it
    q, kc, vc, kw = make_case("cuda", torch.bfloat16, b=2, batch_idx=True)
    kw["cache_batch_idx"][1] = kc.shape[0]
    with pytest.raises(ValueError, match="cache_batch_idx"):
        orchard.flash_attn_with_kvcache(q, kc, vc, **kw)
    monkeypatch.setattr(okv, "CHECK_DEVICE_INDICES", False)
    out = orchard.flash_attn_with_kvcache(q, kc, vc, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()


# ---- the eager C++ op (orchard::_kvcache_fwd, _C_torch.so) and the DLPack path ------------

def _both_paths(monkeypatch, device, case_kw, opts):
    """The same call through the C++ op and through the DLPack path (the op switched off), on
    copies of one case: (out, lse, k_cache, v_cache, last_num_splits) of each."""
    import orchard.kvcache as okv
    from orchard import _ops
    q, kc, vc, kw = make_case(device, **case_kw)
    results = []
    for op in (_ops._SKVCACHE_CALL, None):
        monkeypatch.setattr(_ops, "_SKVCACHE_CALL", op)
        kc_i, vc_i = kc.clone(), vc.clone()
        okv.last_num_splits = -1
        out, lse = orchard.flash_attn_with_kvcache(q, kc_i, vc_i, **kw, **opts, return_softmax_lse=True)
        results.append((out, lse, kc_i, vc_i, okv.last_num_splits))
    return results


@pytest.mark.skipif("orchard._ops._SKVCACHE_CALL is None", reason="no _C_torch.so (stable ops)")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_kw,opts", [
    (dict(dtype=torch.bfloat16, s_new=1, page=16, rotary_dim=32), dict(causal=True)),
    (dict(dtype=torch.float32, sq=4, hq=8, hkv=2, s_new=2, leftpad=True), dict(causal=True, num_splits=3)),
    (dict(dtype=torch.float16, batch_idx=True, s_new=1), dict(window_size=(20, 0), softcap=5.0)),
])
def test_stable_op_matches_dlpack_path_bitwise(monkeypatch, device, case_kw, opts):
    (o1, l1, k1, v1, n1), (o2, l2, k2, v2, n2) = _both_paths(monkeypatch, device, case_kw, opts)
    assert n1 == n2 >= 1
    for a, b in ((o1, o2), (l1, l2), (k1, k2), (v1, v2)):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert torch.equal(a, b)


@pytest.mark.skipif("orchard._ops._SKVCACHE_CALL is None", reason="no _C_torch.so (stable ops)")
@pytest.mark.parametrize("device", DEVICES)
def test_stable_op_errors_are_the_dlpack_paths(monkeypatch, device):
    from orchard import _ops
    op = _ops._SKVCACHE_CALL
    for what, q, kc, vc, kw, opts, exc, _ in _bad_cases(device):
        messages = []
        for path in (op, None):
            monkeypatch.setattr(_ops, "_SKVCACHE_CALL", path)
            with pytest.raises(exc) as info:
                orchard.flash_attn_with_kvcache(q, kc, vc, **kw, **opts)
            messages.append(str(info.value))
        assert messages[0] == messages[1], what


@pytest.mark.skipif("orchard._ops._SKVCACHE_CALL is None", reason="no _C_torch.so (stable ops)")
def test_eager_call_takes_the_stable_op_and_modes_do_not(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from orchard import _ops
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, kc, vc, kw = make_case("cpu", torch.float32, s_new=1)
    calls = []
    real = _ops._SKVCACHE_CALL
    monkeypatch.setattr(_ops, "_SKVCACHE_CALL", lambda *a: calls.append(1) or real(*a))
    orchard.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), **kw)
    assert calls == [1]
    with Record():  # a dispatch mode: the DLPack path, as before the op existed
        orchard.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), **kw)
    assert calls == [1] and not any("_kvcache_fwd" in s for s in seen)


def test_devices_without_a_decode_kernel_are_refused_by_name():
    # MPS (no Metal decode kernel) and any other device: an op-prefixed NotImplementedError
    # before anything is read or written ("meta" stands in for a device without the kernel).
    q = torch.empty(1, 1, 2, 16, device="meta")
    cache = torch.empty(1, 32, 2, 16, device="meta")
    with torch.no_grad(), pytest.raises(NotImplementedError,
                                        match=r"^orchard.flash_attn_with_kvcache: .*CPU and CUDA backends, not on meta"):
        orchard.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=4)


# Session 40 found this on the CPU (fixed and tested there) and changed the CUDA decode kernels'
# "l > 0" tests and cross-warp merge the same way without a GPU: the cuda case has not run yet.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_nan_propagates_through_splits(device, num_splits):
    """A NaN in one query row makes that row's output and LSE NaN, never 0 / -inf, however
    the keys are split (the combine used to drop a NaN partial and zero an all-NaN row); a NaN
    in one value column of one key reaches every row that sees the key, in that column only."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 64, device=device)
    kc, vc = torch.randn(2, 512, 2, 64, device=device), torch.randn(2, 512, 2, 64, device=device)
    seqlens = torch.tensor([512, 300], dtype=torch.int32, device=device)
    q[1, 0, 3, 7] = float("nan")
    out, lse = orchard.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, num_splits=num_splits,
                                               return_softmax_lse=True)
    bad = torch.zeros(2, 4, dtype=torch.bool, device=device)
    bad[1, 3] = True
    assert torch.equal(out[:, 0].isnan().any(-1), bad) and torch.equal(lse[:, :, 0].isnan(), bad)
    q[1, 0, 3, 7] = 0.0
    vc[0, 100, 1, 5] = float("nan")  # kv head 1 serves query heads 2 and 3 of batch entry 0
    out = orchard.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, num_splits=num_splits)
    nan_cols = out.isnan().nonzero().tolist()
    assert sorted(nan_cols) == [[0, 0, 2, 5], [0, 0, 3, 5]], nan_cols
