"""The naive float64 reference of orchard.flash_attn_with_kvcache (in-place append, rotary both
styles, paged caches, cache_batch_idx, cache_leftpad, GQA, causal with several query rows,
windows, softcap, ALiBi, LSE), a builder of random cases and the check of one call against the
reference: shared by test_kvcache.py (fixed cases) and reliability/test_differential_decode.py
(randomized draws)."""

from __future__ import annotations

import math

import torch

import orchard

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-4}


# ---- reference ---------------------------------------------------------------------------

def rotate_ref(x, cos, sin, pos, interleaved):
    """Rotary of x (..., d) float64 at integer position pos, on the first rotary_dim dims."""
    half = cos.shape[1]
    c, s = cos[pos].double(), sin[pos].double()
    x = x.clone()
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2] = x0 * c - x1 * s
        x[..., 1:2 * half:2] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:2 * half] = x0 * s + x1 * c
    return x


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0):
    """Returns (out float64, lse float64, k_cache after append, v_cache after append), on the CPU."""
    q, k_cache, v_cache = q.cpu(), k_cache.cpu().clone(), v_cache.cpu().clone()
    k = None if k is None else k.cpu()
    v = None if v is None else v.cpu()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    rotary_cos, rotary_sin, cache_seqlens = cpu(rotary_cos), cpu(rotary_sin), cpu(cache_seqlens)
    cache_batch_idx, cache_leftpad, block_table, alibi_slopes = (
        cpu(cache_batch_idx), cpu(cache_leftpad), cpu(block_table), cpu(alibi_slopes))
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    groups = hq // hkv
    page = k_cache.shape[1]
    paged = block_table is not None
    cap = block_table.shape[1] * page if paged else k_cache.shape[1]
    s_new = 0 if k is None else k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    # Windows are literal; a bound no row can reach (>= cap + sq) is none, which decides whether
    # q's rotary is per row (src/core/kvcache.cpp: flash-attn's kernels drop bounds >= cap).
    wl, wr = window_size
    wl = -1 if wl >= cap + sq else wl
    wr = -1 if wr >= cap + sq else wr
    if causal:
        wr = 0
    per_row_rotary = wl >= 0 or wr >= 0

    def loc(bi, row):
        if paged:
            return int(block_table[bi, row // page]), row % page
        return (int(cache_batch_idx[bi]) if cache_batch_idx is not None else bi), row

    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float64)
    for bi in range(b):  # the append first (every batch entry), as the kernels do
        seqlen = int(cache_seqlens[bi]) if cache_seqlens is not None else cap
        for t in range(s_new):
            blk, r = loc(bi, seqlen + t)
            kt = k[bi, t]
            if rotary_cos is not None:
                kt = rotate_ref(kt.double(), rotary_cos, rotary_sin, seqlen + t, rotary_interleaved).to(k.dtype)
            k_cache[blk, r] = kt
            v_cache[blk, r] = v[bi, t]
    for bi in range(b):
        seqlen = int(cache_seqlens[bi]) if cache_seqlens is not None else cap
        lp = int(cache_leftpad[bi]) if cache_leftpad is not None else 0
        n = seqlen + s_new - lp

        def rows(cache):  # the sequence's n keys (or values) in order, float64 (n may be 0)
            if not n:
                return torch.zeros(0, hkv, d, dtype=torch.float64)
            return torch.stack([cache[loc(bi, lp + j)] for j in range(n)]).double()
        keys, vals = rows(k_cache), rows(v_cache)
        qb = q[bi].double()
        if rotary_cos is not None:
            qb = torch.stack([rotate_ref(qb[i], rotary_cos, rotary_sin, seqlen + (i if per_row_rotary else 0),
                                         rotary_interleaved) for i in range(sq)]).to(q.dtype).double()
        i = torch.arange(sq)[:, None]
        j = torch.arange(n)[None, :]
        diag = n - sq
        visible = torch.ones(sq, n, dtype=torch.bool)
        if wr >= 0:
            visible &= j <= i + diag + wr
        if wl >= 0:
            visible &= j >= i + diag - wl
        for h in range(hq):
            kh = h // groups
            s = (qb[:, h] @ keys[:, kh].T) * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            if alibi_slopes is not None:
                slope = float(alibi_slopes[h] if alibi_slopes.dim() == 1 else alibi_slopes[bi, h])
                s = s - slope * (i + diag - j).abs().double()
            s = s.masked_fill(~visible, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - row_lse[:, None])
            p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
            out[bi, :, h] = p @ vals[:, kh]
            lse[bi, h] = row_lse
    return out, lse, k_cache, v_cache


# ---- case builder ------------------------------------------------------------------------

def make_case(device, dtype=torch.bfloat16, b=2, sq=1, hq=4, hkv=2, d=64, capacity=160, s_new=0, page=None,
              batch_idx=False, leftpad=False, rotary_dim=0, seqlens=True, full=False, rotary_dtype=None):
    """Random inputs; capacity is rounded up to whole pages when paged. The rotary tables are in
    rotary_dtype (float32 is allowed whatever q's dtype), default q's."""
    g = dict(device=device)
    kw = {}
    if page is not None:
        per_seq = -(-capacity // page)
        num_blocks = b * per_seq + 3  # spare pages, scattered
        k_cache = torch.randn(num_blocks, page, hkv, d, **g).to(dtype)
        v_cache = torch.randn(num_blocks, page, hkv, d, **g).to(dtype)
        kw["block_table"] = torch.randperm(num_blocks, device=device)[:b * per_seq].view(b, per_seq).to(torch.int32)
        capacity = per_seq * page
    else:
        cb = b + 2 if batch_idx else b
        k_cache = torch.randn(cb, capacity, hkv, d, **g).to(dtype)
        v_cache = torch.randn(cb, capacity, hkv, d, **g).to(dtype)
        if batch_idx:
            kw["cache_batch_idx"] = torch.randperm(cb, device=device)[:b].to(torch.int32)
    q = torch.randn(b, sq, hq, d, **g).to(dtype)
    if seqlens:
        hi = capacity - s_new
        sl = torch.full((b,), hi) if full else torch.randint(max(0, hi // 2), hi + 1, (b,))
        sl[0] = hi  # one entry fills the cache exactly
        kw["cache_seqlens"] = sl.to(device=device, dtype=torch.int32)
        if leftpad:
            kw["cache_leftpad"] = torch.stack([torch.randint(0, int(x) + 1, ()) for x in sl]).to(
                device=device, dtype=torch.int32)
    if s_new:
        kw["k"] = torch.randn(b, s_new, hkv, d, **g).to(dtype)
        kw["v"] = torch.randn(b, s_new, hkv, d, **g).to(dtype)
    if rotary_dim:
        angle = torch.rand(capacity + 8, rotary_dim // 2, device=device) * 2 * math.pi  # q rows may pass the cache
        kw["rotary_cos"] = torch.cos(angle).to(rotary_dtype or dtype)
        kw["rotary_sin"] = torch.sin(angle).to(rotary_dtype or dtype)
    return q, k_cache, v_cache, kw


def check(q, k_cache, v_cache, kw, **opts):
    ref_out, ref_lse, ref_k, ref_v = kvcache_ref(q, k_cache, v_cache, **kw, **opts)
    out, lse = orchard.flash_attn_with_kvcache(q, k_cache, v_cache, **kw, **opts, return_softmax_lse=True)
    atol = ATOL[q.dtype]
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=atol, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), "LSE -inf pattern (fully masked rows)"
    torch.testing.assert_close(lse.cpu().double()[fin], ref_lse[fin], atol=1e-3 if q.dtype != torch.float32 else 1e-4,
                               rtol=1e-3)
    if "k" in kw:  # the in-place append (rotary rounds once, so allow one ulp)
        tol = 0 if "rotary_cos" not in kw else torch.finfo(q.dtype).eps * 8
        torch.testing.assert_close(k_cache.cpu().double(), ref_k.double(), atol=tol, rtol=tol)
        assert torch.equal(v_cache.cpu(), ref_v)
    return out, lse
