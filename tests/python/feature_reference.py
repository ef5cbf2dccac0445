"""Dense reference for every attention feature (windows, softcap, ALiBi, sinks,
attn_mask / bias, varlen, a value head dim of its own), on BSHD tensors.

upcast=True computes in float64 (the reference); upcast=False in the inputs'
dtype (the naive low-precision baseline of flash-attn's error rule). Autograd
through it gives the reference gradients."""

from __future__ import annotations

import math

import torch


def feature_attention_ref(q, k, v, *, scale=None, causal=False, top_left=False, window=(-1, -1),
                          softcap=0.0, alibi_slopes=None, sink=None, bias=None, keep_mask=None,
                          dropout_p=0.0, upcast=True):
    """q (b, sq, hq, d), k (b, sk, hkv, d), v (b, sk, hkv, dv) -> (out, lse).
    bias: bool (True = attend) or float, broadcastable to (b, hq, sq, sk)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rep = qh.shape[1] // kh.shape[1]
    if rep > 1:
        kh = kh.repeat_interleave(rep, dim=1)
        vh = vh.repeat_interleave(rep, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = s.shape[-2], s.shape[-1]
    off = 0 if top_left else sk - sq
    i = torch.arange(sq, device=s.device)[:, None]
    j = torch.arange(sk, device=s.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * (i + off - j).abs().to(s.dtype)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        visible &= j >= i + off - left
    if right >= 0:
        visible &= j <= i + off + right
    if bias is not None:
        if bias.dtype == torch.bool:
            visible = visible & bias.to(s.device)
        else:
            s = s + bias.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    if sink is not None:
        sink_col = sink.to(s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)
        s_all = torch.cat([s, sink_col], dim=-1)
    else:
        s_all = s
    lse = torch.logsumexp(s_all, dim=-1)
    p = torch.exp(s_all - lse[..., None])
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)  # rows that see nothing -> 0
    p = p[..., :sk]
    if keep_mask is not None:
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    out = (p @ vh).transpose(1, 2)
    return (out if upcast else out.to(dtype)), lse


def varlen_attention_ref(q, k, v, cu_q, cu_k, **kw):
    """Packed (total, h, d) tensors: feature_attention_ref per sequence. Returns
    (out (total_q, hq, dv), lse (hq, total_q))."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].unsqueeze(0)
        kwb = dict(kw)
        if kw.get("alibi_slopes") is not None and kw["alibi_slopes"].dim() == 2:
            kwb["alibi_slopes"] = kw["alibi_slopes"][b]
        o, l = feature_attention_ref(qb, kb, vb, **kwb)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)
