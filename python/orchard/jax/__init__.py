"""Orchard for JAX: ``orchard.jax.flash_attention``.

Orchard's C++ core runs as an XLA custom call through JAX's FFI
(``jax.ffi.ffi_call``; the handlers are ``orchard._jax_ffi``, built when jax is
installed at build time), with a ``jax.custom_vjp`` whose backward is Orchard's
fused backward. It is jit-, grad- and vmap-able (vmap runs the call once per
mapped element). No copies: XLA hands the custom call its buffers.

Platforms: CPU and CUDA (Orchard's CUDA kernels on XLA's stream, on XLA's
device buffers; the backward's workspace from XLA's scratch allocator). XLA picks
the handler of the platform it compiles for. The options are causal
(bottom-right aligned, as flash-attn), softmax scale, sliding window, softcap,
ALiBi, attention sinks (differentiable), an additive bias (differentiable) or
boolean mask broadcastable to (batch, heads, seqlen_q, seqlen_k), dropout (its
mask drawn from a jax.random key) and the deterministic backward;
``flash_attention_varlen`` takes packed sequences with cu_seqlens, as
flash-attn's ``flash_attn_varlen_func``.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

try:
    from .. import _jax_ffi
except ImportError as e:  # built without jax available
    raise ImportError("orchard.jax: this orchard build has no JAX FFI module (orchard._jax_ffi); "
                      "install jax, then rebuild/reinstall orchard (pip install .)") from e

__all__ = ["flash_attention", "flash_attention_varlen", "flash_attn_with_kvcache", "cuda_compiled"]

_OP = "orchard.jax.flash_attention"

# Whether the CUDA handlers are registered (False: a jit compiled for a GPU fails in XLA
# with "no registered implementation for platform CUDA"). Their first H200 run failed
# every backward: it asked XLA's scratch allocator for 256-byte alignment, which XLA's
# FFI refuses above 16. Fixed, the GPU tests passed on the H200 (jax 0.11.2,
# dev/jax_cuda_check.sh). (The debug-log crash seen then was the core's iostream log
# lines, fixed in core/logging.h.)
CUDA_HANDLERS_ENABLED = True

# One registration per platform ("cpu", "CUDA"); jax defers a platform's
# registration until its plugin loads, so this is safe on a CPU-only jaxlib.
for _platform, _targets in _jax_ffi.handlers().items():
    if _platform.lower() != "cpu" and not CUDA_HANDLERS_ENABLED:
        continue
    for _name, _capsule in _targets.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)


def cuda_compiled() -> bool:
    """Whether this orchard build has its CUDA backend (else the CUDA handlers
    raise an error naming the cause)."""
    return bool(_jax_ffi.cuda_compiled())


# A call's static settings (the handlers' attributes; hashable for custom_vjp).
_Settings = collections.namedtuple(
    "_Settings", "scale causal window softcap dropout_p max_seqlen_q max_seqlen_k deterministic")


def _attrs(st: _Settings):
    return dict(softmax_scale=np.float64(st.scale), causal=np.int32(bool(st.causal)),
                window_left=np.int64(st.window[0]), window_right=np.int64(st.window[1]),
                softcap=np.float64(st.softcap), dropout_p=np.float64(st.dropout_p),
                max_seqlen_q=np.int64(st.max_seqlen_q), max_seqlen_k=np.int64(st.max_seqlen_k),
                deterministic=np.int32(bool(st.deterministic)))


def _lse_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _default_scale(head_dim: int) -> float:
    # head_dim 0 is invalid: a placeholder, so that the core raises its op-prefixed error
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _absent(dtype=jnp.float32):
    """An optional operand that is not there: a buffer with no elements."""
    return jnp.zeros((0,), dtype)


def _forward_call(q, k, v, extras, st):
    hq = q.shape[-2]
    if st.max_seqlen_q:  # varlen: (total, heads, dim), lse (hq, total_q)
        out_shape, lse_shape = (*q.shape[:-1], v.shape[-1]), (hq, q.shape[0])
    else:
        b, sq = q.shape[:2]
        out_shape, lse_shape = (b, sq, hq, v.shape[-1]), (b, hq, sq)
    out_types = (jax.ShapeDtypeStruct(out_shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, _lse_dtype(q.dtype)))
    call = jax.ffi.ffi_call("orchard_flash_forward", out_types, vmap_method="sequential")
    return call(q, k, v, *extras, **_attrs(st))


def _backward_call(q, k, v, out, lse, dout, extras, st):
    sink = extras[1]
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(sink.shape, jnp.float32))
    call = jax.ffi.ffi_call("orchard_flash_backward", out_types, vmap_method="sequential")
    return call(q, k, v, out, lse, dout, *extras, **_attrs(st))


def _bias_grad(q, k, v, out, dout, lse, extras, st):
    """The gradient of a float bias: dBias = dS = P * (dO V^T - rowsum(dO * O)), the gradient
    of the final score (the bias is added last, after the scale, softcap and ALiBi), with P
    recomputed from the forward's LSE; summed over the dims the bias broadcast along. Not
    fused (as the torch path's attn_bias_grad): only a bias that is differentiated pays for
    it, and under jit XLA drops it when nothing uses the gradient."""
    alibi, _, bias = extras[:3]
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    q, k, v, out, dout = (t.astype(acc) for t in (q, k, v, out, dout))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    sq, sk = q.shape[1], k.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * st.scale
    if st.softcap > 0:
        s = st.softcap * jnp.tanh(s / st.softcap)
    i = jnp.arange(sq)[:, None] + (sk - sq)  # bottom-right aligned diagonal
    j = jnp.arange(sk)[None, :]
    if alibi.size:
        slopes = alibi.astype(acc).reshape((-1, alibi.shape[-1]))[:, :, None, None]  # (1 or b, h, 1, 1)
        s = s - slopes * jnp.abs(i - j).astype(acc)
    s = s + bias.astype(acc)
    visible = jnp.ones((sq, sk), bool)
    if st.causal:
        visible &= j <= i
    if st.window[0] >= 0:
        visible &= j >= i - st.window[0]
    if st.window[1] >= 0:
        visible &= j <= i + st.window[1]
    l = lse.astype(acc)[..., None]
    p = jnp.where(visible & jnp.isfinite(l), jnp.exp(s - l), 0.0)
    dp = jnp.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - jnp.einsum("bqhd,bqhd->bhq", dout, out)[..., None])
    axes = tuple(a for a in range(4) if bias.shape[a] == 1 and ds.shape[a] != 1)
    return jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, extras, st):
    return _forward_call(q, k, v, extras, st)[0]


def _flash_fwd(q, k, v, extras, st):
    out, lse = _forward_call(q, k, v, extras, st)
    return out, (q, k, v, out, lse, extras)


def _flash_bwd(st, res, dout):
    q, k, v, out, lse, extras = res
    dout = dout.astype(out.dtype)
    dq, dk, dv, dsink = _backward_call(q, k, v, out, lse, dout, extras, st)
    alibi, sink, bias, cu_q, cu_k, rng = extras
    dbias = (_bias_grad(q, k, v, out, dout, lse, extras, st)
             if bias.size and jnp.issubdtype(bias.dtype, jnp.floating) else None)
    # No gradient for the ALiBi slopes (as flash-attn), the mask, the offsets or the RNG state.
    return dq, dk, dv, (None, dsink.astype(sink.dtype) if sink.size else None, dbias, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_4d(name, t, ndim=4, what="(batch, seqlen, heads, head_dim)"):
    if getattr(t, "ndim", None) != ndim:
        raise ValueError(f"{_OP}: {name} must be {ndim}-D {what}, got shape {getattr(t, 'shape', None)}")


def _extras(q, hq, alibi_slopes, sink, bias, mask, cu_q, cu_k, dropout_p, dropout_rng, sq, sk, b):
    """The optional operands (absent ones as empty buffers) and the checks the core cannot
    make from inside a jitted call's abstract values."""
    if dropout_p > 0.0:
        if dropout_rng is None:
            raise ValueError(f"{_OP}: dropout_p > 0 needs dropout_rng (a jax.random key)")
        # 2 x uint64 (seed, offset) for the kernels, drawn as 4 x uint32 (no x64 needed).
        rng = jax.random.bits(dropout_rng, (4,), jnp.uint32)
    else:
        rng = _absent(jnp.uint32)
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise ValueError(f"{_OP}: mask must be boolean (True = may attend), got {jnp.asarray(mask).dtype}; "
                         "pass an additive mask as bias")
    if bias is not None and mask is not None:
        # One operand for both (as jax.nn.dot_product_attention applies them): the mask folds
        # into the bias, which then takes their broadcast shape.
        bias = jnp.where(mask, bias, -jnp.inf)
        mask = None
    attn = bias if bias is not None else mask
    if attn is not None:
        attn = jnp.asarray(attn)
        if attn.ndim > 4:
            raise ValueError(f"{_OP}: bias / mask must have at most 4 dims (batch, heads, seqlen_q, "
                             f"seqlen_k), got shape {attn.shape}")
        attn = attn.reshape((1,) * (4 - attn.ndim) + attn.shape)
        for dim, n, name in zip(attn.shape, (b, hq, sq, sk), ("batch", "heads", "seqlen_q", "seqlen_k")):
            if dim not in (1, n):
                raise ValueError(f"{_OP}: bias / mask shape {attn.shape} does not broadcast to "
                                 f"(batch, heads, seqlen_q, seqlen_k) = {(b, hq, sq, sk)} ({name})")
        if attn.dtype == jnp.bool_:
            pass  # read as uint8 in place
        elif attn.dtype not in (q.dtype, jnp.float32):
            attn = attn.astype(jnp.float32)
        if dropout_p > 0.0 and jnp.issubdtype(attn.dtype, jnp.floating) and bias is not None:
            raise ValueError(f"{_OP}: dropout with a float bias is not supported (its gradient "
                             "would need the dropout mask); use a boolean mask")
    f32 = lambda t: _absent() if t is None else jnp.asarray(t).astype(jnp.float32)  # noqa: E731
    return (f32(alibi_slopes), f32(sink), _absent() if attn is None else attn,
            _absent(jnp.int32) if cu_q is None else jnp.asarray(cu_q),
            _absent(jnp.int32) if cu_k is None else jnp.asarray(cu_k), rng)


def _settings(q, softmax_scale, causal, window_size, softcap, dropout_p, max_q=0, max_k=0,
              deterministic=False):
    scale = _default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    left, right = (int(w) for w in window_size)
    return _Settings(scale, bool(causal), (left, right), float(softcap), float(dropout_p), int(max_q),
                     int(max_k), bool(deterministic))


def _check_dtypes(q, k, v):
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, sink=None,
                    bias=None, mask=None, dropout_p: float = 0.0, dropout_rng=None,
                    deterministic: bool = False):
    """Fused attention on JAX arrays in flash-attn's layout.

    Args:
        q: (batch, seqlen_q, heads, head_dim); float16, bfloat16, float32 or
           float64 (with jax_enable_x64) on the CPU; float16, bfloat16 or float32
           on a CUDA GPU.
        k, v: (batch, seqlen_k, kv_heads, head_dim[_v]); heads % kv_heads == 0.
        causal: query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right,
           flash-attn's convention; the same as jax.nn.dot_product_attention's
           is_causal when seqlen_q == seqlen_k).
        softmax_scale: default 1/sqrt(head_dim).
        window_size: (left, right) sliding window; -1 = unbounded.
        softcap: > 0 applies softcap * tanh(scores / softcap).
        alibi_slopes: float32 (heads,) or (batch, heads): flash-attn's ALiBi bias
           -slope * |i + seqlen_k - seqlen_q - j|. No gradient (as flash-attn).
        sink: float32 (heads,): a per-head logit that joins every row's softmax
           without a value (gpt-oss's attention sinks); differentiable.
        bias: additive bias broadcastable to (batch, heads, seqlen_q, seqlen_k) (size-1
           dims read in place), added after the scale, softcap and ALiBi;
           differentiable (the gradient is summed over the broadcast dims).
        mask: bool, broadcastable like bias: True = may attend (with bias, both apply).
        dropout_p, dropout_rng: attention dropout with probability dropout_p, its
           mask drawn from the key dropout_rng (the same key gives the same mask;
           the backward uses the forward's).
        deterministic: a bitwise-reproducible backward.

    Returns:
        (batch, seqlen_q, heads, head_dim_v), q's dtype. Differentiable in q, k, v
        (and sink, bias).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t)
    _check_dtypes(q, k, v)
    st = _settings(q, softmax_scale, causal, window_size, softcap, dropout_p, deterministic=deterministic)
    ex = _extras(q, q.shape[2], alibi_slopes, sink, bias, mask, None, None, st.dropout_p, dropout_rng,
                 q.shape[1], k.shape[1], q.shape[0])
    return _flash(q, k, v, ex, st)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = False, softmax_scale: float | None = None, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, sink=None, dropout_p: float = 0.0,
                           dropout_rng=None, deterministic: bool = False):
    """Fused attention over packed sequences (flash-attn's ``flash_attn_varlen_func``).

    Args:
        q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim[_v]).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): sequence b is rows
           [cu[b], cu[b + 1]) (empty sequences allowed); causal is bottom-right
           aligned per sequence. Their values are checked where the call runs.
        max_seqlen_q, max_seqlen_k: Python ints >= every sequence's length.
        The other options as in flash_attention (no bias / mask).

    Returns:
        (total_q, heads, head_dim_v), q's dtype; rows past cu_seqlens_q[-1] are 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t, 3, "(total, heads, head_dim)")
    _check_dtypes(q, k, v)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if getattr(cu, "ndim", None) != 1 or cu.dtype != jnp.int32:
            raise ValueError(f"{_OP}: {name} must be a 1-D int32 array, got "
                             f"{getattr(cu, 'dtype', type(cu))} of shape {getattr(cu, 'shape', None)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{_OP}: cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    if int(max_seqlen_q) < 1 or int(max_seqlen_k) < 0:
        raise ValueError(f"{_OP}: max_seqlen_q must be >= 1 and max_seqlen_k >= 0, got "
                         f"{max_seqlen_q}, {max_seqlen_k}")
    st = _settings(q, softmax_scale, causal, window_size, softcap, dropout_p, max_seqlen_q, max_seqlen_k,
                   deterministic)
    ex = _extras(q, q.shape[1], alibi_slopes, sink, None, None, cu_seqlens_q, cu_seqlens_k, st.dropout_p,
                 dropout_rng, 0, 0, cu_seqlens_q.shape[0] - 1)
    return _flash(q, k, v, ex, st)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                            softcap: float = 0.0, rotary_interleaved: bool = True, alibi_slopes=None,
                            num_splits: int = 0, return_softmax_lse: bool = False,
                            check_device_indices: bool = True):
    """flash-attn's ``flash_attn_with_kvcache`` for JAX: attention of q over the KV cache after the
    new ``k`` / ``v`` (if given) are written into it at ``cache_seqlens``; the same arguments and
    semantics as ``orchard.flash_attn_with_kvcache`` (paged caches through ``block_table``, any
    page size that is a multiple of 16, rotary, ``cache_batch_idx``, ``cache_leftpad``, GQA, causal,
    windows, softcap, ALiBi, split-KV).

    JAX arrays are immutable, so the updated caches are returned: ``(out, k_cache, v_cache)``, or
    ``(out, lse, k_cache, v_cache)`` with ``return_softmax_lse`` (lse float32 (batch, heads,
    seqlen_q)). The results alias the cache operands, so under ``jax.jit`` with the caches donated
    (``donate_argnums``) XLA appends in place; otherwise it copies the caches first. Forward only
    (no gradient). ``check_device_indices``: on a GPU, read the index arrays back and check them
    before anything is written (one synchronisation per call), as the torch entry does.
    """
    op = "orchard.jax.flash_attn_with_kvcache"
    q, k_cache, v_cache = (jnp.asarray(t) for t in (q, k_cache, v_cache))
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"{op}: q must be (batch, seqlen, nheads, headdim), got shape {getattr(q, 'shape', None)}")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError(f"{op}: cache_batch_idx is not supported with a paged cache (block_table)")
    if (k is None) != (v is None):
        raise ValueError(f"{op}: k and v must be given together")
    if softmax_scale is not None and not math.isfinite(float(softmax_scale)):
        raise ValueError(f"{op}: softmax_scale must be finite, got {softmax_scale}")
    if isinstance(cache_seqlens, int):
        cache_seqlens = jnp.full((q.shape[0],), cache_seqlens, jnp.int32)
    b, sq, hq, _ = q.shape

    def values(t):  # k, v, rotary_cos / sin: as given
        return _absent(q.dtype) if t is None else jnp.asarray(t)

    def index(t):  # int32 offsets; another integer width (int64 under x64) is converted
        if t is None:
            return _absent(jnp.int32)
        t = jnp.asarray(t)
        return t.astype(jnp.int32) if jnp.issubdtype(t.dtype, jnp.integer) else t

    given = (k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes)
    operands = (q, k_cache, v_cache, *map(values, given[:4]), *map(index, given[4:8]),
                _absent() if alibi_slopes is None else jnp.asarray(alibi_slopes).astype(jnp.float32))
    # Which optional operands were given (bit i: given[i]): an empty one (no new rows, a
    # (batch, 0) block table) is still given, which the handler cannot tell from its size.
    present = sum(1 << i for i, t in enumerate(given) if t is not None)
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq) if return_softmax_lse else (0,), jnp.float32),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    call = jax.ffi.ffi_call("orchard_kvcache_forward", out_types, vmap_method="sequential",
                            input_output_aliases={1: 2, 2: 3})
    left, right = (int(w) for w in window_size)
    scale = _default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    attrs = dict(softmax_scale=np.float64(scale), causal=np.int32(bool(causal)), window_left=np.int64(left),
                 window_right=np.int64(right), softcap=np.float64(softcap),
                 rotary_interleaved=np.int32(bool(rotary_interleaved)), num_splits=np.int32(num_splits),
                 check_device_indices=np.int32(bool(check_device_indices)), present=np.int32(present))
    out, lse, k_new, v_new = _forward_only(op, lambda *xs: call(*xs, **attrs), *operands)
    return (out, lse, k_new, v_new) if return_softmax_lse else (out, k_new, v_new)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_only(op, fn, *operands):
    """fn(*operands), with a differentiation rule that names the op instead of JAX's generic "the
    FFI call cannot be differentiated"."""
    return fn(*operands)


@_forward_only.defjvp
def _forward_only_jvp(op, fn, primals, tangents):
    raise NotImplementedError(f"{op} is forward only (a decode step has no gradient); differentiate "
                              "orchard.jax.flash_attn_func or flash_attn_varlen_func for training")
