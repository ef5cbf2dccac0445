"""Ulysses (DeepSpeed-Ulysses style) attention: one all-to-all turns sequence
shards with all heads into the whole sequence with 1/W of the heads; each rank
runs ordinary attention on its heads; a second all-to-all turns the output back
into sequence shards. The backward does the same with dO and (dQ, dK, dV).

Each direction is ONE all_to_all_single: q, k and v are packed along the head
dim (so GQA's smaller K/V travel with Q). Heads and kv-heads must both be
divisible by the group size. Rank r gets query heads [r*H/W, (r+1)*H/W) and
kv-heads [r*Hkv/W, (r+1)*Hkv/W), which keeps every query head with its kv-head.

Dropout: each rank's call passes its first head's global index and the global
head count (and the whole sequence, in natural order also for a non-causal
zigzag layout), so it draws its heads' part of the single-device mask.
"""

from __future__ import annotations

import torch

from .. import _ops
from . import _comm, _dropout
from ._layout import zigzag_chunk_order

__all__ = ["ulysses_flash_attn_func"]

_FWD = _ops._FWD
_BWD = _ops._BWD


def _slots(w, s_local, layout, reorder):
    """[(rank, local rows, natural rows)] of the whole sequence: which rows of which
    rank's shard hold which rows of the sequence in natural order (with reorder), or
    in rank-major order (without: the shards concatenated)."""
    if not reorder:
        return [(r, slice(0, s_local), slice(r * s_local, (r + 1) * s_local)) for r in range(w)]
    c = s_local // 2
    return [(slot // 2, slice((slot % 2) * c, (slot % 2 + 1) * c), slice(ch * c, (ch + 1) * c))
            for slot, ch in enumerate(zigzag_chunk_order(w))]


def seq_to_head(parts, info, layout, reorder):
    """parts: [(B, S_local, H_i, D)] sequence shards -> [(B, S, H_i / W, D)] head
    shards (views of one buffer), in natural position order when reorder. One
    all_to_all. Each buffer is written by one copy per part (or per chunk) and the
    send buffer is freed before the result is assembled (peak: two buffers)."""
    w = info.size
    b, s_local = parts[0].shape[:2]
    d = parts[0].shape[-1]
    hs = [p.shape[2] // w for p in parts]
    send = torch.empty(w, b, s_local, sum(hs), d, dtype=parts[0].dtype, device=parts[0].device)
    lo = 0
    for p, hh in zip(parts, hs):  # send[j]: this rank's positions, rank j's heads
        send[..., lo:lo + hh, :].copy_(p.reshape(b, s_local, w, hh, d).permute(2, 0, 1, 3, 4))
        lo += hh
    recv = torch.empty_like(send)
    _comm.all_to_all(recv, send, info)  # recv[j]: rank j's positions, this rank's heads
    del send
    full = torch.empty(b, w * s_local, sum(hs), d, dtype=recv.dtype, device=recv.device)
    for r, local, natural in _slots(w, s_local, layout, reorder):
        full[:, natural].copy_(recv[r, :, local])
    del recv
    return list(full.split(hs, dim=2))


def head_to_seq(parts, info, layout, reorder):
    """Inverse of :func:`seq_to_head`: [(B, S, H_i / W, D)] -> [(B, S_local, H_i, D)].
    The send buffer is written straight from the parts (no concatenated or reordered
    copy of them)."""
    w = info.size
    b, s = parts[0].shape[:2]
    d = parts[0].shape[-1]
    s_local = s // w
    hs = [p.shape[2] for p in parts]
    send = torch.empty(w, b, s_local, sum(hs), d, dtype=parts[0].dtype, device=parts[0].device)
    lo = 0
    for p, hh in zip(parts, hs):
        for r, local, natural in _slots(w, s_local, layout, reorder):
            send[r, :, local, lo:lo + hh].copy_(p[:, natural])
        lo += hh
    recv = torch.empty_like(send)
    _comm.all_to_all(recv, send, info)  # recv[j]: this rank's positions, rank j's heads
    del send
    back = recv.permute(1, 2, 0, 3, 4)  # (B, S_local, W, sum(hs), D)
    outs, lo = [], 0
    for hh in hs:
        outs.append(back[:, :, :, lo:lo + hh].reshape(b, s_local, w * hh, d))
        lo += hh
    return outs


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, scale, causal, layout, deterministic, op, drop=None):
        # Non-causal attention does not care about position order: skip the reorder
        # (dropout does: its mask is indexed by global position).
        reorder = (causal or drop is not None) and layout == "zigzag"
        qh, kh, vh = seq_to_head([q, k, v], info, layout, reorder)
        if drop is None:
            extra = (0.0, None)
        else:  # this rank's heads [r * H/W, (r+1) * H/W) of the H the sequence has
            drop = drop.with_heads(info.rank * qh.shape[2], q.shape[2])
            extra = drop.op_args(0, 0)
        out_h, lse_h, _ = _FWD(qh, kh, vh, scale, causal, True, extra[0], 0, 0, False,
                               deterministic, op, *extra[1:])
        (out,) = head_to_seq([out_h], info, layout, reorder)
        ctx.save_for_backward(qh, kh, vh, out_h, lse_h)
        ctx.opts = (info, scale, causal, layout, deterministic, op, reorder, extra)
        return out

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out_h, lse_h = ctx.saved_tensors
        info, scale, causal, layout, deterministic, op, reorder, extra = ctx.opts
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        (dout_h,) = seq_to_head([dout], info, layout, reorder)
        dq_h, dk_h, dv_h = _BWD(dout_h, qh, kh, vh, out_h, lse_h, scale, causal, True, extra[0], 0,
                                0, deterministic, op, *extra[1:])
        del dout_h  # before the output exchange's buffers (the peak of the backward)
        dq, dk, dv = head_to_seq([dq_h, dk_h, dv_h], info, layout, reorder)
        return dq, dk, dv, None, None, None, None, None, None, None


@torch.compiler.disable  # eager collectives: a graph break under torch.compile
def ulysses_flash_attn_func(q, k, v, group=None, causal=False, softmax_scale=None,
                            layout="zigzag", dropout_p=0.0, deterministic=False,
                            check_inputs=True):
    """All-to-all (Ulysses) attention over a sequence sharded across ``group``.

    Same arguments and shard convention as
    :func:`orchard.distributed.ring_flash_attn_func` (BSHD shards in ``layout``);
    additionally heads and kv-heads must be divisible by the group size. Two
    all_to_all_single per direction; communication volume per rank does not
    grow with the group size, but the parallelism is capped by the kv-heads.
    Returns out (batch, local_seqlen, heads, head_dim).
    """
    op = "orchard.distributed.ulysses_flash_attn_func"
    info = _comm.group_info(group, op)
    drop = _dropout.for_call(dropout_p, q)
    _comm.validate(op, info, q, k, v, causal=causal, layout=layout, dropout_p=dropout_p,
                   softmax_scale=softmax_scale, heads_divisible=True, check=check_inputs,
                   rng_state=None if drop is None else drop.rng_state)
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _UlyssesAttention.apply(q, k, v, info, scale, bool(causal), layout, bool(deterministic),
                                   op, drop)
