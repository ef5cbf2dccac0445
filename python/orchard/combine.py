"""Merging attention computed over disjoint key sets.

If out_i, lse_i are attention over key set K_i (same queries), attention over
the union of the K_i is

    lse = log(sum_i exp(lse_i)),   out = sum_i exp(lse_i - lse) * out_i,

the building block of split-KV decoding and context-parallel (ring) attention.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _ops

__all__ = ["combine_attention"]


def combine_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor],
                      out_dtype: torch.dtype | None = None):
    """Merge partial attention results.

    Args:
        outs: tensors of one shape (batch, seqlen_q, nheads, headdim) — or any
            (..., seqlen_q, nheads, headdim) — one per key set.
        lses: their log-sum-exps, (batch, nheads, seqlen_q) (the layout every
            Orchard entry point returns), float32 or float64. A row whose
            partial saw no key has lse -inf and contributes nothing; a row that
            no partial saw outputs 0 with lse -inf (never NaN).
        out_dtype: dtype of the merged output (default: outs[0]'s).

    Returns:
        (out, lse): out like outs[0]; lse (batch, nheads, seqlen_q) in the
        LSEs' dtype. Computed in (at least) float32 and differentiable through
        both outs and lses.
    """
    op = "orchard.combine_attention"
    try:
        outs, lses = list(outs), list(lses)
    except TypeError:
        raise TypeError(f"{op}: outs and lses must be sequences of tensors, got {type(outs).__name__} and "
                        f"{type(lses).__name__}") from None
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"{op}: need as many outs as lses (at least one), got {len(outs)} and "
                         f"{len(lses)}")
    named = [pair for i, (o, l) in enumerate(zip(outs, lses)) for pair in ((f"outs[{i}]", o), (f"lses[{i}]", l))]
    for name, t in named:
        _ops.check_tensor(op, name, t)
    _ops.check_one_device(op, named)
    shape = outs[0].shape
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != shape:
            raise ValueError(f"{op}: outs[{i}] has shape {tuple(o.shape)}, expected {tuple(shape)}")
        if o.dim() < 3 or l.shape != (*shape[:-3], shape[-2], shape[-3]):
            raise ValueError(f"{op}: lses[{i}] has shape {tuple(l.shape)}, expected "
                             f"{(*shape[:-3], shape[-2], shape[-3])} (batch, nheads, seqlen_q)")
        if not l.is_floating_point():
            raise ValueError(f"{op}: lses[{i}] must be floating point, got {l.dtype}")
    acc = torch.promote_types(lses[0].dtype, torch.float32)
    lse_stack = torch.stack([l.to(acc) for l in lses])             # (n, ..., h, s)
    lse = torch.logsumexp(lse_stack, dim=0)
    # exp(lse_i - lse) with rows that nothing saw (lse = -inf) weighted 0, not NaN.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    weights = torch.where(finite, torch.exp(lse_stack - safe), torch.zeros_like(lse_stack))
    weights = weights.transpose(-1, -2).unsqueeze(-1)               # (n, ..., s, h, 1)
    out = (weights * torch.stack([o.to(acc) for o in outs])).sum(0)
    return out.to(out_dtype or outs[0].dtype), lse.to(lses[0].dtype)
