"""Orchard's Metal backend on PyTorch's MPS device.

The C++ core picks the kernel variant (dtype x head-dim bucket), the launch geometry
and the packed scalar arguments, and hands back the variant's MSL source
(``_C.metal_variant`` / ``metal_plan`` / ``metal_meta``). This module compiles that
source with ``torch.mps.compile_shader`` once per variant (``_LIBRARIES``) and calls
the kernels, which torch encodes on its current MPS stream, ordered with every other
MPS op and without a synchronize. Tensors are bound as their storage's MTLBuffer plus
the view's offset, whatever the storage mode — zero-copy; strides travel in the
``meta`` buffer. Nothing is cloned.

Kernels: ``orchard_fwd`` (O and the fp32 LSE, optional dropout keep-mask), and the
backward as ``orchard_bwd_dot`` (delta = rowsum(dO * O)), ``orchard_bwd_dq`` and
``orchard_bwd_dkdv`` (no atomics: the backward is deterministic).

Verified only on an emulated Metal execution model (tests/metal, and the test
stand-in below); it has not yet run on Apple hardware.

Test stand-in: ``use_compiler(fn)`` replaces ``torch.mps.compile_shader`` and, while
set, routes calls on CPU tensors here too, so the tests run this whole path (argument
order, dtypes, strides, geometry, autograd, logs) on CPU tensors through
``orchard._metal_emulator``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import torch

from . import _C

# The kernels' buffer order, as declared in src/backends/metal/kernels/*.metal.
_FWD_ARGS = ("q", "k", "v", "out", "lse", "mask", "rng", "meta", "alibi", "sink", "mask_bool", "mask_elem",
             "mask_float", "cu_q", "cu_k")
_DOT_ARGS = ("out", "dout", "delta", "meta", "cu_q", "cu_k")
_DQ_ARGS = ("q", "k", "v", "dout", "lse", "delta", "dq", "rng", "meta", "alibi", "mask_bool", "mask_elem",
            "mask_float", "cu_q", "cu_k")
_DKDV_ARGS = ("q", "k", "v", "dout", "lse", "delta", "dk", "dv", "rng", "meta", "alibi", "mask_bool", "mask_elem",
              "mask_float", "cu_q", "cu_k")
_KERNEL_ARGS = {"orchard_fwd": _FWD_ARGS, "orchard_bwd_dot": _DOT_ARGS,
                "orchard_bwd_dq": _DQ_ARGS, "orchard_bwd_dkdv": _DKDV_ARGS}

_MIN_TORCH = (2, 7)  # torch.mps.compile_shader became public in 2.7
_SUPPORTED = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_U63 = 1 << 63

_LIBRARIES: dict = {}  # variant name -> compiled library
_compiler = None       # test stand-in for torch.mps.compile_shader (see use_compiler)


@contextlib.contextmanager
def use_compiler(compile_shader):
    """Tests only: use ``compile_shader`` instead of torch.mps.compile_shader, and
    route calls on CPU tensors through the MPS path while the context is active."""
    global _compiler
    from . import _ops  # (imported here: _ops imports this module lazily)
    previous, _compiler = _compiler, compile_shader
    _LIBRARIES.clear()
    _ops._MPS_STAND_IN = _compiler is not None
    try:
        yield
    finally:
        _compiler = previous
        _ops._MPS_STAND_IN = _compiler is not None
        _LIBRARIES.clear()


def handles(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` runs here: MPS tensors, or CPU tensors under the stand-in."""
    return t.device.type == "mps" or (_compiler is not None and t.device.type == "cpu")


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _compile_shader(op_name):
    if _compiler is not None:
        return _compiler
    if _torch_version() < _MIN_TORCH or not hasattr(torch.mps, "compile_shader"):
        raise RuntimeError(f"{op_name}: the Metal (MPS) backend needs torch >= 2.7 "
                           f"(torch.mps.compile_shader); this is torch {torch.__version__}")
    return torch.mps.compile_shader


def _library(variant, source, op_name):
    lib = _LIBRARIES.get(variant)
    if lib is None:
        compile_shader = _compile_shader(op_name)
        try:
            lib = compile_shader(source)
        except Exception as e:  # the Metal compiler's message is in e
            raise RuntimeError(f"{op_name}: compiling the Metal kernels of variant {variant} failed: {e}") from e
        _LIBRARIES[variant] = lib
    return lib


@functools.lru_cache(maxsize=1)
def _feature_names_and_defaults():
    """The ops' trailing feature arguments (_ops._FEATURE_SCHEMA), read from _ops so a
    feature added there is rejected here until the Metal kernels implement it (parsed once:
    the helpers below look values up several times per call)."""
    from . import _ops
    names = [part.split("=")[0].split()[-1] for part in _ops._FEATURE_SCHEMA.split(", ")]
    defaults = _ops._FEATURE_DEFAULTS
    if len(names) != len(defaults):
        names = [f"feature argument {i}" for i in range(len(defaults))]
    return names, defaults


# The feature arguments the Metal kernels implement (the rest must keep their defaults).
_DROPOUT_ORIGIN = ("dropout_row_offset", "dropout_col_offset", "dropout_head_offset", "dropout_heads")
_METAL_FEATURES = ("window_left", "window_right", "softcap", "alibi_slopes", "sink", "attn_mask", "cu_seqlens_q",
                   "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") + _DROPOUT_ORIGIN


def _feature_values(features):
    """{name: value} of the ops' feature arguments (defaults for those left out)."""
    names, defaults = _feature_names_and_defaults()
    return dict(zip(names, (*features, *defaults[len(features):])))


def _dropout_origin(features):
    """(row offset, col offset, head offset, heads) of the dropout index: the ops'
    dropout_* feature arguments (0s when left out)."""
    values = _feature_values(features)
    return tuple(int(values.get(n, 0)) for n in _DROPOUT_ORIGIN)


def _score_mods(features, causal, sq, sk):
    """(causal, window (left, right), softcap) in the core's normal form (core/attention.cpp's
    set_problem): causal is right = 0, and a bound no row can reach is unbounded."""
    values = _feature_values(features)
    left, right = int(values.get("window_left", -1)), int(values.get("window_right", -1))
    reach = sq + sk
    left = -1 if left >= reach else left
    right = 0 if causal else (-1 if right >= reach else right)
    return right == 0, (left, right), float(values.get("softcap", 0.0) or 0.0)


def _alibi(features, q, b, hq, op_name):
    """The ALiBi slopes as the kernels read them (fp32, unit head stride; one staged copy
    otherwise) and their batch stride, or (None, -1) without ALiBi."""
    slopes = _feature_values(features).get("alibi_slopes")
    if slopes is None:
        return None, -1
    if slopes.dtype != torch.float32:
        raise ValueError(f"{op_name}: alibi_slopes must be float32, got {slopes.dtype}")
    if tuple(slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"{op_name}: alibi_slopes must have shape ({hq},) or ({b}, {hq}), got "
                         f"{tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"{op_name}: alibi_slopes must be on q's device ({q.device}), got {slopes.device}")
    if slopes.stride(-1) != 1 and hq > 1:
        slopes = slopes.contiguous()
    return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0)


def _attn_mask(features, q, k, op_name):
    """SDPA's attn_mask as the kernels read it: (tensor, its dtype's name, element strides of
    (batch, head, row, col), 0 for a size-1 dim), or None. The tensor is bound in place (a bool
    mask as its uint8 view); the kernels take it in one of three buffers by dtype."""
    mask = _feature_values(features).get("attn_mask")
    if mask is None:
        return None
    want = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])  # (b, hq, sq, sk)
    if mask.dim() != 4 or any(m not in (w, 1) for m, w in zip(mask.shape, want)):
        raise ValueError(f"{op_name}: attn_mask of shape {tuple(mask.shape)} does not broadcast to {want}")
    if mask.dtype not in (torch.bool, q.dtype, torch.float32):
        allowed = ["bool", str(q.dtype).replace("torch.", "")] + (["float32"] if q.dtype != torch.float32 else [])
        raise ValueError(f"{op_name}: attn_mask must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{op_name}: attn_mask must be on q's device ({q.device}), got {mask.device}")
    strides = tuple(0 if n == 1 else st for n, st in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return mask.detach().view(torch.uint8), "bool", strides
    return mask.detach(), _SUPPORTED[mask.dtype], strides


def _mask_buffers(mask, stand_ins):
    """The three attn_mask buffers (bool / elem_t / fp32): the mask in the one its dtype names
    (pack_meta's kind: bool; q's dtype; else fp32), stand-ins nothing reads in the others."""
    names = ("mask_bool", "mask_elem", "mask_float")
    buffers = dict(zip(names, stand_ins))
    if mask is not None:
        tensor, dtype, _ = mask
        elem = stand_ins[1].dtype
        buffers["mask_bool" if dtype == "bool" else "mask_elem" if tensor.dtype == elem else "mask_float"] = tensor
    return buffers


def _mask_meta(mask):
    return ("", 0, 0, 0, 0) if mask is None else (mask[1], *mask[2])


def _sink(features, q, hq, op_name):
    """The sink logits (fp32, (hq,), unit stride; one staged copy otherwise), or None."""
    sink = _feature_values(features).get("sink")
    if sink is None:
        return None
    if sink.dtype != torch.float32:
        raise ValueError(f"{op_name}: sink must be float32, got {sink.dtype}")
    if tuple(sink.shape) != (hq,):
        raise ValueError(f"{op_name}: sink must have shape ({hq},), got {tuple(sink.shape)}")
    if sink.device != q.device:
        raise ValueError(f"{op_name}: sink must be on q's device ({q.device}), got {sink.device}")
    return sink.detach() if sink.stride(0) == 1 or sink.shape[0] == 1 else sink.detach().contiguous()


def _check(q, k, v, features, op_name):
    """Everything that can be rejected before anything runs (ValueError /
    NotImplementedError with the op name in front)."""
    _compile_shader(op_name)  # torch version
    if features:
        names, defaults = _feature_names_and_defaults()
        if len(features) > len(defaults):
            raise NotImplementedError(f"{op_name}: unknown feature arguments for the Metal (MPS) backend")
        for name, value, default in zip(names, features, defaults):
            if name in _METAL_FEATURES:
                continue
            if (value is not None) if default is None else (value != default):
                raise NotImplementedError(f"{op_name}: {name} is not supported by the Metal (MPS) backend yet")
        values = _feature_values(features)
        left, right = values.get("window_left", -1), values.get("window_right", -1)
        if left < -1 or right < -1:
            raise ValueError(f"{op_name}: window_size values must be >= -1 (-1 = unbounded), got ({left}, {right})")
        softcap = float(values.get("softcap", 0.0) or 0.0)
        if not (softcap >= 0.0 and math.isfinite(softcap)):
            raise ValueError(f"{op_name}: softcap must be a finite value >= 0, got {softcap}")
        row, col, head, heads = _dropout_origin(features)
        hq = q.shape[-2] if q.dim() >= 3 else 0
        if min(row, col, head, heads) < 0 or (heads > 0 and head + hq > heads):
            raise ValueError(f"{op_name}: dropout offsets must be >= 0 with head offset + heads <= dropout_heads, "
                             f"got row {row}, col {col}, head {head}, heads {heads}")
    varlen = _varlen(features)
    rank, layout = (3, "(total, heads, head_dim)") if varlen else (4, "(batch, seq, heads, head_dim)")
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise ValueError(f"{op_name}: q, k, v must be rank {rank} {layout} on MPS")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op_name}: the Metal (MPS) backend supports float16, bfloat16 and float32 "
                         f"(q, k, v of one dtype), got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, width in (("head dim", int(q.shape[-1])), ("value head dim", int(v.shape[-1]))):
        why = _C.metal_check_support(_SUPPORTED[q.dtype], width)
        if why:
            raise ValueError(f"{op_name}: {why}" + ("" if name == "head dim" else " (the value head dim)"))
    hq, d = q.shape[-2], q.shape[-1]
    if varlen:
        _check_varlen(varlen, q, k, features, op_name)
        if k.shape[-1] != d or k.shape[:2] != v.shape[:2]:
            raise ValueError(f"{op_name}: k must be (total_k, kv_heads, {d}) like q's head dim, and v (total_k, "
                             f"kv_heads, value head dim) like k, got {tuple(k.shape)} and {tuple(v.shape)}")
    elif (k.shape[0], k.shape[3]) != (q.shape[0], d) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{op_name}: k must be (batch, seq_k, kv_heads, {d}) like q's batch and head dim, and v "
                         f"(batch, seq_k, kv_heads, value head dim) like k, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[-2] == 0 or hq % k.shape[-2] != 0:
        raise ValueError(f"{op_name}: number of query heads ({hq}) must be a multiple of key/value heads "
                         f"({k.shape[-2]})")


def _varlen(features):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a varlen call, or None."""
    values = _feature_values(features)
    if values.get("cu_seqlens_q") is None and values.get("cu_seqlens_k") is None:
        return None
    return (values.get("cu_seqlens_q"), values.get("cu_seqlens_k"), int(values.get("max_seqlen_q", 0)),
            int(values.get("max_seqlen_k", 0)))


def _check_varlen(varlen, q, k, features, op_name):
    """The offsets' form and values (functional's checks: one device -> host copy on MPS; the
    kernels index the packed tensors with them, and orchard._ops callers skip functional), and
    what varlen cannot combine with."""
    cu_q, cu_k, max_q, max_k = varlen
    if cu_q is None or cu_k is None:
        raise ValueError(f"{op_name}: cu_seqlens_q and cu_seqlens_k must be given together (varlen)")
    if _feature_values(features).get("attn_mask") is not None:
        raise NotImplementedError(f"{op_name}: attn_mask cannot be combined with varlen")
    from .functional import _check_cu_seqlens  # the checks flash_attn_varlen_func runs
    _check_cu_seqlens(op_name, "cu_seqlens_q", cu_q, q.shape[0], max_q, q.device)
    _check_cu_seqlens(op_name, "cu_seqlens_k", cu_k, k.shape[0], max_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{op_name}: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_q.numel()} and {cu_k.numel()}")


def _dims(q, k, v, features):
    """(b, sq, sk, hq, hkv, d, d_v, varlen): sq / sk the max lengths of a varlen call."""
    varlen = _varlen(features)
    if varlen:
        cu_q, _, max_q, max_k = varlen
        return cu_q.numel() - 1, max_q, max_k, q.shape[1], k.shape[1], q.shape[2], v.shape[2], varlen
    return (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], None)


def _rows(t, varlen):
    """Element strides (batch, row, head) of q / k / v / out / dO / grads: a packed varlen
    tensor (total, heads, dim) has batch stride 0 (cu_seqlens place the sequences)."""
    return [0, t.stride(0), t.stride(1)] if varlen else [t.stride(0), t.stride(1), t.stride(2)]


def _readable(name, t, staged, op_name, direction):
    """The kernels read any strides but need a unit last-dim stride; anything else
    gets one staged copy (logged), as the C++ bridge does for the other backends."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        _profile(op_name, direction, name, t, "zero-copy")
        return t
    staged.append(name)
    _profile(op_name, direction, name, t, "staged (last-dim stride != 1)")
    return t.contiguous()


def _storage_mode(t):
    if t.device.type != "mps":
        return "cpu (emulated MPS)"
    # Inferred from torch's MPS allocator, which PyTorch does not expose: tensors are in
    # private storage before 2.12 and shared from 2.12 on. Either way they are bound
    # zero-copy (MTLBuffer + offset).
    return "shared" if _torch_version() >= (2, 12) else "private"


def _profile(op_name, direction, name, t, decision):
    if not _C.metal_tensor_profile_enabled():
        return
    shape = ", ".join(str(s) for s in t.shape)
    strides = ", ".join(str(s) for s in t.stride())
    dtype = str(t.dtype).replace("torch.", "")
    _C.metal_tensor_profile_line(f"{op_name} {direction} {name}: {dtype}[{shape}] strides [{strides}] mps "
                                 f"storage={_storage_mode(t)} -> {decision}")


def _signed64(x):
    x = int(x) & 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= _U63 else x


def _rng_tensor(rng_state, seed, offset, dropout_p, meta):
    """The int64 (seed, offset) buffer; without dropout the kernels never read it, and
    `meta` stands in (no allocation)."""
    if dropout_p <= 0.0:
        return meta
    if rng_state is not None:
        return rng_state
    return torch.tensor([_signed64(seed), _signed64(offset)], dtype=torch.int64).to(meta.device)


def _empty_like_unit_last(t):
    """Output like t (its layout when dense), with the unit last-dim stride the kernels write."""
    e = torch.empty_like(t)
    return e if e.dim() == 0 or e.stride(-1) == 1 or e.shape[-1] == 1 else torch.empty(t.shape, dtype=t.dtype,
                                                                                       device=t.device)


def _synchronize(device):
    if device.type == "mps":
        torch.mps.synchronize()


def _dispatch(lib, plan, buffers, log):
    """Calls each (kernel, groups, threads) of plan with its buffers in declaration order."""
    device = buffers["meta"].device
    timed = log is not None
    if timed:
        _synchronize(device)
        t0 = time.perf_counter()
    for kernel, groups, threads in plan:
        if groups == 0:
            continue
        args = [buffers[name] for name in _KERNEL_ARGS[kernel]]
        getattr(lib, kernel)(*args, threads=groups * threads, group_size=threads)
    if timed:
        _synchronize(device)
        log(f"{(time.perf_counter() - t0) * 1e3:.4f}")


def _log_line(direction, op_name, sizes, dtype, causal, causal_offset, dropout_p, scale, variant, staged,
              window=(-1, -1), softcap=0.0, alibi=False, sink=False, d_v=None, attn_mask=None, varlen=None):
    if not _C.metal_debug_log_enabled():
        return None
    call = _C.metal_next_call_number()
    b, sq, sk, hq, hkv, d = sizes
    causal_text = f"1(offset {causal_offset})" if causal else "0"
    # The score modifiers as the C++ core's problem_summary spells them.
    mods = f" window=({window[0]},{window[1]})" if window[0] >= 0 or window[1] > 0 else ""
    mods += f" softcap={softcap:g}" if softcap > 0 else ""
    mods += " alibi=1" if alibi else ""
    mods += " sink=1" if sink else ""
    mods += f" attn_mask={'uint8' if attn_mask[1] == 'bool' else attn_mask[1]}" if attn_mask is not None else ""
    mods += " varlen=1" if varlen else ""
    mods += f" d_v={d_v}" if d_v is not None and d_v != d else ""
    head = (f"{direction} #{call} op={op_name} b={b} sq={sq} sk={sk} hq={hq} hkv={hkv} d={d} "
            f"dtype={dtype} causal={causal_text}{mods} dropout={dropout_p:g} scale={scale:g} backend=mps "
            f"variant={variant} staged={staged} elapsed_ms=")
    return lambda elapsed: _C.metal_debug_log_line(head + elapsed)


def _meta(sizes, strides, lse_strides, causal, causal_offset, dropout_p, scale, write_mask, device,
          dropout_origin=(0, 0, 0, 0), window=(-1, -1), softcap=0.0, alibi_batch_stride=-1, sink=False, d_v=0,
          dtype="float32", mask=None, varlen=False, top_left=False):
    values = _C.metal_meta(sizes, strides, lse_strides, bool(causal), int(causal_offset), float(dropout_p),
                           float(scale), bool(write_mask), dropout_origin, window, softcap, alibi_batch_stride,
                           sink, d_v, dtype, _mask_meta(mask), bool(varlen), bool(top_left))
    # One small host-to-device copy per call: Metal has 31 buffer slots, the kernels need
    # some 60 scalars, and compile_shader passes Python scalars one slot each.
    return torch.tensor(values, dtype=torch.int64).to(device)


def _varlen_buffers(varlen, meta):
    """cu_q / cu_k for the kernels: the offsets, or an int32 stand-in nothing reads."""
    stand_in = meta.view(torch.int32)
    return {"cu_q": varlen[0] if varlen else stand_in, "cu_k": varlen[1] if varlen else stand_in}


def _lse_strides(lse, varlen):
    """(batch, head) strides of the LSE: (b, hq, sq), or (hq, total_q) for varlen."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def forward(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset, return_mask,
            op_name="orchard.flash_attn", rng_state=None, features=()):
    """The MPS forward: (out, lse, mask) like _ops._forward_kernel."""
    _check(q, k, v, features, op_name)
    b, sq, sk, hq, hkv, d, dv, varlen = _dims(q, k, v, features)
    slopes, alibi_batch_stride = _alibi(features, q, b, hq, op_name)
    sink = _sink(features, q, hq, op_name)
    attn_mask = _attn_mask(features, q, k, op_name)
    out = (_empty_like_unit_last(q) if dv == d
           else torch.empty(*q.shape[:-1], dv, dtype=q.dtype, device=q.device))
    lse = torch.empty(*((hq, q.shape[0]) if varlen else (b, hq, sq)), dtype=torch.float32, device=q.device)
    if varlen:  # rows no sequence owns (before cu_seqlens_q[0], from cu_seqlens_q[-1]) get no kernel's
        # write: 0 / -inf, as on CPU / CUDA
        out.zero_()
        lse.fill_(float("-inf"))
    write_mask = bool(return_mask) and dropout_p > 0.0
    if return_mask:
        # varlen: (b, hq, max sq, max sk), entries past a sequence's lengths 0 (as the CPU backend)
        mask = (torch.zeros if varlen and write_mask else torch.empty)(b, hq, sq, sk, dtype=torch.uint8,
                                                                       device=q.device)
        if not write_mask:
            mask.fill_(1)  # no dropout: everything is kept
    else:
        mask = torch.empty(0, dtype=torch.uint8, device=q.device)
    if b == 0 or sq == 0 or hq == 0:
        return out, lse, mask

    staged = []
    q_, k_, v_ = (_readable(n, t, staged, op_name, "fwd") for n, t in (("q", q), ("k", k), ("v", v)))
    _profile(op_name, "fwd", "out", out, "zero-copy")
    _profile(op_name, "fwd", "lse", lse, "zero-copy")
    causal, window, softcap = _score_mods(features, causal, sq, sk)
    causal_offset = 0 if causal_top_left else sk - sq
    sizes = (b, sq, sk, hq, hkv, d)
    dtype = _SUPPORTED[q.dtype]
    variant, source = _C.metal_variant(dtype, max(d, dv))
    strides = _rows(q_, varlen) + _rows(k_, varlen) + _rows(v_, varlen) + _rows(out, varlen) + [0] * 12
    meta = _meta(sizes, strides, _lse_strides(lse, varlen), causal, causal_offset, dropout_p, softmax_scale,
                 write_mask, q.device, _dropout_origin(features), window, softcap, alibi_batch_stride,
                 sink is not None, dv, dtype, attn_mask, varlen is not None, causal_top_left)
    buffers = {"q": q_, "k": k_, "v": v_, "out": out, "lse": lse,
               "mask": mask if write_mask else torch.empty(1, dtype=torch.uint8, device=q.device),
               "rng": _rng_tensor(rng_state, seed, offset, dropout_p, meta), "meta": meta,
               # lse: a float32 stand-in for an absent buffer (meta says the kernels skip it)
               "alibi": lse if slopes is None else slopes, "sink": lse if sink is None else sink}
    buffers.update(_mask_buffers(attn_mask, (buffers["mask"], q_, lse)))
    buffers.update(_varlen_buffers(varlen, meta))
    log = _log_line("FWD", op_name, sizes, dtype, causal, causal_offset, dropout_p, softmax_scale, variant,
                    len(staged), window, softcap, slopes is not None, sink is not None, dv, attn_mask, varlen)
    _dispatch(_library(variant, source, op_name), _C.metal_plan("fwd", dtype, sizes, dv), buffers, log)
    return out, lse, mask


def backward(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
             op_name="orchard.flash_attn", rng_state=None, features=()):
    """The MPS backward: (dq, dk, dv) like _ops._backward_kernel (deterministic: no atomics)."""
    _check(q, k, v, features, op_name)
    b, sq, sk, hq, hkv, d, dv_width, varlen = _dims(q, k, v, features)
    slopes, alibi_batch_stride = _alibi(features, q, b, hq, op_name)
    attn_mask = _attn_mask(features, q, k, op_name)
    dq, dk, dv = _empty_like_unit_last(q), _empty_like_unit_last(k), _empty_like_unit_last(v)
    if b == 0 or hq == 0 or (sq == 0 and sk == 0):
        return dq, dk, dv
    if varlen:
        dk.zero_(), dv.zero_()  # rows no sequence owns (outside the cu_seqlens_k range) get no kernel's write
        dq.zero_()
    if (dout.shape != out.shape or out.shape != (*q.shape[:-1], dv_width) or dout.dtype != q.dtype
            or out.dtype != q.dtype):
        raise ValueError(f"{op_name}: dout and out must be shaped like q with the value head dim, of q's dtype")
    lse_shape = (hq, q.shape[0]) if varlen else (b, hq, sq)
    if lse.dtype != torch.float32 or tuple(lse.shape) != lse_shape or (lse.shape[-1] > 1 and lse.stride(-1) != 1):
        raise ValueError(f"{op_name}: lse must be float32 {lse_shape} with a unit row stride")

    staged = []
    named = (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout))
    q_, k_, v_, out_, dout_ = (_readable(n, t, staged, op_name, "bwd") for n, t in named)
    for n, t in (("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        _profile(op_name, "bwd", n, t, "zero-copy")
    causal, window, softcap = _score_mods(features, causal, sq, sk)
    causal_offset = 0 if causal_top_left else sk - sq
    sizes = (b, sq, sk, hq, hkv, d)
    dtype = _SUPPORTED[q.dtype]
    variant, source = _C.metal_variant(dtype, max(d, dv_width))
    strides = [x for t in (q_, k_, v_, out_, dout_, dq, dk, dv) for x in _rows(t, varlen)]
    meta = _meta(sizes, strides, _lse_strides(lse, varlen), causal, causal_offset, dropout_p, softmax_scale, False,
                 q.device, _dropout_origin(features), window, softcap, alibi_batch_stride, False, dv_width, dtype,
                 attn_mask, varlen is not None, causal_top_left)
    buffers = {"q": q_, "k": k_, "v": v_, "out": out_, "dout": dout_, "lse": lse,
               "delta": torch.empty(max(1, b * hq * sq), dtype=torch.float32, device=q.device),
               "dq": dq, "dk": dk, "dv": dv, "rng": _rng_tensor(rng_state, seed, offset, dropout_p, meta),
               "meta": meta, "alibi": lse if slopes is None else slopes}
    buffers.update(_mask_buffers(attn_mask, (meta.view(torch.uint8), q_, lse)))
    buffers.update(_varlen_buffers(varlen, meta))
    log = _log_line("BWD", op_name, sizes, dtype, causal, causal_offset, dropout_p, softmax_scale, variant,
                    len(staged), window, softcap, slopes is not None, False, dv_width, attn_mask, varlen)
    _dispatch(_library(variant, source, op_name), _C.metal_plan("bwd", dtype, sizes, dv_width), buffers, log)
    return dq, dk, dv
