"""Drop-in attention functions: flash-attn's ``flash_attn_func`` and torch's
``scaled_dot_product_attention``, both on Orchard's fused kernels and both
differentiable (autograd through the ``orchard::flash_attn_*`` custom ops).

Environment variables (read by the C++ core): ``ORCHARD_DEBUG_FLASH_ATN=1``
appends one line per kernel call to ``orchard_flash_attn_<pid>.log`` in the temp
dir (or ``ORCHARD_LOG_DIR``); ``ORCHARD_TENSOR_PROFILE=1`` prints to stderr, per
tensor, whether it was read in place or staged through one copy, and why.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ops

_Tensor = torch.Tensor
_FWD = _ops._FWD  # torch.ops.orchard.flash_attn_forward.default, without the packet lookups

__all__ = ["flash_attn_func", "scaled_dot_product_attention", "OrchardShapeError"]


class OrchardShapeError(ValueError, RuntimeError):
    """Bad input shapes. A ValueError (Orchard's convention) that is also a
    RuntimeError, which is what torch's own SDPA raises for the same input."""


def _check_float(name: str, op: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash-attn 2 compatible attention.

    Args:
        q: (batch, seqlen_q, nheads, headdim); any strides (read in place when
           the last dim is contiguous).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0
           (GQA / MQA).
        dropout_p: dropout probability on the attention weights (applied
           whenever > 0, as in flash-attn: pass 0.0 at evaluation). The key is
           drawn on q's device by torch's generator (``torch.manual_seed``
           reproduces a run) and read by the kernels when they run, so
           torch.compile traces it and each CUDA-graph replay draws a new mask.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the
           attention matrix when seqlen_q != seqlen_k (flash-attn >= 2.1):
           query i sees keys j <= i + seqlen_k - seqlen_q. Rows that see no
           key output 0.
        window_size, softcap, alibi_slopes: not implemented (any non-default
           value raises NotImplementedError).
        deterministic: make the backward bitwise reproducible.
        return_attn_probs: also return (softmax_lse, S_dmask). Unlike
           flash-attn, S_dmask is not the attention matrix: it is the bool
           dropout keep-mask (batch, nheads, seqlen_q, seqlen_k), True = kept
           (all True when dropout_p == 0). Testing only: it is S x S memory.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask)
        with softmax_lse (batch, nheads, seqlen_q) float32 (float64 for
        float64 inputs).
    """
    op = "orchard.flash_attn_func"
    if not (isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_float(name, op, t)
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{op}: window_size (sliding-window attention) is not "
                                  f"implemented; got {tuple(window_size)}, expected (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"{op}: softcap is not implemented; got {softcap}")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{op}: alibi_slopes are not implemented")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (batch, seqlen, nheads, headdim); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse, mask = _FWD(q, k, v, scale, bool(causal), False, float(dropout_p), 0, 0,
                          bool(return_attn_probs), bool(deterministic), op,
                          _ops.draw_dropout_rng_state(dropout_p, q.device))
    if return_attn_probs:
        return out, lse, mask.bool()
    return out


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on Orchard.

    Same semantics as torch: query (..., Hq, L, E), key (..., Hkv, S, E),
    value (..., Hkv, S, E) -> (..., Hq, L, E); is_causal uses torch's top-left
    alignment (query i sees keys j <= i, also when L != S); scale defaults to
    1/sqrt(E); dropout is applied whenever dropout_p > 0 (pass 0.0 at
    evaluation, as with torch). Hq != Hkv needs enable_gqa=True and
    Hq % Hkv == 0. The (B, H, S, D) tensors are handed to the kernels as
    permuted views, read in place; the output has query's layout.

    Not implemented (NotImplementedError): attn_mask, and a value head dim
    different from the query's. ``deterministic`` (Orchard extension) makes the
    backward bitwise reproducible; it is also on under
    ``torch.use_deterministic_algorithms(True)``.
    """
    op = "orchard.scaled_dot_product_attention"
    if not (isinstance(query, _Tensor) and isinstance(key, _Tensor) and isinstance(value, _Tensor)):
        for name, t in (("query", query), ("key", key), ("value", value)):
            _check_float(name, op, t)
    if attn_mask is not None:
        raise NotImplementedError(f"{op}: attn_mask is not implemented (use is_causal=True for "
                                  f"causal masking)")
    ndim = query.dim()
    if ndim < 3 or key.dim() != ndim or value.dim() != ndim:
        raise OrchardShapeError(f"{op}: query, key, value must have the same rank >= 3 "
                                f"((..., H, L, E) or (N, L, E)); got {tuple(query.shape)}, "
                                f"{tuple(key.shape)}, {tuple(value.shape)}")
    qshape, kshape, vshape = query.shape, key.shape, value.shape
    if vshape[-1] != qshape[-1]:
        raise NotImplementedError(f"{op}: a value head dim ({vshape[-1]}) different from the "
                                  f"query/key head dim ({qshape[-1]}) is not implemented")
    if kshape[-1] != qshape[-1]:
        raise OrchardShapeError(f"{op}: query and key head dims differ ({qshape[-1]} vs "
                                f"{kshape[-1]})")
    if kshape[-2] != vshape[-2]:
        raise OrchardShapeError(f"{op}: key and value sequence lengths differ ({kshape[-2]} vs "
                                f"{vshape[-2]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")

    if ndim == 4:
        q4, k4, v4 = query, key, value
    elif ndim == 3:
        # (N, L, E): one head.
        q4, k4, v4 = query.unsqueeze(-3), key.unsqueeze(-3), value.unsqueeze(-3)
    else:
        # flatten (not reshape(-1, ...)): works for empty tensors too
        q4 = query.flatten(0, -4)
        k4 = key.flatten(0, -4)
        v4 = value.flatten(0, -4)
    q4shape, k4shape, v4shape = q4.shape, k4.shape, v4.shape
    if k4shape[0] != q4shape[0] or v4shape[0] != q4shape[0] or k4shape[1] != v4shape[1]:
        raise OrchardShapeError(f"{op}: batch/head dims of query {tuple(query.shape)}, key "
                                f"{tuple(key.shape)} and value {tuple(value.shape)} do not match "
                                f"(broadcasting is not supported)")
    hq, hkv = q4shape[1], k4shape[1]
    if hq != hkv:
        if not enable_gqa:
            raise OrchardShapeError(f"{op}: query has {hq} heads but key/value have {hkv}; pass "
                                    f"enable_gqa=True for grouped-query attention")
        if hq % hkv != 0:
            raise OrchardShapeError(f"{op}: number of heads in key and value ({hkv}) must divide "
                                    f"the number of heads in query ({hq})")

    sc = _ops.default_scale(qshape[-1]) if scale is None else float(scale)
    out, _lse, _mask = _FWD(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), sc, bool(is_causal), True,
        float(dropout_p), 0, 0, False, bool(deterministic), op,
        _ops.draw_dropout_rng_state(dropout_p, query.device),
    )
    out = out.transpose(1, 2)  # (B, H, L, E)
    if ndim == 4:
        return out
    if ndim == 3:
        return out.squeeze(-3)
    return out.reshape(*qshape[:-3], *out.shape[-3:])
