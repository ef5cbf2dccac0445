"""Orchard: fused FlashAttention forward + backward for training.

Public API:

* :func:`flash_attn_func` — flash-attn 2 drop-in, (batch, seq, heads, dim),
  bottom-right causal, GQA, sliding windows, softcap, ALiBi, sinks; and its
  varlen / packed forms (:func:`flash_attn_varlen_func`, ...).
* :func:`combine_attention` — merge partial results over disjoint key sets.
* :func:`scaled_dot_product_attention` — ``torch.nn.functional`` drop-in,
  (..., heads, seq, dim), top-left causal, ``enable_gqa``.
* ``torch.ops.orchard.flash_attn_forward`` / ``flash_attn_backward`` — the
  underlying ``torch.library`` custom ops (torch.compile / opcheck clean).
* :func:`build_info` — how this build was compiled.

The C++ core links no PyTorch: tensors cross as DLPack views (zero-copy; BHSD
tensors as permuted views), the current CUDA stream as an integer.

Environment variables: ``ORCHARD_DEBUG_FLASH_ATN=1`` appends one line per kernel
call (shapes, dtype, backend, kernel variant, staged copies, elapsed ms) to
``orchard_flash_attn_<pid>.log`` in the temp dir (or ``ORCHARD_LOG_DIR``);
``ORCHARD_TENSOR_PROFILE=1`` prints, per tensor, shape, strides, memory kind and
zero-copy vs staged (and why) to stderr.

Command line: ``python -m orchard doctor`` (environment + self-check) and
``python -m orchard demo`` (train a small transformer LM through Orchard).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _C  # noqa: F401  (the nanobind extension; fails loudly if unbuilt)

try:
    import torch as _torch  # noqa: F401
except ImportError as _e:  # the C++ core (orchard._C) serves NumPy & co. without torch
    _TORCH_IMPORT_ERROR = _e

    def _needs_torch(*_args, **_kwargs):
        raise ImportError("orchard's PyTorch API needs torch (pip install torch); "
                          "orchard._C works on any DLPack array without it") from _TORCH_IMPORT_ERROR

    flash_attn_func = scaled_dot_product_attention = combine_attention = _needs_torch
    flash_attn_varlen_func = flash_attn_qkvpacked_func = flash_attn_kvpacked_func = _needs_torch
    flash_attn_varlen_qkvpacked_func = flash_attn_varlen_kvpacked_func = _needs_torch
    flash_attn_with_kvcache = _needs_torch

    class OrchardShapeError(ValueError, RuntimeError):
        pass
else:
    from . import _ops  # noqa: F401  (registers torch.ops.orchard.*)
    from . import _autocast  # noqa: F401  (torch.autocast: the ops take the autocast dtype)
    from .combine import combine_attention
    from .kvcache import flash_attn_with_kvcache
    from .functional import (
        OrchardShapeError,
        flash_attn_func,
        flash_attn_kvpacked_func,
        flash_attn_qkvpacked_func,
        flash_attn_varlen_func,
        flash_attn_varlen_kvpacked_func,
        flash_attn_varlen_qkvpacked_func,
        scaled_dot_product_attention,
    )


def __getattr__(name):
    # orchard.distributed (context parallelism) is imported on first use: it pulls in
    # torch.distributed, which plain single-device users need not pay for.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """Build facts from the C++ core: version, cuda_compiled, cuda_archs,
    openmp, cpu_threads, cuda_devices."""
    return dict(_C.build_info())


__all__ = [
    "__version__",
    "build_info",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "scaled_dot_product_attention",
    "combine_attention",
    "flash_attn_with_kvcache",
    "OrchardShapeError",
]
