"""Hugging Face transformers on Orchard: ``attn_implementation="orchard"``.

Importing this module registers the name ``"orchard"`` with transformers'
``AttentionInterface`` (and ``AttentionMaskInterface``, where the installed
version has one), so every model that dispatches attention through that
interface (Llama, Mistral, Qwen2, Gemma 2, GPT-2, gpt-oss, ...) runs on
Orchard's fused kernels, forward and backward::

    import orchard.integrations.transformers  # registers "orchard"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="orchard")
    model.set_attn_implementation("orchard")  # or switch an existing model

What models pass and how it is handled:

* BHSD ``query``/``key``/``value`` are handed to the kernels as BSHD views
  (read in place); grouped-query attention (fewer key/value heads) is native —
  no ``repeat_kv`` copies.
* ``is_causal`` (or ``module.is_causal``), ``scaling``, ``dropout`` (the module
  passes 0.0 in eval mode), ``sliding_window`` (key j visible from query i when
  ``i - j < sliding_window``, transformers' convention), ``softcap`` (Gemma 2)
  and ``s_aux`` (gpt-oss attention sinks, learnable and differentiable).
* Padding: the mask interface entry returns transformers' 2-D padding mask (or
  None when nothing is padded), never an S x S tensor. Padded batches are
  unpadded to ``orchard.flash_attn_varlen_func`` (gather the real tokens, run
  variable-length attention, scatter back; padded query rows get 0), as
  transformers' own flash-attention path does. Why this and not a bool mask for
  ``orchard.scaled_dot_product_attention``: varlen needs O(tokens) memory
  instead of a (batch, q, k) mask and padded tokens cost no compute.
  Measured on the CPU (fp32, batch 8, 8 heads, 512 tokens, d 64, 42% left
  padding, 2 threads): forward 19.7 ms unpadded vs 35.3 ms with the 4-D bool
  mask, forward + backward 76.5 vs 169.4 ms.
  With queries and keys at the same positions (training, prefill) q and k share
  one cu_seqlens tensor, which Hopper's sm90 kernels need to take varlen.
  Causal and window alignment are bottom-right per sequence, so left and right
  padding, KV-cache decoding (one query over the cache) and static caches work.
* Packed batches: with no padded token (no 2-D mask, or one without zeros),
  ``position_ids`` that restart inside a row (several sequences packed together, as ``DataCollatorWithFlattening``
  produces) split the rows into separate sequences, like the SDPA path's
  packed-sequence mask; precomputed ``cu_seq_lens_q/k`` + ``max_length_q/k``
  keyword arguments are used as they are.
* A 4-D mask (a custom mask the caller built) goes to the kernels as SDPA's
  ``attn_mask`` (bool or additive float), on the CPU and CUDA (with sinks too).
* ``output_attentions=True`` returns no weights (None), like SDPA.

Tested with transformers 5.23.0 (the version pinned in requirements-dev.txt).
The code needs ``AttentionInterface`` (transformers >= 4.48) and uses the mask
interface when present (>= 4.53); other versions are untested.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ops
from ..functional import flash_attn_func, flash_attn_varlen_func
from ..kvcache import flash_attn_with_kvcache, serves_in_place
from . import _compiled_attention
from ._compiled_attention import cached as _cached, packed_plan as _packed_plan

__all__ = ["NAME", "register", "orchard_attention_forward", "orchard_attention_mask"]

NAME = "orchard"

_OP = "orchard.integrations.transformers"


# ---------------------------------------------------------------------------
# Mask interface: the 2-D padding mask or None (no S x S mask is ever built).
# ---------------------------------------------------------------------------

def orchard_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                           kv_offset: int = 0, mask_function=None,
                           attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask-interface entry for "orchard": the (batch, kv_length)
    bool padding mask when some key is padded (or the mask is shorter than the
    keys, as with a static cache), else None. Causality, sliding windows and
    packing are applied by the kernels, not through a mask. While torch.compile
    traces, the mask is passed on unread (whether it pads anything is a value)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:  # an already prepared custom mask: pass it on
        return attention_mask
    m = attention_mask[:, -kv_length:]
    if m.dtype != torch.bool:
        m = m.bool()
    if m.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(m.all()):
        return None
    return m


# ---------------------------------------------------------------------------
# Unpadding plans (cached per mask tensor: _compiled_attention.cached).
# ---------------------------------------------------------------------------

def _lengths_to_cu(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _padding_plan(mask: torch.Tensor, sq: int):
    """From a (batch, sk) bool mask: row/column indices of the kept keys and of
    the kept queries (the last sq positions), cu_seqlens and max lengths; None when a
    row's kept keys are not one run (padding inside a row: unpadding would close the gap,
    and a sliding window would then count the kept keys instead of positions)."""
    mk = mask
    len_k = mk.sum(1, dtype=torch.int32)
    runs = mk[:, :1].sum(1) + (mk[:, 1:] & ~mk[:, :-1]).sum(1)  # starts of kept runs per row
    mq = mk[:, -sq:]
    len_q = mq.sum(1, dtype=torch.int32)
    max_q, max_k, most_runs = torch.stack((len_q.max(), len_k.max(), runs.max())).tolist()  # one host read
    if most_runs > 1:
        return None
    bk, sk_idx = mk.nonzero(as_tuple=True)
    cu_k = _lengths_to_cu(len_k)
    if sq == mk.shape[1]:
        # Queries and keys are the same positions (training, prefill): one plan and one
        # cu_seqlens tensor for both, which the Hopper kernels need to run varlen
        # (sm90_call_support.h, the segment form).
        return (bk, sk_idx), (bk, sk_idx), cu_k, cu_k, max_k, max_k
    bq, sq_idx = mq.nonzero(as_tuple=True)
    return (bq, sq_idx), (bk, sk_idx), _lengths_to_cu(len_q), cu_k, max_q, max_k


def _left_padding_plan(mask: torch.Tensor, sq: int):
    """(cache_seqlens, cache_leftpad) int32 (batch,) when every row of the (batch, sk) bool mask
    is left padding then keys (zeros, then ones to the end) with its last sq positions (the
    queries) among the keys, as in batched generation; else None. One host read."""
    m = mask.to(torch.int8)
    n = m.sum(1, dtype=torch.int32)
    suffix = (m[:, 1:] >= m[:, :-1]).all() & (n >= sq).all() if m.shape[1] > 1 else (n >= sq).all()
    if not bool(suffix):
        return None
    sk = mask.shape[1]
    return torch.full_like(n, sk), sk - n


def _decode_step_serves(q, k, v, sq: int, sk: int, dropout: float, sink) -> bool:
    """Whether a padded call is a generation step flash_attn_with_kvcache can serve in place: a
    few query rows (<= 16) against more keys, and a call its kernels take (kvcache.serves_in_place).
    (Eager only: its plan reads the mask back to the host.)"""
    return 0 < sq <= 16 and sq < sk and serves_in_place(q, k, v, dropout, sink)


def _self_attention_positions(kwargs, sq: int, sk: int):
    """transformers' position_ids when the call is self-attention over them (training, prefill:
    q_len == kv_len > 1), which packed sequences are told apart by; else None."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and sq == sk and sq > 1 and position_ids.shape[-1] == sq:
        return position_ids
    return None


# ---------------------------------------------------------------------------
# The attention function.
# ---------------------------------------------------------------------------

_warned_output_attentions = False


def orchard_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                              s_aux: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-interface entry for "orchard".

    query (batch, heads, q_len, head_dim), key/value (batch, kv_heads, kv_len,
    head_dim[_v]); returns (attn_output (batch, q_len, heads, head_dim_v), None).
    """
    global _warned_output_attentions
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn(f"{_OP}: output_attentions=True is not supported by Orchard's fused kernels; "
                      f"attention weights are returned as None (use attn_implementation='eager')")
    b, hq, sq, _ = query.shape
    sk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # BSHD views

    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = (-1, -1)
    if sliding_window is not None and int(sliding_window) > 0:
        left = int(sliding_window) - 1  # transformers: key j visible iff i - j < sliding_window
        window = (left, 0 if causal else left)
    cap = float(softcap) if softcap else 0.0
    sink = None if s_aux is None else s_aux.float()
    opts = dict(dropout_p=float(dropout), softmax_scale=scaling, causal=causal,
                window_size=window, softcap=cap, sink=sink)

    if attention_mask is not None and attention_mask.dim() == 4:
        return _masked(q, k, v, attention_mask, float(dropout), scaling, cap, sink), None

    if attention_mask is not None:  # 2-D padding mask: unpad -> varlen -> pad
        mask = attention_mask
        if mask.dtype != torch.bool:
            mask = mask.bool()
        if mask.shape[1] > sk:
            mask = mask[:, -sk:]
        elif mask.shape[1] < sk:  # static cache: slots beyond the mask hold nothing yet
            k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
        if torch.compiler.is_compiling():
            position_ids = _self_attention_positions(kwargs, sq, sk)
            if position_ids is not None:
                # One opaque op makes the eager choice where it runs: an all-ones mask is none
                # (packed position ids then count), a padded one masks the keys.
                return _compiled_attention.attention(q, k, v, position_ids, mask, **opts), None
            return _key_padding_masked(q, k, v, mask, **opts), None
        if _decode_step_serves(q, k, v, sq, k.shape[1], float(dropout), sink):
            # Batched generation: left padding, the new tokens last. The KV-cache kernels read the
            # cache in place from each row's first key (no per-step copy of the keys).
            plan = _cached(mask, ("leftpad", sq), lambda: _left_padding_plan(mask, sq))
            if plan is not None:
                seqlens, leftpad = plan
                try:
                    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                                  softmax_scale=scaling, causal=causal, window_size=window,
                                                  softcap=cap)
                    return out, None
                except NotImplementedError:  # a cache layout its kernels cannot read in place (CUDA:
                    pass                     # 16-byte strides): the varlen path below serves it
        plan = _cached(mask, ("pad", sq), lambda: _padding_plan(mask, sq))
        if plan is None:  # padding inside a row: the kernels mask the keys at their own positions
            return _key_padding_masked(q, k, v, mask, **opts), None
        (bq, iq), (bk, ik), cu_q, cu_k, max_q, max_k = plan
        out = _varlen_trusted(q[bq, iq], k[bk, ik], v[bk, ik], cu_q, cu_k, max_q, max_k, **opts)
        padded = out.new_zeros(b, sq, hq, out.shape[-1])
        return padded.index_put((bq, iq), out), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                     v.reshape(-1, *v.shape[2:]), cu_q.to(torch.int32),
                                     cu_k.to(torch.int32), int(max_q), int(max_k), **opts)
        return out.view(b, sq, hq, out.shape[-1]), None

    position_ids = _self_attention_positions(kwargs, sq, sk)
    if position_ids is not None:
        if torch.compiler.is_compiling():  # one opaque op: the plan is read where it runs
            return _compiled_attention.attention(q, k, v, position_ids, None, **opts), None
        plan = _cached(position_ids, ("packed", b), lambda: _packed_plan(position_ids, b, sq))
        if plan is not None:
            cu, longest = plan
            out = _varlen_trusted(q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]),
                                  v.reshape(b * sk, *v.shape[2:]), cu, cu, longest, longest, **opts)
            return out.view(b, sq, hq, out.shape[-1]), None

    return flash_attn_func(q, k, v, **opts), None


def _varlen_trusted(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal,
                    window_size, softcap, sink):
    """flash_attn_varlen_func for cu_seqlens this module built itself (valid by
    construction), without the public function's checks of their values, which
    cost a device -> host copy per call on a GPU: with the plan cache, a padded
    or packed forward syncs once, not once per layer."""
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, _, _ = _ops.feature_forward(q, k, v, scale, causal, False, dropout_p, 0, 0, False, False, _OP,
                                     _ops.draw_dropout_rng_state(dropout_p, q.device), window_size[0],
                                     window_size[1], softcap, None, sink, None, cu_q, cu_k, max_q, max_k)
    return out


def _key_padding_masked(q, k, v, mask, dropout_p, softmax_scale, causal, window_size, softcap, sink):
    """A 2-D padding mask as a (batch, 1, 1, kv_len) key-padding mask broadcast in place (the
    Hopper kernels skip the key tiles it hides), with causality and the window applied by the
    kernels at the keys' own positions. Query rows that are padding come out 0, as on the
    unpadded path. Taken while torch.compile traces (the unpadding plans read the mask back to
    the host, a graph break per layer) and for padding inside a row. mask: (batch, kv_len) bool;
    the queries are its last q_len."""
    key_mask, rows = _compiled_attention.key_padding_mask(mask, q)
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, _, _ = _ops.feature_forward(q, k, v, scale, causal, False, dropout_p, 0, 0, False, False, _OP,
                                     _ops.draw_dropout_rng_state(dropout_p, q.device), window_size[0],
                                     window_size[1], softcap, None, sink, key_mask, None, None, 0, 0)
    return out * rows.to(out.dtype)


def _masked(q, k, v, mask, dropout_p, scaling, softcap, sink):
    """A prepared 4-D mask (batch|1, heads|1, q_len, kv_len), bool (True =
    attend) or additive float: SDPA's attn_mask on the kernels (the mask already
    holds causality and windows). CPU backend only for now."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    if mask.shape[-1] != sk:
        mask = mask[..., -sk:] if mask.shape[-1] > sk else mask
        if mask.shape[-1] < sk:
            k, v = k[:, :mask.shape[-1]], v[:, :mask.shape[-1]]
    if mask.is_floating_point() and mask.dtype not in (q.dtype, torch.float32):
        mask = mask.to(torch.float32)
    mask = mask.detach().expand(b, hq, sq, mask.shape[-1])
    scale = _ops.default_scale(d) if scaling is None else float(scaling)
    out, _, _ = _ops.feature_forward(q, k, v, scale, False, True, dropout_p, 0, 0, False, False,
                                     _OP, _ops.draw_dropout_rng_state(dropout_p, q.device),
                                     -1, -1, softcap, None, sink, mask, None, None, 0, 0)
    return out


# ---------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------

def register(name: str = NAME) -> str:
    """Register ``name`` (default "orchard") with transformers' AttentionInterface
    and, where the installed transformers has one, its AttentionMaskInterface.
    Idempotent; returns the name. Raises ImportError without transformers."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(f"{_OP}: needs Hugging Face transformers with an AttentionInterface "
                          f"(>= 4.48; pip install 'transformers==5.23.0')") from e
    AttentionInterface.register(name, orchard_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: models build their own masks (4-D path)
        pass
    else:
        AttentionMaskInterface.register(name, orchard_attention_mask)
    return name


register()
