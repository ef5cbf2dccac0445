"""Orchard for JAX: ``orchard.jax.flash_attention``.

Orchard's C++ core runs as an XLA custom call through JAX's FFI
(``jax.ffi.ffi_call``; the handlers are ``orchard._jax_ffi``, built when jax is
installed at build time), with a ``jax.custom_vjp`` whose backward is Orchard's
fused backward. It is jit-, grad- and vmap-able (vmap runs the call once per
mapped element). No copies: XLA hands the custom call its buffers.

Platforms: CPU only for now. CUDA handlers (the CUDA kernels on XLA's stream
with XLA's device buffers) are written but disabled: they failed their first GPU
test run (see CUDA_HANDLERS_ENABLED below); GPU arrays raise NotImplementedError. The options are causal (bottom-right aligned, as flash-attn), softmax
scale, sliding window and softcap. Not here yet: dropout, ALiBi, sinks, masks,
varlen.
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

# The CUDA handlers exist (orchard._jax_ffi) but are NOT registered: on their first
# GPU run (H200, 2026-11-30) five of the JAX CUDA tests failed and the sixth crashed
# the process (segfault inside the custom call), and there was no device time left to
# find out why. Until they pass, orchard.jax runs on the CPU only: concrete GPU arrays
# are refused with NotImplementedError below, and a jit compiled for a GPU fails in
# XLA with "no registered implementation for platform CUDA" (an error, never a wrong
# answer). Set True only together with a green `pytest -m cuda tests/python/test_jax.py`.
CUDA_HANDLERS_ENABLED = False

# One registration per platform ("cpu", "CUDA"); jax defers a platform's
# registration until its plugin loads, so this is safe on a CPU-only jaxlib.
for _platform, _targets in _jax_ffi.handlers().items():
    if _platform.lower() != "cpu" and not CUDA_HANDLERS_ENABLED:
        continue
    for _name, _capsule in _targets.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)


def _refuse_gpu_arrays(*arrays):
    if CUDA_HANDLERS_ENABLED:
        return
    for t in arrays:
        try:
            platforms = {d.platform for d in t.devices()}
        except Exception:  # tracers (inside jit / grad) carry no devices
            continue
        if platforms - {"cpu"}:
            raise NotImplementedError(
                f"{_OP}: arrays on {sorted(platforms)} are not supported: the JAX CUDA handlers are "
                "disabled (they failed their first GPU test run); move the arrays to the CPU "
                "(jax.device_put(x, jax.devices('cpu')[0])) or use orchard's PyTorch API on the GPU")


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
    _refuse_gpu_arrays(q, k, v)
    d = q.shape[-1]
    scale = (1.0 / math.sqrt(d) if d > 0 else 1.0) if softmax_scale is None else float(softmax_scale)
    left, right = (int(w) for w in window_size)
    return _flash(q, k, v, scale, bool(causal), (left, right), float(softcap))
