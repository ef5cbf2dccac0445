"""KV-cache decoding: :func:`flash_attn_with_kvcache` (flash-attn's API and semantics).

Forward only. The caches are read and written in place (never copied); new
``k``/``v`` are appended at ``cache_seqlens`` before attending. See
``include/orchard/decode_params.h`` for the exact key numbering.

On CUDA the index tensors (``cache_seqlens``, ``cache_leftpad``, ``cache_batch_idx``,
``block_table``) live on the device; the C++ core copies them to the host and checks their
values before anything is written (one synchronisation; src/core/kvcache.cpp, the same checks
and messages as on the CPU) unless a CUDA graph is being captured or
``orchard.kvcache.CHECK_DEVICE_INDICES`` is False. Unchecked out-of-range values never
make the kernels address memory outside the cache (they are clamped), but give
meaningless results. On the CPU every value is always checked.

An eager call goes to the C++ op ``orchard::_kvcache_fwd`` (orchard/_C_torch.so, the stable-ABI
op library; it allocates out / lse / the split-KV scratch through torch and launches on the
current stream); without that library, under a dispatch / function mode, and for tensor
subclasses, the DLPack path (orchard._C.kvcache_forward) serves it as before. Under
torch.compile the call is the op ``orchard::kvcache_forward`` (it mutates the caches; a fake
kernel gives its output shapes), so a compiled decode step keeps one graph: its kernel is the
eager call above. (``orchard::_kvcache_fwd`` itself cannot be traced: torch's functionalization
refuses a mutating custom op whose outputs include an optional tensor or an int.)

A generation loop over a paged cache (page size any multiple of 16)::

    pages_per_seq = max_len // page
    k_cache = torch.zeros(batch * pages_per_seq, page, n_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.arange(batch * pages_per_seq, device="cuda", dtype=torch.int32).view(batch, -1)
    seqlens = torch.zeros(batch, device="cuda", dtype=torch.int32)
    # prefill: append the prompt's k/v (and attend causally over it)
    out = orchard.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                          block_table=block_table, causal=True)
    seqlens += prompt_len
    for step in range(new_tokens):  # q, k, v: (batch, 1, heads, head_dim) of the newest token
        out = orchard.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                              block_table=block_table, rotary_cos=cos, rotary_sin=sin,
                                              causal=True)
        seqlens += 1
"""

from __future__ import annotations

import torch

from . import _C
from . import _ops
from ._ops import _export, _launch_on_device_of

OP = "orchard.flash_attn_with_kvcache"

#: Check device-resident index tensors on CUDA (the core copies them back: one host sync per call).
CHECK_DEVICE_INDICES = True

#: The split-KV count the latest call used (a diagnostic for benchmarks).
last_num_splits = 0


def _err(msg):
    return ValueError(f"{OP}: {msg}")


_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch._C.is_grad_enabled


def _plain(t) -> bool:
    return t is None or type(t) is _Tensor


def _stable_op_serves(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                      cache_leftpad, block_table, alibi_slopes) -> bool:
    """Whether the eager call may go to the C++ op (orchard::_kvcache_fwd, _C_torch.so): it is
    loaded, nothing traces or intercepts the call (torch.compile, dispatch / function modes) and
    every tensor is a plain CPU or CUDA tensor. Else the DLPack path, as before. (Spelled out
    rather than a loop: this runs on every decode step.)"""
    return (_ops._SKVCACHE_CALL is not None and type(q) is _Tensor and (q.is_cuda or q.is_cpu)
            and type(k_cache) is _Tensor and type(v_cache) is _Tensor and _plain(k) and _plain(v)
            and (cache_seqlens is None or type(cache_seqlens) is _Tensor)
            and (block_table is None or type(block_table) is _Tensor)
            and _plain(rotary_cos) and _plain(rotary_sin)
            and (cache_batch_idx is None or type(cache_batch_idx) is _Tensor)
            and (cache_leftpad is None or type(cache_leftpad) is _Tensor)
            and (alibi_slopes is None or type(alibi_slopes) is _Tensor)
            and not _is_compiling() and not _ops._dispatch_modes() and not _ops._function_modes())


_TENSOR_ARGUMENTS = ("q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                     "cache_batch_idx", "cache_leftpad", "block_table", "alibi_slopes")


def _check_tensor_arguments(tensors) -> None:
    """What the C++ op's fast path leaves to the dispatcher: every argument a tensor (or None where
    optional), all on q's device (a meta tensor among CPU ones would reach no kernel). Run off
    that path, and when it fails, so that the error names the argument."""
    for i, (name, t) in enumerate(zip(_TENSOR_ARGUMENTS, tensors)):
        _ops.check_tensor(OP, name, t, optional=i >= 3)  # (q and the caches are required)
    _ops.check_one_device(OP, zip(_TENSOR_ARGUMENTS, tensors))


def _cuda_layout_traceable(t) -> bool:
    """While torch.compile traces, what the CUDA kernels' NotImplementedError would say at run
    time (16-byte aligned cache rows; kvcache.cpp): a traced call has no fallback to take then.
    The allocation itself is aligned; its offset and strides are known while tracing."""
    es = t.element_size()
    return (t.storage_offset() * es) % 16 == 0 and all((st * es) % 16 == 0 for st in t.stride()[:-1])


def serves_in_place(q, k, v, dropout_p: float, sink) -> bool:
    """Whether another entry's call (q (..., nheads, headdim), k / v (..., nheads_k, headdim), the
    layouts flash_attn_with_kvcache reads) can run on the KV-cache kernels instead: no dropout,
    sink or gradient, q, k, v of one dtype its kernels have, head dims equal, a multiple of 8 up to
    256, heads that divide; under torch.compile (where this entry is the traceable op
    orchard::kvcache_forward) CUDA caches also laid out as its kernels read them. Used by
    paged_varlen.py's decode form and transformers' generation steps."""
    if dropout_p > 0.0 or sink is not None:
        return False
    if q.device.type not in ("cpu", "cuda") or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False  # the caller's own path names the problem
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d or d % 8 or d > 256 or not k.shape[-2] or q.shape[-2] % k.shape[-2]:
        return False
    if _is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return not (_is_compiling() and q.is_cuda) or (_cuda_layout_traceable(k) and _cuda_layout_traceable(v))


def _splits(num_splits) -> int:
    """num_splits as the kernels' int: a count past int32 means "as many as there are" (the plan clamps
    it to the key tiles), one below -1 stays negative (refused by the C++ checks)."""
    return max(-1, min(int(num_splits), 2**31 - 1))


def _eager_scalars(softmax_scale, wl, wr, softcap, num_splits):
    """The eager calls' scalar arguments as the C++ op takes them; a value of the wrong type (None,
    a string) or one no number can stand for (NaN as an int) raises the op's error, naming them."""
    try:
        return (None if softmax_scale is None else float(softmax_scale), _ops.window_bound(int(wl)),
                _ops.window_bound(int(wr)), float(softcap), _splits(num_splits))
    except TypeError as e:
        raise TypeError(f"{OP}: softmax_scale, window_size, softcap and num_splits must be numbers ({e})") from None
    except (ValueError, OverflowError) as e:
        raise _err(f"softmax_scale, window_size, softcap and num_splits must be numbers ({e})") from None


def _stable_call(tensors, softmax_scale, causal, wl, wr, softcap, rotary_interleaved, num_splits, return_lse):
    """(out, lse or None) from the C++ op, which allocates out / lse / scratch and launches.
    tensors: flash_attn_with_kvcache's twelve tensor arguments, in its order."""
    global last_num_splits
    scale, wl, wr, softcap, splits = _eager_scalars(softmax_scale, wl, wr, softcap, num_splits)
    try:
        out, lse, last_num_splits = _ops._SKVCACHE_CALL(
            *tensors, scale, bool(causal), wl, wr, softcap, bool(rotary_interleaved), splits, bool(return_lse),
            bool(CHECK_DEVICE_INDICES), OP)
    except RuntimeError as e:
        raise _ops._stable_error(e) from None
    return out, lse


def _dlpack_call(tensors, softmax_scale, causal, wl, wr, softcap, rotary_interleaved, num_splits, return_lse):
    """The same through orchard._C on DLPack capsules (no _C_torch.so, a mode, a subclass)."""
    q = tensors[0]
    softmax_scale, wl, wr, softcap, splits = _eager_scalars(softmax_scale, wl, wr, softcap, num_splits)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = (torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
           if return_lse else None)
    dev = q.device

    def alloc(nbytes):
        return _export(torch.empty(nbytes, dtype=torch.uint8, device=dev))[0]

    def launch(stream):
        args = _export(*tensors, out, lse)
        global last_num_splits
        last_num_splits = _C.kvcache_forward(*args, softmax_scale, bool(causal), wl, wr, softcap,
                                             bool(rotary_interleaved), splits, bool(CHECK_DEVICE_INDICES),
                                             stream, alloc, OP)[0]

    _launch_on_device_of(q, launch)
    return out, lse


# The traceable form (torch.compile): the caches are declared mutated, both outputs are plain
# tensors (lse has no elements unless asked for).
_ops._LIB.define(
    "kvcache_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
    "Tensor? rotary_cos, Tensor? rotary_sin, Tensor? cache_seqlens, Tensor? cache_batch_idx, "
    "Tensor? cache_leftpad, Tensor? block_table, Tensor? alibi_slopes, float? softmax_scale, bool causal, "
    "SymInt window_left, SymInt window_right, float softcap, bool rotary_interleaved, SymInt num_splits, "
    "bool return_lse) -> (Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)


@_ops._disable_dynamo
def _traced_kernel(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table, alibi_slopes, softmax_scale, causal, window_left, window_right,
                   softcap, rotary_interleaved, num_splits, return_lse):
    tensors = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
               block_table, alibi_slopes)
    call = _stable_call if _stable_op_serves(*tensors) else _dlpack_call
    out, lse = call(tensors, softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved,
                    num_splits, return_lse)
    return out, (lse if lse is not None else torch.empty((0,), dtype=torch.float32, device=q.device))


def _traced_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                 cache_leftpad, block_table, alibi_slopes, softmax_scale, causal, window_left, window_right,
                 softcap, rotary_interleaved, num_splits, return_lse):
    out = q.new_empty(q.shape)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


_ops._LIB.impl("kvcache_forward", _traced_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("orchard::kvcache_forward", _traced_fake, lib=_ops._LIB)
_TRACED = torch.ops.orchard.kvcache_forward.default


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: attention of q over the KV cache, with the new
    ``k``/``v`` (if given) written into ``k_cache``/``v_cache`` in place at ``cache_seqlens`` first.

    q: (batch, seqlen_q, nheads, headdim). k_cache/v_cache: (batch_cache, seqlen_cache, nheads_k,
    headdim), or (num_blocks, page_size, nheads_k, headdim) with ``block_table`` (batch,
    max_blocks_per_seq) int32 — page_size any positive multiple of 16. k/v: (batch, seqlen_new,
    nheads_k, headdim). rotary_cos/sin: (seqlen_ro, rotary_dim / 2), applied to q and the new k
    (at positions cache_seqlens + i; every q row at cache_seqlens unless causal/windowed),
    interleaved (GPT-J) or not (GPT-NeoX). cache_seqlens: int or int32 (batch,).
    cache_batch_idx / cache_leftpad: int32 (batch,). Causal is bottom-right aligned with the
    cache length after the append. nheads % nheads_k == 0 (GQA/MQA: each kv head is read once
    for its query group). num_splits: split-KV count, 0 = heuristic. Returns out (batch,
    seqlen_q, nheads, headdim) and, with return_softmax_lse, lse float32 (batch, nheads,
    seqlen_q). Forward only."""
    if _is_grad_enabled() and _ops._any_requires_grad(q, k_cache, v_cache, k, v):
        raise RuntimeError(f"{OP}: forward only (no autograd); call it under torch.no_grad() or "
                           "pass tensors that do not require grad")
    if isinstance(cache_seqlens, int) and isinstance(q, _Tensor) and isinstance(k_cache, _Tensor):
        if not -2**31 <= cache_seqlens < 2**31:  # (the C++ checks say what a negative one means)
            raise _err(f"cache_seqlens {cache_seqlens} does not fit int32")
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    if isinstance(q, _Tensor) and q.dim() != 4:
        raise _err(f"q must be (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
    if block_table is not None and cache_batch_idx is not None:
        raise _err("cache_batch_idx is not supported with a paged cache (block_table)")
    try:
        wl, wr = (-1, -1) if window_size is None else window_size  # (None: unbounded, as flash_attn_func)
    except (TypeError, ValueError):
        raise _err(f"window_size must be a pair (left, right), got {window_size!r}") from None
    tensors = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
               block_table, alibi_slopes)
    if _stable_op_serves(*tensors):  # the eager call (not while torch.compile traces)
        try:
            out, lse = _stable_call(tensors, softmax_scale, causal, wl, wr, softcap, rotary_interleaved,
                                    num_splits, return_softmax_lse)
        except RuntimeError:
            _check_tensor_arguments(tensors)  # name a device mismatch torch's dispatcher reported
            raise
        return (out, lse) if return_softmax_lse else out
    _check_tensor_arguments(tensors)
    if q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"{OP}: the KV-cache decode runs on the CPU and CUDA backends, not on "
                                  f"{q.device.type} (the Metal backend has no decode kernel)")
    elif _is_compiling():
        out, lse = _TRACED(*tensors, softmax_scale, causal, wl, wr, softcap, rotary_interleaved, num_splits,
                           bool(return_softmax_lse))
    else:
        out, lse = _dlpack_call(tensors, softmax_scale, causal, wl, wr, softcap, rotary_interleaved, num_splits,
                                return_softmax_lse)
    return (out, lse) if return_softmax_lse else out


__all__ = ["flash_attn_with_kvcache", "CHECK_DEVICE_INDICES", "serves_in_place"]
