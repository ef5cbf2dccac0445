"""Randomized differential tests of orchard.flash_attn_with_kvcache (issue 12: "the randomized
differential suite covers decode"): hypothesis draws a case — dtype, batch, query rows, GQA
group, head dim, cache length, contiguous or paged (page sizes that are multiples of 16),
cache_batch_idx, cache_leftpad, appended rows, rotary (either style, any even width, q's dtype
or float32 tables), causal, windows, softcap, ALiBi (per head or per batch entry), the scale and
the split count — builds random inputs from the case's seed, and checks one call against the
float64 reference of kvcache_reference.py: the output, the LSE (its -inf pattern exactly), and
the whole cache after the in-place append (so no row outside the appended ones changes).

Counts and replay as in test_differential.py (reliability/_fuzz.py): derandomized in CI,
ORCHARD_FUZZ_RANDOM=1 / ORCHARD_FUZZ_EXAMPLES=<factor> for a bug hunt. The CUDA test draws
the same cases on the GPU (the `cuda` marker)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvcache_reference import DTYPES, check, make_case

from ._fuzz import fuzz_settings


@st.composite
def decode_cases(draw):
    """One call's arguments: (make_case keywords, call options, extras: ALiBi's form and the seed)."""
    d = draw(st.sampled_from([8, 16, 40, 64, 72, 128, 256]))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    page = draw(st.sampled_from([None, None, 16, 32, 48, 256]))
    s_new = draw(st.sampled_from([0, 0, 1, 1, 2, 5]))
    case = dict(
        dtype=draw(st.sampled_from(DTYPES)), b=draw(st.integers(1, 3)), sq=draw(st.integers(1, 6)),
        hq=hkv * group, hkv=hkv, d=d, capacity=draw(st.integers(max(1, s_new), 300)), s_new=s_new, page=page,
        # cache_batch_idx is for contiguous caches only (flash-attn's rule, refused with block_table)
        batch_idx=page is None and draw(st.booleans()),
        leftpad=draw(st.booleans()),
        # rotary needs new rows to rotate; its width is any even number up to d
        rotary_dim=2 * draw(st.integers(1, d // 2)) if s_new and draw(st.booleans()) else 0,
        # without new rows the cache may be read whole (cache_seqlens=None)
        seqlens=True if s_new else draw(st.sampled_from([True, True, False])),
    )
    if not case["seqlens"]:
        case["leftpad"] = False  # leftpad is relative to cache_seqlens
    causal = draw(st.booleans())
    wl = draw(st.sampled_from([-1, -1, 0, 3, 40]))
    wr = draw(st.sampled_from([-1, -1, 0, 2]))
    opts = dict(causal=causal, window_size=(wl, wr),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])),
                num_splits=draw(st.sampled_from([0, 0, 1, 2, 5])))
    if draw(st.booleans()):
        opts["softmax_scale"] = draw(st.sampled_from([0.05, 0.3]))
    if case["rotary_dim"]:
        opts["rotary_interleaved"] = draw(st.booleans())
        if draw(st.booleans()):
            case["rotary_dtype"] = torch.float32  # tables may be float32 whatever q's dtype
    extras = dict(alibi=draw(st.sampled_from([None, None, "head", "batch"])), seed=draw(st.integers(0, 2**31 - 1)))
    return case, opts, extras


def run_case(device, case, opts, extras):
    torch.manual_seed(extras["seed"])
    q, k_cache, v_cache, kw = make_case(device, **case)
    call = dict(opts)
    if extras["alibi"] is not None:
        shape = (case["hq"],) if extras["alibi"] == "head" else (case["b"], case["hq"])
        call["alibi_slopes"] = torch.rand(shape, device=device) * 0.3
    check(q, k_cache, v_cache, kw, **call)


@given(decode_cases())
@fuzz_settings(500)
def test_kvcache_differential(case):
    run_case("cpu", *case)


@pytest.mark.cuda
@given(decode_cases())
@fuzz_settings(300)
def test_cuda_kvcache_differential(case):
    run_case("cuda", *case)
