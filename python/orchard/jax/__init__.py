"""Orchard for JAX: ``orchard.jax.flash_attention``.

Orchard's C++ core runs as an XLA custom call through JAX's FFI
(``jax.ffi.ffi_call``; the handlers are ``orchard._jax_ffi``, built when jax is
installed at build time), with a ``jax.custom_vjp`` whose backward is Orchard's
fused backward. It is jit-, grad- and vmap-able (vmap runs the call once per
mapped element). No copies: XLA hands the custom call its buffers.

Platforms: CPU and CUDA (Orchard's CUDA kernels on XLA's stream, on XLA's
device buffers; the backward's workspace from XLA's scratch allocator). XLA picks
the handler of the platform it compiles for. The options are causal
(bottom-right aligned, as flash-attn), softmax scale, sliding window and
softcap. Not here yet: dropout, ALiBi, sinks, masks, varlen.
"""

from __future__ import annotations

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

__all__ = ["flash_attention", "cuda_compiled"]

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


def _attrs(scale, causal, window, softcap):
    return dict(softmax_scale=np.float64(scale), causal=np.int32(bool(causal)),
                window_left=np.int64(window[0]), window_right=np.int64(window[1]),
                softcap=np.float64(softcap))


def _lse_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _forward_call(q, k, v, scale, causal, window, softcap):
    b, sq, hq, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[-1]), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq), _lse_dtype(q.dtype)))
    call = jax.ffi.ffi_call("orchard_flash_forward", out_types, vmap_method="sequential")
    return call(q, k, v, **_attrs(scale, causal, window, softcap))


def _backward_call(q, k, v, out, lse, dout, scale, causal, window, softcap):
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype))
    call = jax.ffi.ffi_call("orchard_flash_backward", out_types, vmap_method="sequential")
    return call(q, k, v, out, lse, dout, **_attrs(scale, causal, window, softcap))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, scale, causal, window, softcap):
    return _forward_call(q, k, v, scale, causal, window, softcap)[0]


def _flash_fwd(q, k, v, scale, causal, window, softcap):
    out, lse = _forward_call(q, k, v, scale, causal, window, softcap)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, causal, window, softcap, res, dout):
    q, k, v, out, lse = res
    return _backward_call(q, k, v, out, lse, dout.astype(out.dtype), scale, causal, window, softcap)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    window_size=(-1, -1), softcap: float = 0.0):
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

    Returns:
        (batch, seqlen_q, heads, head_dim_v), q's dtype. Differentiable in q, k, v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if getattr(t, "ndim", None) != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D (batch, seqlen, heads, head_dim), got "
                             f"shape {getattr(t, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    scale = (1.0 / math.sqrt(d) if d > 0 else 1.0) if softmax_scale is None else float(softmax_scale)
    left, right = (int(w) for w in window_size)
    return _flash(q, k, v, scale, bool(causal), (left, right), float(softcap))
