"""Drop-in attention functions: flash-attn's ``flash_attn_func`` and torch's
``scaled_dot_product_attention``, both on Orchard's fused kernels and both
differentiable (autograd through the ``orchard::flash_attn_*`` custom ops).

Environment variables (read by the C++ core): ``ORCHARD_DEBUG_FLASH_ATN=1``
appends one line per kernel call to ``orchard_flash_attn_<pid>.log`` in the temp
dir (or ``ORCHARD_LOG_DIR``); ``ORCHARD_TENSOR_PROFILE=1`` prints to stderr, per
tensor, whether it was read in place or staged through one copy, and why.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _ops
from .paged_varlen import (attend_decode_form, check_paged_blocks, check_paged_shapes, decode_form_applies,
                           gather_paged_kv, keys_from_zero)

_Tensor = torch.Tensor
_FWD = _ops._FWD  # torch.ops.orchard.flash_attn_forward.default, without the packet lookups
_eager_ok = _ops.eager_ok
_eager_forward = _ops.eager_forward

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "scaled_dot_product_attention",
    "OrchardShapeError",
]


class OrchardShapeError(ValueError, RuntimeError):
    """Bad input shapes. A ValueError (Orchard's convention) that is also a
    RuntimeError, which is what torch's own SDPA raises for the same input."""


def _check_window(op: str, window_size) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: window_size must be a pair of ints (left, right), got "
                         f"{window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{op}: window_size values must be >= -1 (-1 = unbounded), got "
                         f"({left}, {right})")
    return _ops.window_bound(left), _ops.window_bound(right)


def _check_max_seqlen(op: str, name: str, value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}") from None
    if not 0 <= value <= 2**31 - 1:
        raise ValueError(f"{op}: {name} must be in [0, 2^31 - 1], got {value}")
    return value


def _check_softcap(op: str, softcap) -> float:
    try:
        softcap = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: softcap must be a number, got {softcap!r}") from None
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"{op}: softcap must be a finite value >= 0, got {softcap}")
    return softcap


def _check_cu_seqlens(op: str, name: str, cu, total: int, max_seqlen: int, device) -> None:
    """cu_seqlens checks that need the values. On a GPU they cost one device ->
    host copy, so they are skipped while a CUDA graph is being captured or
    torch.compile traces (flash-attn never checks them)."""
    if not isinstance(cu, _Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{op}: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: {name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} is on {cu.device} but q is on {device}")
    if not _ops.host_values_readable(cu):
        return
    vals = cu.tolist()
    if vals[0] < 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{op}: {name} must start >= 0 and be non-decreasing, got {vals[:8]}"
                         f"{' ...' if len(vals) > 8 else ''}")
    if vals[-1] > total:
        raise ValueError(f"{op}: {name}[-1] = {vals[-1]} exceeds the {total} rows of the packed "
                         f"tensor (total mismatch)")
    longest = max((b - a for a, b in zip(vals, vals[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"{op}: max_seqlen ({max_seqlen}) is smaller than the longest sequence "
                         f"in {name} ({longest})")


def _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, return_attn_probs, return_softmax_lse, sink, varlen=None):
    """The one path of every flash-attn style entry point. varlen = (cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k) or None."""
    if not (isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _ops.check_tensor(op, name, t)
    rank = 4 if varlen is None else 3
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        layout = "(batch, seqlen, nheads, headdim)" if varlen is None else "(total, nheads, headdim)"
        raise ValueError(f"{op}: q, k, v must be {rank}-D {layout}; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _ops.check_dropout(op, dropout_p)
    plain = window_size == (-1, -1) and not softcap and alibi_slopes is None and sink is None
    if not plain:
        _ops.check_tensor(op, "alibi_slopes", alibi_slopes, optional=True)
        _ops.check_tensor(op, "sink", sink, optional=True)
    left, right = (-1, -1) if plain or window_size is None else _check_window(op, window_size)
    softcap = 0.0 if plain else _check_softcap(op, softcap)
    if varlen is None:
        cu_q = cu_k = None
        max_q = max_k = 0
        if plain:  # the common call: the op's trailing feature arguments stay defaulted
            scale = _ops.resolve_scale(op, softmax_scale, q.shape[-1])
            rng = None if dropout_p <= 0.0 else _ops.draw_dropout_rng_state(dropout_p, q.device)
            if _eager_ok(q, k, v):  # straight to the C++ op (see _ops.eager_forward)
                out, lse, mask = _eager_forward(q, k, v, scale, bool(causal), False, float(dropout_p),
                                                bool(return_attn_probs), bool(deterministic), op, rng,
                                                False, bool(return_attn_probs or return_softmax_lse))
            else:
                out, lse, mask = _FWD(q, k, v, scale, bool(causal), False, float(dropout_p), 0, 0,
                                      bool(return_attn_probs), bool(deterministic), op, rng)
            return _flash_result(out, lse, mask, return_attn_probs, return_softmax_lse)
    else:
        cu_q, cu_k, max_q, max_k = varlen
        max_q, max_k = _check_max_seqlen(op, "max_seqlen_q", max_q), _check_max_seqlen(op, "max_seqlen_k", max_k)
        _check_cu_seqlens(op, "cu_seqlens_q", cu_q, q.shape[0], max_q, q.device)
        _check_cu_seqlens(op, "cu_seqlens_k", cu_k, k.shape[0], max_k, q.device)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{cu_q.numel()} and {cu_k.numel()}")
    scale = _ops.resolve_scale(op, softmax_scale, q.shape[-1])
    out, lse, mask = _ops.feature_forward(q, k, v, scale, bool(causal), False, float(dropout_p), 0, 0,
                                          bool(return_attn_probs), bool(deterministic), op,
                                          _ops.draw_dropout_rng_state(dropout_p, q.device),
                                          left, right, softcap, alibi_slopes, sink, None, cu_q, cu_k, max_q,
                                          max_k)
    return _flash_result(out, lse, mask, return_attn_probs, return_softmax_lse)


def _flash_result(out, lse, mask, return_attn_probs, return_softmax_lse):
    if return_attn_probs:
        return out, lse, mask.bool()
    if return_softmax_lse:
        return out, lse
    return out


_FLASH_ARGS_DOC = """        dropout_p: dropout probability on the attention weights (applied
           whenever > 0, as in flash-attn: pass 0.0 at evaluation). Each weight
           draws 8 bits, as flash-attn's kernels do: it drops with probability
           round(256 p) / 256, kept ones are scaled by 1 / (1 - p). The key is
           drawn on q's device by torch's generator (``torch.manual_seed``
           reproduces a run) and read by the kernels when they run, so
           torch.compile traces it and each CUDA-graph replay draws a new mask.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the
           attention matrix when seqlen_q != seqlen_k (flash-attn >= 2.1):
           query i sees keys j <= i + seqlen_k - seqlen_q. Rows that see no
           key output 0 (LSE -inf).
        window_size: (left, right) sliding window on the same diagonal: query i
           sees keys j with i + seqlen_k - seqlen_q - left <= j <= i +
           seqlen_k - seqlen_q + right; -1 = unbounded (causal = right 0).
        softcap: > 0 applies softcap * tanh(scores / softcap) (Gemma 2).
        alibi_slopes: float32 (nheads,) or (batch, nheads): adds
           -slope * |i + seqlen_k - seqlen_q - j| to the scores (flash-attn's
           bias; with causal, flash-attn's kernel returns an LSE that differs
           from this one by a per-row constant, the output is the same).
        deterministic: make the backward bitwise reproducible.
        return_attn_probs: also return (softmax_lse, S_dmask). Unlike
           flash-attn, S_dmask is not the attention matrix: it is the bool
           dropout keep-mask (batch, nheads, seqlen_q, seqlen_k), True = kept
           (all True when dropout_p == 0). Testing only: it is S x S memory.
        return_softmax_lse: (Orchard extension) return (out, softmax_lse).
        sink: (Orchard extension; gpt-oss attention sinks) float32 (nheads,)
           learnable logits that join every row's softmax denominator without a
           value; differentiable.
"""


def _with_flash_args_doc(fn):
    """Fills the arguments flash-attn's entry points share into fn's docstring ("{flash_args}"): a
    docstring built with + is an expression, not a docstring, so help() would show nothing."""
    fn.__doc__ = fn.__doc__.replace("        {flash_args}\n", _FLASH_ARGS_DOC)
    return fn


@_with_flash_args_doc
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
    *,
    return_softmax_lse: bool = False,
    sink: Optional[torch.Tensor] = None,
):
    """flash-attn 2 compatible attention.

    Args:
        q: (batch, seqlen_q, nheads, headdim); any strides (read in place when
           the last dim is contiguous).
        k: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA / MQA).
        v: (batch, seqlen_k, nheads_k, headdim_v); headdim_v may differ from
           headdim (e.g. 192 / 128 as in DeepSeek MLA).
        {flash_args}
    Returns:
        out (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse[, S_dmask])
        with softmax_lse (batch, nheads, seqlen_q) float32 (float64 for
        float64 inputs).
    """
    return _flash("orchard.flash_attn_func", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                  return_softmax_lse, sink)


@_with_flash_args_doc
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    return_softmax_lse: bool = False,
    sink: Optional[torch.Tensor] = None,
):
    """flash-attn 2 compatible attention over packed sequences (varlen).

    Args:
        q: (total_q, nheads, headdim), the batch's sequences concatenated.
        k, v: (total_k, nheads_k, headdim[_v]).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on q's device; sequence
           b owns rows [cu[b], cu[b + 1]). Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: at least the longest sequence's length.
        Causal and windows align bottom-right per sequence. A call of at most
        16 query rows per sequence that needs no gradient, dropout, sink or
        probabilities (a serving step) runs on the KV-cache kernels, keys read
        in place (paged_varlen.py's decode form).
        {flash_args}
        block_table: int32 (batch, max_blocks_per_seq): k and v are then paged
           caches (num_blocks, page_size, nheads_k, headdim[_v]), any page size,
           and sequence b's keys are its cache positions [0, cu_seqlens_k[b + 1] -
           cu_seqlens_k[b]) through its row of the table. A call of at most 16
           query rows per sequence that needs no gradient reads the pages in
           place on the KV-cache kernels; any other gathers the rows in use into
           one packed copy and runs as above, backward included (gradients reach
           the caches). paged_varlen.py says which calls take which form.

    Returns:
        out (total_q, nheads, headdim_v), or with (softmax_lse[, S_dmask]),
        softmax_lse (nheads, total_q) float32, S_dmask (batch, nheads,
        max_seqlen_q, max_seqlen_k) indexed by rows local to each sequence.
    """
    op = "orchard.flash_attn_varlen_func"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _ops.check_tensor(op, name, t)
    _ops.check_tensor(op, "alibi_slopes", alibi_slopes, optional=True)
    _ops.check_dropout(op, dropout_p)
    max_seqlen_q = _check_max_seqlen(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen(op, "max_seqlen_k", max_seqlen_k)
    if block_table is not None:
        if not isinstance(cu_seqlens_k, _Tensor):
            raise TypeError(f"{op}: cu_seqlens_k must be a torch.Tensor, got {type(cu_seqlens_k).__name__}")
        check_paged_shapes(op, q, k, v, block_table, cu_seqlens_k.numel() - 1)
        # Paged keys are each sequence's cache positions [0, length): only the differences of
        # cu_seqlens_k count, as in flash-attn, so a first offset above 0 is moved to 0.
        cu_seqlens_k = keys_from_zero(cu_seqlens_k)
        # cu_seqlens_k's last offset is bounded by the pool the table can name, not a packed tensor.
        capacity = block_table.shape[0] * block_table.shape[1] * k.shape[1]
        _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, capacity, int(max_seqlen_k), q.device)
        check_paged_blocks(op, k, block_table, cu_seqlens_k)
    if (all(isinstance(t, _Tensor) for t in (q, k, v, cu_seqlens_q, cu_seqlens_k))
            and decode_form_applies(q, k, v, max_seqlen_q, dropout_p, sink, return_attn_probs)):
        # A few query rows per sequence without a gradient (a serving step): the KV-cache kernels
        # read the keys, paged or packed, in place (paged_varlen.py's decode form).
        _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], int(max_seqlen_q), q.device)
        if block_table is None:
            _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], int(max_seqlen_k), q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        served = attend_decode_form(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table,
                                    softmax_scale, causal, _check_window(op, window_size),
                                    _check_softcap(op, softcap), alibi_slopes)
        if served is not None:
            return served if return_softmax_lse else served[0]
    if block_table is not None:
        k, v = gather_paged_kv(q, k, v, block_table, cu_seqlens_k, max_seqlen_k)
    return _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, return_softmax_lse, sink,
                  (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _unpack(op: str, packed: torch.Tensor, n: int, axis: int, what: str):
    if not isinstance(packed, _Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() <= axis or packed.shape[axis] != n:
        raise ValueError(f"{op}: {what} must have size {n} in dimension {axis}, got shape "
                         f"{tuple(packed.shape)}")
    # Views into the packed tensor: read in place, and autograd writes the
    # gradients of the slices back into one gradient of the packed tensor.
    return packed.unbind(axis)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *,
                              return_softmax_lse=False, sink=None):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, headdim)."""
    op = "orchard.flash_attn_qkvpacked_func"
    q, k, v = _unpack(op, qkv, 3, 2, "qkv (batch, seqlen, 3, nheads, headdim)")
    return _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, return_softmax_lse, sink)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *,
                             return_softmax_lse=False, sink=None):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    op = "orchard.flash_attn_kvpacked_func"
    k, v = _unpack(op, kv, 2, 2, "kv (batch, seqlen_k, 2, nheads_k, headdim)")
    return _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, return_softmax_lse, sink)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, return_softmax_lse=False,
                                     sink=None):
    """flash_attn_varlen_func on qkv (total, 3, nheads, headdim)."""
    op = "orchard.flash_attn_varlen_qkvpacked_func"
    q, k, v = _unpack(op, qkv, 3, 1, "qkv (total, 3, nheads, headdim)")
    return _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, return_softmax_lse, sink,
                  (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *,
                                    return_softmax_lse=False, sink=None):
    """flash_attn_varlen_func on q and kv (total_k, 2, nheads_k, headdim)."""
    op = "orchard.flash_attn_varlen_kvpacked_func"
    k, v = _unpack(op, kv, 2, 1, "kv (total_k, 2, nheads_k, headdim)")
    return _flash(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, return_softmax_lse, sink,
                  (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


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
    *,
    sink: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on Orchard.

    Same semantics as torch: query (..., Hq, L, E), key (..., Hkv, S, E),
    value (..., Hkv, S, E) -> (..., Hq, L, E); is_causal uses torch's top-left
    alignment (query i sees keys j <= i, also when L != S); scale defaults to
    1/sqrt(E); dropout is applied whenever dropout_p > 0 (pass 0.0 at
    evaluation, as with torch). Hq != Hkv needs enable_gqa=True and
    Hq % Hkv == 0. The (B, H, S, D) tensors are handed to the kernels as
    permuted views, read in place; the output has query's layout.

    attn_mask: bool (True = take part in attention) or a float bias added to
    the scaled scores, of query's dtype (or float32 when query is not
    float64), broadcastable to
    (..., Hq, L, S) as in torch; broadcast dims are read in place (stride 0),
    never expanded in memory. Like torch, attn_mask and is_causal together are
    an error. A row the mask hides entirely outputs 0 (torch's math backend
    gives NaN there). A float attn_mask that requires grad gets its gradient
    (computed unfused, (B, H, L, S) in float32 like torch's; not together with
    dropout). value may have its own head dim Ev: the output is (..., Hq, L, Ev).

    ``deterministic`` (Orchard extension) makes the backward bitwise
    reproducible; it is also on under ``torch.use_deterministic_algorithms(True)``.
    ``sink`` (Orchard extension): float32 (Hq,) attention-sink logits, as in
    flash_attn_func.
    """
    op = "orchard.scaled_dot_product_attention"
    if not (isinstance(query, _Tensor) and isinstance(key, _Tensor) and isinstance(value, _Tensor)):
        for name, t in (("query", query), ("key", key), ("value", value)):
            _ops.check_tensor(op, name, t)
    _ops.check_tensor(op, "sink", sink, optional=True)
    ndim = query.dim()
    if ndim < 3 or key.dim() != ndim or value.dim() != ndim:
        raise OrchardShapeError(f"{op}: query, key, value must have the same rank >= 3 "
                                f"((..., H, L, E) or (N, L, E)); got {tuple(query.shape)}, "
                                f"{tuple(key.shape)}, {tuple(value.shape)}")
    qshape, kshape, vshape = query.shape, key.shape, value.shape
    if kshape[-1] != qshape[-1]:
        raise OrchardShapeError(f"{op}: query and key head dims differ ({qshape[-1]} vs "
                                f"{kshape[-1]})")
    if kshape[-2] != vshape[-2]:
        raise OrchardShapeError(f"{op}: key and value sequence lengths differ ({kshape[-2]} vs "
                                f"{vshape[-2]})")
    _ops.check_dropout(op, dropout_p)

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
        if hkv == 0 or hq % hkv != 0:
            raise OrchardShapeError(f"{op}: number of heads in key and value ({hkv}) must divide "
                                    f"the number of heads in query ({hq})")

    mask4 = None if attn_mask is None else _sdpa_mask(op, attn_mask, query, q4shape, k4shape,
                                                      is_causal, dropout_p)
    sc = _ops.resolve_scale(op, scale, qshape[-1])
    # (no call, no device lookup without dropout: draw_dropout_rng_state returns None there)
    rng = None if dropout_p <= 0.0 else _ops.draw_dropout_rng_state(dropout_p, query.device)
    if mask4 is None and sink is None and _eager_ok(q4, k4, v4):
        # Straight to the C++ op (see _ops.eager_forward), which reads the (B, H, S, D)
        # tensors as they are and returns out (B, H, L, Ev) in query's layout.
        out, _lse, _mask = _eager_forward(q4, k4, v4, sc, bool(is_causal), True, float(dropout_p),
                                          False, bool(deterministic), op, rng, True, False)
        return _sdpa_result(out, ndim, qshape)
    if mask4 is not None and sink is None and dropout_p <= 0.0 and _eager_ok(q4, k4, v4):
        # the aten op: torch's C++ autograd node for training, a shorter host path without (see it)
        out = _ops.aten_masked_forward(q4, k4, v4, sc, mask4, deterministic)
        if out is not None:  # (B, H, L, Ev) already
            return _sdpa_result(out, ndim, qshape)
    if mask4 is None and sink is None:
        out, _lse, _mask = _FWD(
            q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), sc, bool(is_causal), True,
            float(dropout_p), 0, 0, False, bool(deterministic), op, rng)
    else:
        out, _lse, _mask = _ops.feature_forward(
            q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), sc, bool(is_causal), True,
            float(dropout_p), 0, 0, False, bool(deterministic), op, rng,
            -1, -1, 0.0, None, sink, mask4, None, None, 0, 0)
    return _sdpa_result(out.transpose(1, 2), ndim, qshape)  # (B, H, L, Ev)


def _sdpa_result(out, ndim, qshape):
    """out (B, H, L, Ev) in the query's rank: (L, Ev) per head for 3-D, the leading batch dims
    restored above 4-D."""
    if ndim == 4:
        return out
    if ndim == 3:
        return out.squeeze(-3)
    return out.reshape(*qshape[:-3], *out.shape[-3:])


def _sdpa_mask(op, attn_mask, query, q4shape, k4shape, is_causal, dropout_p):
    """SDPA's attn_mask as the rank-4 (B, Hq, L, S) view the kernels read: size-1
    and missing leading dims become stride-0 broadcasts (no copy). Batch dims
    beyond one are flattened like the query's (a copy only if they cannot be)."""
    if not isinstance(attn_mask, _Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if is_causal:
        raise OrchardShapeError(f"{op}: Explicit attn_mask should not be set when is_causal=True "
                                f"(as in torch)")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.is_floating_point() and attn_mask.requires_grad and dropout_p > 0.0:
        raise NotImplementedError(f"{op}: the gradient of a float attn_mask together with dropout "
                                  f"is not implemented; pass attn_mask.detach() or dropout_p=0")
    if attn_mask.device != query.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    lq, ls = q4shape[2], k4shape[2]
    full = (*query.shape[:-2], lq, ls)
    try:
        m = attn_mask.expand(full)
    except RuntimeError:
        raise OrchardShapeError(f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                                f"broadcast to {full}") from None
    if m.dim() == 3:  # (N, L, S): one head
        m = m.unsqueeze(-3)
    elif m.dim() > 4:
        m = m.flatten(0, -4)
    return m
