"""Merging partial attention results with their log-sum-exps (fp32, -inf safe)."""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
               lse_blk: torch.Tensor) -> None:
    """In place: (out_acc, lse_acc) <- softmax-weighted combination of itself and a
    block result over the same query rows.

    out_* are (B, S, H, D), lse_* (B, H, S); the arithmetic is in lse_acc's dtype
    (fp32, fp64 for fp64). out_acc is normally in that dtype too; it may be in the
    inputs' dtype (bf16/fp16) when this is the row's last merge, which then rounds
    exactly once, as a final cast of an fp32 accumulator would. lse = logaddexp(lse_acc, lse_blk); each side is weighted by
    exp(lse_side - lse). A row with lse -inf on both sides (it saw no key yet)
    stays out 0, lse -inf: its weights are taken against 0 instead of -inf, which
    gives exp(-inf) = 0 rather than NaN.
    """
    new = torch.logaddexp(lse_acc, lse_blk.to(lse_acc.dtype))
    ref = new.masked_fill(new == _NEG_INF, 0.0)
    w_acc = torch.exp(lse_acc - ref).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(lse_blk.to(ref.dtype) - ref).transpose(1, 2).unsqueeze(-1)
    if out_acc.dtype == w_acc.dtype:
        # Two passes over the accumulator; addcmul_ reads out_blk in its own dtype.
        out_acc.mul_(w_acc).addcmul_(out_blk, w_blk)
    else:
        # A low-precision accumulator (the ring's last merge of a row, see ring.py):
        # the sum in the LSE dtype, rounded once on the way back.
        out_acc.copy_((out_acc * w_acc).addcmul_(out_blk, w_blk))
    lse_acc.copy_(new)


def merge_attention(outs, lses):
    """Combine attention results over disjoint key sets: outs (B, S, H, D), lses
    (B, H, S). Returns (out in outs[0]'s dtype, lse in fp32 (fp64 for fp64))."""
    acc_dtype = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    out = outs[0].to(acc_dtype).clone()
    lse = lses[0].to(acc_dtype).clone()
    for o, l in zip(outs[1:], lses[1:]):
        merge_into(out, lse, o, l)
    return out.to(outs[0].dtype), lse
