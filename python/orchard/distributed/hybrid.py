"""Hybrid context parallelism: all-to-all (Ulysses) inside a node, ring across
nodes (the "USP" / 2-D layout). Ranks form a grid: ``ulysses_group`` (e.g. the
GPUs of one node, fast links) and ``ring_group`` (one GPU per node, the slower
network). The sequence is first sharded over the ring group in ``layout``; each
ring shard is then split contiguously over the ulysses group (see
:func:`hybrid_shard_sequence`).

Forward: all-to-all inside the ulysses group (sequence sub-shards -> the whole
ring shard with H/U heads), ring attention across the ring group on those
heads, all-to-all back. Autograd composes the three pieces.

Dropout: the ring's calls pass their chunks' global positions (ring.py) and this
rank's first head in the ulysses group's split with the global head count.
"""

from __future__ import annotations

import torch

from .. import _ops
from . import _comm, _dropout
from ._layout import _check_layout, shard_sequence
from .ring import ring_attention
from .ulysses import head_to_seq, seq_to_head

__all__ = ["hybrid_flash_attn_func", "hybrid_shard_sequence", "hybrid_unshard_sequence"]


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, info, q, k, v):
        ctx.info = info
        return tuple(seq_to_head([q, k, v], info, "contiguous", False))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = [torch.zeros_like(g) if g is None else g for g in (dq, dk, dv)]
        return (None, *head_to_seq(grads, ctx.info, "contiguous", False))


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, info, out_h):
        ctx.info = info
        return head_to_seq([out_h], info, "contiguous", False)[0]

    @staticmethod
    def backward(ctx, dout):
        return None, seq_to_head([dout], ctx.info, "contiguous", False)[0]


def hybrid_shard_sequence(x, ulysses_group, ring_group, layout="zigzag", dim=1):
    """This rank's shard for :func:`hybrid_flash_attn_func`: the ring shard (in
    ``layout`` over ring_group) split contiguously over ulysses_group."""
    op = "orchard.distributed.hybrid_shard_sequence"
    _check_layout(layout, op)
    u = _comm.group_info(ulysses_group, op)
    r = _comm.group_info(ring_group, op)
    ring_shard = shard_sequence(x, layout=layout, dim=dim, world_size=r.size, rank=r.rank)
    return shard_sequence(ring_shard, layout="contiguous", dim=dim, world_size=u.size,
                          rank=u.rank)


def hybrid_unshard_sequence(x_local, ulysses_group, ring_group, layout="zigzag", dim=1):
    """Inverse of :func:`hybrid_shard_sequence` (two all_gathers); not differentiable."""
    from ._layout import unshard_sequence
    ring_shard = unshard_sequence(x_local, ulysses_group, layout="contiguous", dim=dim)
    return unshard_sequence(ring_shard, ring_group, layout=layout, dim=dim)


@torch.compiler.disable  # eager collectives: a graph break under torch.compile
def hybrid_flash_attn_func(q, k, v, ulysses_group, ring_group, causal=False, softmax_scale=None,
                           layout="zigzag", dropout_p=0.0, deterministic=False,
                           check_inputs=True):
    """Ulysses inside ``ulysses_group``, ring across ``ring_group``.

    q, k, v: this rank's shard (see :func:`hybrid_shard_sequence`), BSHD. Heads
    and kv-heads must be divisible by the ulysses group's size; the ring shard
    (local length x ulysses size) must be even for zigzag. Groups may be
    ProcessGroups or 1-D DeviceMeshes (e.g. ``mesh["ulysses"]``, ``mesh["ring"]``
    of a 2-D mesh). Returns out (batch, local_seqlen, heads, head_dim).
    """
    op = "orchard.distributed.hybrid_flash_attn_func"
    u = _comm.group_info(ulysses_group, op)
    r = _comm.group_info(ring_group, op)
    drop = _dropout.for_call(dropout_p, q)
    kw = dict(causal=causal, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale,
              rng_state=None if drop is None else drop.rng_state)
    if check_inputs:
        # Two rounds that never leave a rank behind: the ulysses group's verdict
        # travels into the ring group's check, and every ring group has a member
        # of every ulysses group (a grid), so all ranks raise together.
        verdict = _comm.gather_verdict(op, u, q, k, v, heads_divisible=True, seq_factor=u.size,
                                       **kw)
        verdict = _comm.gather_verdict(op, r, q, k, v, seq_factor=u.size, upstream=verdict, **kw)
        if verdict[0] is not None:
            raise verdict[0](verdict[1])
    else:
        _comm.validate(op, u, q, k, v, heads_divisible=True, seq_factor=u.size, check=False, **kw)
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    qh, kh, vh = _SeqToHead.apply(u, q, k, v)
    if drop is not None:  # this rank's heads [u * H/U, (u+1) * H/U) of the sequence's H
        drop = drop.with_heads(u.rank * qh.shape[2], q.shape[2])
    out_h, _lse = ring_attention(qh, kh, vh, r, scale, bool(causal), layout, bool(deterministic),
                                 op, drop)
    return _HeadToSeq.apply(u, out_h)
