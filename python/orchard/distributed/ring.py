"""Ring attention: K/V shards rotate around the group while each rank keeps its
queries; partial results merge through their LSE (fp32).

Forward, on each rank r of W: step s = 0..W-1 holds the K/V shard of rank
(r - s) mod W. Before the step's kernels run, the exchange for step s+1 is
posted (batch_isend_irecv on a side stream on CUDA), so the transfer overlaps
the kernels: W-1 K/V exchanges in all.

Backward: a second ring. K/V rotate again (W-1 exchanges) and a dK/dV
accumulator travels with them: each rank adds its block's dK/dV to the
accumulator it received and passes it on; the owner keeps its own block, so
after W-1 exchanges every accumulator is back at its owner (sums in fp32; see
ring_backward). dQ stays local, in one fp32 accumulator every backward call adds
into (_dq_accum.py). With W = 2 the backward reuses the K/V the forward's last
step held (no K/V exchange) and runs its own diagonal block last, under the
one dK/dV exchange. Every block's backward is called with the
GLOBAL out and LSE of its rows (the merged forward results), so its
probabilities exp(s - lse) are the final ones and the block gradients just add.

Causal masking per (query shard, key shard) pair:
* contiguous: own shard -> causal kernel (the diagonal block); an earlier
  rank's shard -> full kernel; a later rank's -> skipped. Rank W-1 does W
  blocks, rank 0 one: unbalanced.
* zigzag (rank r holds chunks r and 2W-1-r): own shard -> causal kernel over
  the whole local shard (its two chunks are in increasing position order, so
  the local causal mask is exactly the global one); an earlier rank's shard ->
  all local queries against that shard's first chunk; a later rank's shard ->
  the local second chunk against the whole shard. Every step then costs every
  rank the same (half a shard x shard block), which balances causal work.

Dropout (_dropout.py): every call must cover query rows and keys contiguous in
global position, so the blocks are the pairs of chunks (a zigzag shard's two
chunks apart): each call passes its chunks' global first row and first key, and
draws its block of the single-device mask. Causal: a chunk pair is the diagonal
(causal kernel), wholly visible, or skipped. The same work, in more calls.
"""

from __future__ import annotations

import os

import torch

from .. import _ops
from . import _comm, _dq_accum, _dropout
from ._dropout import shard_chunks
from ._merge import merge_into

__all__ = ["ring_flash_attn_func"]

_FWD = _ops._FWD
_BWD = _ops._BWD
_ALL = slice(None)


def _blocks(rank, src, size, s_local, causal, layout):
    """[(query rows, key rows, causal)] for the (rank's queries, src's keys) pair."""
    if not causal:
        return [(_ALL, _ALL, False)]
    if src == rank:
        return [(_ALL, _ALL, True)]
    if layout == "contiguous":
        return [(_ALL, _ALL, False)] if src < rank else []
    c = s_local // 2
    if src < rank:
        return [(_ALL, slice(0, c), False)]
    return [(slice(c, None), _ALL, False)]


def _dropout_blocks(rank, src, size, s_local, causal, layout):
    """[(query rows, key rows, causal, global first row, global first key)] for the
    (rank's queries, src's keys) pair with dropout: chunk pairs, each contiguous in
    global position (chunks of one layout have one length, so a pair is the
    diagonal block, wholly visible, or wholly hidden)."""
    blocks = []
    for q0, qs in shard_chunks(rank, size, s_local, layout):
        for k0, ks in shard_chunks(src, size, s_local, layout):
            if causal and k0 > q0:
                continue
            blocks.append((qs, ks, causal and k0 == q0, q0, k0))
    return blocks


def _step_blocks(rank, src, size, s_local, causal, layout, drop):
    """[(query rows, key rows, causal, extra op args)] of one ring step: the extra
    args are the dropout ones (probability, key, coordinates), or the ops' defaults."""
    if drop is None:
        return [(qs, ks, c, (0.0, None)) for qs, ks, c in _blocks(rank, src, size, s_local, causal,
                                                                  layout)]
    return [(qs, ks, c, drop.op_args(q0, k0))
            for qs, ks, c, q0, k0 in _dropout_blocks(rank, src, size, s_local, causal, layout)]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _low_precision_ok(size, drop):
    """True when every row of out / dQ is merged or summed at most once after the
    first block (W <= 2 without dropout): the accumulator may then stay in the
    inputs' dtype, since the single merge computes in fp32 and rounds once, exactly
    as a final cast of an fp32 accumulator would. This saves the fp32 buffer and
    two of its passes over (B, S, H, D) per phase."""
    return size <= 2 and drop is None


def _keep_kv(size):
    """True when the forward hands its last K/V to the backward (W = 2, see
    ring_backward; ORCHARD_CP_KEEP_KV=0 turns it off, and must then be set on every
    rank: it decides whether the backward exchanges K/V). Costs the K/V of one shard
    held from the forward to the backward."""
    return size == 2 and os.environ.get("ORCHARD_CP_KEEP_KV", "1") != "0"


def ring_forward(q, k, v, info, scale, causal, layout, deterministic, op, drop=None,
                 keep=None):
    """(out in q's dtype, lse (B, H, S_local) in the accumulation dtype). drop: a
    _dropout.Dropout or None. keep: a list that receives the K/V buffers of the last
    step (src = rank + 1), for the backward (_keep_kv).

    Per step: one kernel call without dropout (see _blocks), then one in-place LSE
    merge into the rows it covered. The first block's result becomes the
    accumulator itself (no zero fill, no copy), in fp32 only where later merges
    need it (_low_precision_ok)."""
    size, rank = info.size, info.rank
    b, s, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    low_ok = _low_precision_ok(size, drop)
    out_acc = lse_acc = None
    kv = [k.contiguous(), v.contiguous()]
    ring = _comm.RingExchange(info, "kv")
    for step in range(size):
        pending = ring.start(kv) if step + 1 < size else None
        src = (rank - step) % size
        for qs, ks, blk_causal, (p, rng, *feats) in _step_blocks(rank, src, size, s, causal, layout,
                                                                  drop):
            _comm.count_kernel("fwd")
            o, lse, _ = _FWD(q[:, qs], kv[0][:, ks], kv[1][:, ks], scale, blk_causal, True, p, 0,
                             0, False, deterministic, op, rng, *feats)
            if out_acc is None and qs == _ALL:
                out_acc = o if low_ok else o.to(acc)
                lse_acc = lse.to(acc)
                continue
            if out_acc is None:  # dropout: the first block covers one chunk only
                out_acc = torch.zeros(b, s, h, d, dtype=acc, device=q.device)
                lse_acc = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
            merge_into(out_acc[:, qs], lse_acc[:, :, qs], o, lse)
        if pending is not None:
            kv = pending.wait()
    if keep is not None and size > 1:
        keep.extend(kv)
    return out_acc.to(q.dtype), lse_acc


def _accumulate(total, rows, grad, shape, dtype, own):
    """total[:, rows] += grad, allocating total on first use; the first grad over
    all rows becomes the total itself (in ``dtype`` unless ``own`` says the grad's
    dtype may stay)."""
    if total is None:
        if rows == _ALL:
            return grad if own else grad.to(dtype)
        total = torch.zeros(shape, dtype=dtype, device=grad.device)
    elif total.dtype != dtype and not own:
        total = total.to(dtype)
    total[:, rows] += grad
    return total


def _sum_grads(total, grads, shape, acc):
    """Adds [(key rows, grad)] to total (None: nothing yet). One contribution over
    all rows stays as the kernel produced it (exact: it can travel in the inputs'
    dtype); a sum of two or more is in ``acc`` (fp32)."""
    for rows, grad in grads:
        total = _accumulate(total, rows, grad, shape, acc, own=total is None)
    return total


def _row_starts(rank, size, s_local, causal, layout, drop):
    """First local query row of every block any step of this rank runs."""
    starts = set()
    for step in range(size):
        src = (rank - step) % size
        for qs, *_ in _step_blocks(rank, src, size, s_local, causal, layout, drop):
            starts.add(qs.start or 0)
    return starts


def ring_backward(dout, q, k, v, out, lse, info, scale, causal, layout, deterministic, op,
                  drop=None, kv_kept=None):
    """Per step: one backward kernel call without dropout (the same blocks as the
    forward).

    dQ: where _dq_accum.usable says so (16-/32-bit on the CPU, 16-bit on CUDA, not
    deterministic, blocks starting on 16-row tiles), every call adds into one fp32
    accumulator the rank zeroed once (no per-call fp32 workspace, no dQ partials),
    converted to dQ after the ring; else the partials add up locally (in q's dtype
    for W <= 2 without dropout: one sum of two partials, rounded once; else fp32).

    dK/dV: the rank's own block (step 0) stays here; the accumulator of src's
    dK/dV starts at the rank after src (step 1), gets each rank's block added and
    moves on with the ring, reaching src after W-1 exchanges, where the own block
    is added: W-1 dK/dV exchanges, each overlapping the next step's kernel but the
    last. Sums of two or more blocks are fp32; a single block travels in the
    inputs' dtype, which is exact, so the result is the fp32 accumulation's. The
    last exchange receives into the K/V buffers of the last step when they fit
    (nothing reads them after its kernels), and nothing the caller does not hold
    is alive when dQ is converted (the peak memory decides the longest sequence).

    kv_kept (W = 2): the other rank's K/V as the forward's last step held them. Then
    the backward exchanges no K/V and runs the other rank's block first and its own
    diagonal block last, so the one dK/dV exchange travels while the own block's
    kernel runs (in the other order it is the last thing, exposed: ~1 ms at 16k
    tokens/GPU on 2 x H200); the returning dK/dV land in the kept buffers."""
    size, rank = info.size, info.rank
    b, s, h, d = q.shape
    acc = _acc_dtype(q.dtype)
    low_ok = _low_precision_ok(size, drop)
    dq = None
    dq_acc = None
    if _dq_accum.usable(q, deterministic, _row_starts(rank, size, s, causal, layout, drop)):
        dq_acc = _dq_accum.zeros(q)
    own = [None, None]
    kv = [k.contiguous(), v.contiguous()]
    kv_ring = _comm.RingExchange(info, "kv")
    dkv_ring = _comm.RingExchange(info, "dkv")
    dkv_pending = None
    reordered = kv_kept is not None
    if reordered:  # take the buffers out of the caller's list: no reference outlives their use
        kv_kept, kept_list = list(kv_kept), kv_kept
        kept_list.clear()
    order = [1, 0] if reordered else list(range(size))
    for i, step in enumerate(order):
        if reordered:  # W = 2: the other rank's K/V first, no exchange
            kv_pending = None
            kv = list(kv_kept) if step == 1 else [k.contiguous(), v.contiguous()]
            kv_kept = None
            spent = step == 1  # its K/V are read by no later step
        else:
            spent = i + 1 == size
            kv_pending = kv_ring.start(kv) if not spent else None
        src = (rank - step) % size
        blocks = _step_blocks(rank, src, size, s, causal, layout, drop)
        # src's accumulator travels in a dtype both ends know: after step 1 it holds
        # one kernel call's block (no dropout), exact in the inputs' dtype; later, or
        # with dropout, sums in fp32.
        hop = k.dtype if step == 1 and drop is None else acc
        grads = []
        for qs, ks, blk_causal, (p, rng, *feats) in blocks:
            lse_rows = lse if qs == _ALL else lse[:, :, qs].contiguous()
            _comm.count_kernel("bwd")
            if dq_acc is not None:
                # The one block of a step over a part of the keys writes its dK/dV
                # straight into the zeroed buffer that travels (no copy, no temporary).
                into = None
                if step == 1 and len(blocks) == 1 and ks != _ALL and hop == k.dtype:
                    into = [torch.zeros(k.shape, dtype=hop, device=k.device),
                            torch.zeros(v.shape, dtype=hop, device=v.device)]
                dk_b, dv_b = _dq_accum.backward_into(
                    _dq_accum.rows_view(dq_acc, qs), dout[:, qs], q[:, qs], kv[0][:, ks],
                    kv[1][:, ks], out[:, qs], lse_rows, scale, blk_causal, p, rng, feats,
                    deterministic, op, *(() if into is None else (into[0][:, ks], into[1][:, ks])))
                if into is not None:
                    dk_b, dv_b, ks = into[0], into[1], _ALL
            else:
                dq_b, dk_b, dv_b = _BWD(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks],
                                        out[:, qs], lse_rows, scale, blk_causal, True, p, 0, 0,
                                        deterministic, op, rng, *feats)
                dq = _accumulate(dq, qs, dq_b, q.shape, acc, low_ok or dq_b.dtype == acc)
                dq_b = None
            grads.append((ks, dk_b, dv_b))
            dk_b = dv_b = None
        if step == 0:
            own = [_sum_grads(None, [(ks, g[0]) for ks, *g in grads], k.shape, acc),
                   _sum_grads(None, [(ks, g[1]) for ks, *g in grads], v.shape, acc)]
        else:
            # src's accumulator: fresh at step 1, else from the previous rank (its
            # exchange overlapped this step's kernel).
            dkv = [None, None] if dkv_pending is None else dkv_pending.wait()
            dkv = [_sum_grads(dkv[0], [(ks, g[0]) for ks, *g in grads], k.shape, hop),
                   _sum_grads(dkv[1], [(ks, g[1]) for ks, *g in grads], v.shape, hop)]
            if dkv[0] is None:  # no block of src's keys here (contiguous causal)
                dkv = [torch.zeros(k.shape, dtype=hop, device=k.device),
                       torch.zeros(v.shape, dtype=hop, device=v.device)]
            send = [t.to(hop) for t in dkv]
            dkv = None
            # This step's K/V are read by nothing after its kernels (queued before
            # this exchange on the compute stream, which the exchange waits for):
            # receive the returning dK/dV there when shapes and dtypes match.
            recv = kv if spent and all(r.shape == t.shape and r.dtype == t.dtype
                                       for r, t in zip(kv, send)) else None
            dkv_pending = dkv_ring.start(send, recv)
            send = recv = None
        grads = None
        if kv_pending is not None:
            kv = kv_pending.wait()
    kv = None
    dk, dv = own
    own = None
    if dkv_pending is not None:  # this rank's accumulator, back from the other W-1
        rk, rv = dkv_pending.wait()
        dkv_pending = None
        if dk.dtype == rk.dtype:  # W = 2: one rounding of the exact sum, in place
            dk, dv = dk.add_(rk), dv.add_(rv)
        else:
            dk, dv = dk.to(acc).add_(rk), dv.to(acc).add_(rv)
        rk = rv = None
    if dq_acc is not None:
        dq = _dq_accum.to_dq(dq_acc, s, d, scale, q.dtype)
        dq_acc = None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, scale, causal, layout, deterministic, op, drop=None):
        keep = [] if _keep_kv(info.size) else None
        out, lse = ring_forward(q, k, v, info, scale, causal, layout, deterministic, op, drop,
                                keep)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = (info, scale, causal, layout, deterministic, op, drop)
        # Internal buffers, not saved tensors: the first backward takes them (and
        # receives into them); a second one (retain_graph) exchanges K/V again.
        ctx.kv_kept = keep or None
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        info, scale, causal, layout, deterministic, op, drop = ctx.opts
        if dout is None:
            dout = torch.zeros_like(out)
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        kv_kept, ctx.kv_kept = ctx.kv_kept, None
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, info, scale, causal, layout,
                                   deterministic, op, drop, kv_kept)
        return dq, dk, dv, None, None, None, None, None, None, None


def ring_attention(q, k, v, info, scale, causal, layout, deterministic, op, drop=None):
    """No validation: (out, lse) through autograd, for the hybrid mode."""
    return _RingAttention.apply(q, k, v, info, scale, causal, layout, deterministic, op, drop)


@torch.compiler.disable  # eager collectives: a graph break under torch.compile
def ring_flash_attn_func(q, k, v, group=None, causal=False, softmax_scale=None,
                         layout="zigzag", dropout_p=0.0, deterministic=False, return_lse=False,
                         check_inputs=True):
    """Ring attention over a sequence sharded across ``group``.

    Args:
        q: (batch, local_seqlen, heads, head_dim): this rank's query shard, in
           ``layout`` (see :func:`orchard.distributed.shard_sequence`).
        k, v: (batch, local_seqlen, kv_heads, head_dim), the same positions;
           heads % kv_heads == 0 (GQA/MQA).
        group: a ProcessGroup, a 1-D DeviceMesh, or None (the default group).
        causal: causal mask over GLOBAL positions.
        softmax_scale: defaults to 1/sqrt(head_dim).
        layout: "zigzag" (head-tail, torch context parallelism's layout;
           balances causal work; local length must be even) or "contiguous".
        dropout_p: dropout on the attention probabilities, with exactly the
           single-device mask: every rank draws the key from torch's generator as
           ``orchard.flash_attn_func`` does, so the same generator state on every
           rank (``torch.manual_seed``) gives the single-device result with that
           state (the input check raises if the ranks' keys differ).
        deterministic: bitwise-reproducible backward kernels.
        return_lse: also return the LSE (batch, heads, local_seqlen), fp32.
        check_inputs: one small all_gather before the ring checks that all ranks
           agree (shapes, dtype, options) so bad input raises everywhere instead
           of hanging; False skips it (local checks still run).

    Returns out (batch, local_seqlen, heads, head_dim) like q, or (out, lse).
    """
    op = "orchard.distributed.ring_flash_attn_func"
    info = _comm.group_info(group, op)
    drop = _dropout.for_call(dropout_p, q)
    _comm.validate(op, info, q, k, v, causal=causal, layout=layout, dropout_p=dropout_p,
                   softmax_scale=softmax_scale, check=check_inputs,
                   rng_state=None if drop is None else drop.rng_state)
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = _RingAttention.apply(q, k, v, info, scale, bool(causal), layout,
                                    bool(deterministic), op, drop)
    return (out, lse) if return_lse else out
