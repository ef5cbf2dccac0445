"""All-gather attention: every rank gathers the whole K/V (one all_gather of K
and V packed together), keeps its own queries, and runs ordinary attention; the
backward reduce-scatters dK/dV (fp32) back to their owners (one reduce-scatter)
and keeps dQ local. With GQA, K/V are Hkv/H of Q's size, so gathering them is
cheap (Llama 3's choice for long-context training).

Causal masking uses the kernels' bottom-right alignment: a query chunk whose
first global position is p0 with length n attends to the key prefix of length
p0 + n, causal — row i then sees keys j <= i + p0. Zigzag shards are two such
chunks (two kernel calls).

Dropout: each call passes the global position of its first query row (keys start
at 0 of the gathered, natural-order sequence), so it draws its rows of the
single-device mask; a zigzag shard is then always two calls, causal or not.
"""

from __future__ import annotations

import torch

from .. import _ops
from . import _comm, _dropout
from ._dropout import shard_chunks
from ._layout import reorder_gathered

__all__ = ["allgather_flash_attn_func"]

_FWD = _ops._FWD
_BWD = _ops._BWD


def _q_blocks(rank, size, s_local, causal, layout, dropout=False):
    """[(local query rows, key prefix length or None for all keys, causal)]."""
    if dropout:  # rows contiguous in global position: (rows, prefix, causal, first row)
        return [(qs, p0 + (qs.stop - qs.start) if causal else None, causal, p0)
                for p0, qs in shard_chunks(rank, size, s_local, layout)]
    if not causal:
        return [(slice(None), None, False)]
    if layout == "contiguous":
        return [(slice(None), (rank + 1) * s_local, True)]
    c = s_local // 2
    return [(slice(0, c), (rank + 1) * c, True),
            (slice(c, None), (2 * size - rank) * c, True)]


def _gather_kv(k, v, info, layout, reorder):
    """(B, S, Hkv, D) views of the full K and V (natural order when reorder)."""
    b, s_local, hkv, d = k.shape
    local = torch.cat([k, v], dim=2).transpose(0, 1).contiguous()  # (S_local, B, 2Hkv, D)
    full = torch.empty(info.size * s_local, b, 2 * hkv, d, dtype=k.dtype, device=k.device)
    _comm.all_gather(full, local, info)
    if reorder:
        full = reorder_gathered(full, info.size, layout, dim=0)
    full = full.transpose(0, 1)  # (B, S, 2Hkv, D) view
    return full[:, :, :hkv], full[:, :, hkv:]


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, scale, causal, layout, deterministic, op, drop=None):
        # Dropout indexes keys by global position: the natural order, causal or not.
        reorder = (causal or drop is not None) and layout == "zigzag"
        kf, vf = _gather_kv(k, v, info, layout, reorder)
        outs, lses = [], []
        for qs, n, blk_causal, *p0 in _q_blocks(info.rank, info.size, q.shape[1], causal, layout,
                                                drop is not None):
            ks = slice(None) if n is None else slice(0, n)
            p, *extra = (0.0, None) if drop is None else drop.op_args(p0[0], 0)
            o, lse, _ = _FWD(q[:, qs], kf[:, ks], vf[:, ks], scale, blk_causal, False, p, 0, 0,
                             False, deterministic, op, *extra)
            outs.append(o)
            lses.append(lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
        ctx.save_for_backward(q, kf, vf, out, lse)
        ctx.opts = (info, scale, causal, layout, deterministic, op, reorder, drop)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kf, vf, out, lse = ctx.saved_tensors
        info, scale, causal, layout, deterministic, op, reorder, drop = ctx.opts
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        b, s, hkv, d = kf.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.empty_like(q)
        dkv = torch.zeros(s, b, 2 * hkv, d, dtype=acc, device=q.device)  # sequence-major
        for qs, n, blk_causal, *p0 in _q_blocks(info.rank, info.size, q.shape[1], causal, layout,
                                                drop is not None):
            ks = slice(None) if n is None else slice(0, n)
            lse_rows = lse[:, :, qs].contiguous()
            p, *extra = (0.0, None) if drop is None else drop.op_args(p0[0], 0)
            dq_b, dk_b, dv_b = _BWD(dout[:, qs], q[:, qs], kf[:, ks], vf[:, ks], out[:, qs],
                                    lse_rows, scale, blk_causal, False, p, 0, 0, deterministic,
                                    op, *extra)
            dq[:, qs] = dq_b
            dkv[ks, :, :hkv] += dk_b.transpose(0, 1)
            dkv[ks, :, hkv:] += dv_b.transpose(0, 1)
        if reorder:
            dkv = reorder_gathered(dkv, info.size, layout, dim=0, inverse=True)
        mine = torch.empty(s // info.size, b, 2 * hkv, d, dtype=acc, device=q.device)
        _comm.reduce_scatter(mine, dkv, info)
        mine = mine.transpose(0, 1).to(q.dtype)
        return (dq, mine[:, :, :hkv].contiguous(), mine[:, :, hkv:].contiguous(), None, None, None,
                None, None, None, None)


@torch.compiler.disable  # eager collectives: a graph break under torch.compile
def allgather_flash_attn_func(q, k, v, group=None, causal=False, softmax_scale=None,
                              layout="zigzag", dropout_p=0.0, deterministic=False,
                              check_inputs=True):
    """All-gather-K/V attention over a sequence sharded across ``group``.

    Same arguments and shard convention as
    :func:`orchard.distributed.ring_flash_attn_func`. One all_gather of K/V
    forward, one reduce-scatter of dK/dV (fp32) backward; holds the full K/V
    (batch, seqlen, kv_heads, head_dim) on every rank, so it suits GQA/MQA.
    Returns out (batch, local_seqlen, heads, head_dim).
    """
    op = "orchard.distributed.allgather_flash_attn_func"
    info = _comm.group_info(group, op)
    drop = _dropout.for_call(dropout_p, q)
    _comm.validate(op, info, q, k, v, causal=causal, layout=layout, dropout_p=dropout_p,
                   softmax_scale=softmax_scale, check=check_inputs,
                   rng_state=None if drop is None else drop.rng_state)
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _AllGatherAttention.apply(q, k, v, info, scale, bool(causal), layout,
                                     bool(deterministic), op, drop)
