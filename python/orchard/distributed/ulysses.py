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
from ._layout import reorder_gathered

__all__ = ["ulysses_flash_attn_func"]

_FWD = _ops._FWD
_BWD = _ops._BWD


def seq_to_head(parts, info, layout, reorder):
    """parts: [(B, S_local, H_i, D)] sequence shards -> [(B, S, H_i / W, D)] head
    shards (views of one buffer), in natural position order when reorder. One
    all_to_all."""
    w = info.size
    b, s_local = parts[0].shape[:2]
    d = parts[0].shape[-1]
    hs = [p.shape[2] // w for p in parts]
    send = torch.cat([p.reshape(b, s_local, w, hh, d) for p, hh in zip(parts, hs)], dim=3)
    send = send.permute(2, 0, 1, 3, 4).contiguous()  # (W, B, S_local, sum(hs), D)
    recv = torch.empty_like(send)
    _comm.all_to_all(recv, send, info)  # recv[j]: rank j's positions, this rank's heads
    full = recv.permute(1, 0, 2, 3, 4).reshape(b, w * s_local, sum(hs), d)
    if reorder:
        full = reorder_gathered(full, w, layout, dim=1)
    return list(full.split(hs, dim=2))


def head_to_seq(parts, info, layout, reorder):
    """Inverse of :func:`seq_to_head`: [(B, S, H_i / W, D)] -> [(B, S_local, H_i, D)]."""
    w = info.size
    b, s = parts[0].shape[:2]
    d = parts[0].shape[-1]
    s_local = s // w
    hs = [p.shape[2] for p in parts]
    full = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    if reorder:
        full = reorder_gathered(full, w, layout, dim=1, inverse=True)
    send = full.reshape(b, w, s_local, sum(hs), d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    _comm.all_to_all(recv, send, info)  # recv[j]: this rank's positions, rank j's heads
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
