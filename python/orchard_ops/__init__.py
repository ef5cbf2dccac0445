"""Compatibility module for code written against the seed's ``orchard_ops``.

``flash_attn_fwd(q, k, v, scale, dropout_p, causal) -> (out, mask)`` is now
differentiable: it runs through the same ``torch.ops.orchard`` custom ops as
:mod:`orchard`, so ``out.sum().backward()`` gives dq, dk, dv.

Environment variables: ``ORCHARD_DEBUG_FLASH_ATN=1`` (per-call log) and
``ORCHARD_TENSOR_PROFILE=1`` (per-tensor zero-copy / staging log).
"""

from __future__ import annotations

from typing import Optional

import torch

from orchard import _ops

__all__ = ["flash_attn_fwd"]


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
):
    """Attention over (B, S, D) (one head) or (B, H, S, D) tensors.

    Args:
        q, k, v: same rank; (B, S, D) or (B, H, S, D), any strides. k/v may
            have fewer heads than q when H_q % H_kv == 0.
        scale: softmax scale, default 1/sqrt(D).
        dropout_p: dropout on the attention weights (applied whenever > 0);
            keyed by a draw of torch's generator on q's device.
        causal: top-left aligned causal mask (query i sees keys j <= i).

    Returns:
        (out, mask): out shaped like q; mask the bool dropout keep-mask
        (B, H, S_q, S_k) — (B, S_q, S_k) for 3-D input — True = kept, or an
        empty tensor when dropout_p == 0.
    """
    op = "orchard_ops.flash_attn_fwd"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"{op}: q, k, v must all be (B, S, D) or (B, H, S, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _ops.check_dropout(op, dropout_p)
    three_d = q.dim() == 3
    sc = _ops.resolve_scale(op, scale, q.shape[-1])
    want_mask = dropout_p > 0.0
    rng = _ops.draw_dropout_rng_state(dropout_p, q.device)
    # (B, H, S, D) views; a 3-D call is one head.
    qh, kh, vh = (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)) if three_d else (q, k, v)
    if _ops.eager_ok(q, k, v):
        # Straight to the C++ op with the lean autograd node, as the SDPA drop-in
        # (_ops.eager_forward): the public op's autograd costs ~2x SDPA's per training step at
        # small shapes (bench/RESULTS.md, session 11).
        out, _lse, mask = _ops.eager_forward(qh, kh, vh, sc, bool(causal), True, float(dropout_p), want_mask,
                                             False, op, rng, True, False)
        if mask is None:  # no dropout and torch's C++ node served the call: nothing to return
            mask = torch.empty(0, dtype=torch.bool, device=q.device)
    else:
        out, _lse, mask = _ops._FWD(  # torch.ops.orchard.flash_attn_forward.default, on BSHD views
            qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), sc, bool(causal), True,
            float(dropout_p), 0, 0, want_mask, False, op, rng)
        out = out.transpose(1, 2)
    if three_d:
        out = out.squeeze(1)
        mask = mask.squeeze(1) if want_mask else mask
    return out, mask.bool()
