"""PyTorch custom ops over orchard._C.

Two ops are registered with ``torch.library``:

* ``orchard::flash_attn_forward(q, k, v, softmax_scale, causal, causal_top_left,
  dropout_p, seed, offset, return_mask) -> (out, lse, mask)``
* ``orchard::flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal,
  causal_top_left, dropout_p, seed, offset, deterministic) -> (dq, dk, dv)``

Tensors are in logical BSHD order, (batch, seq, heads, head_dim), with any
strides: a BHSD tensor is passed as ``x.transpose(1, 2)``, which the C++ core
reads in place. Outputs are allocated here by torch (its caching allocator, on
the inputs' device) and filled by the C++ core on the current CUDA stream;
nothing crosses the boundary but DLPack views and a stream handle.

Environment variables read by the C++ core:

* ``ORCHARD_DEBUG_FLASH_ATN=1`` appends one line per kernel call (shapes,
  backend, kernel variant, staged copies, elapsed ms) to
  ``orchard_flash_attn_<pid>.log`` in the temp dir (or ``ORCHARD_LOG_DIR``).
* ``ORCHARD_TENSOR_PROFILE=1`` prints to stderr, per tensor, whether it was
  read zero-copy or staged (and why).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C

__all__ = [
    "flash_attn_forward",
    "flash_attn_backward",
    "default_scale",
    "draw_dropout_seed",
]


def default_scale(head_dim: int) -> float:
    # head_dim 0 is invalid; return a placeholder and let the C++ validation
    # raise its op-prefixed error (instead of a ZeroDivisionError here).
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def _stream_of(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def _device_guard(t: torch.Tensor):
    # torch refuses to export (DLPack) a CUDA tensor that is not on the current
    # device, and kernels must launch on the tensor's device.
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # DLPack refuses tensors that require grad; the view is the same memory.
    return None if t is None else t.detach()


def draw_dropout_seed(dropout_p: float) -> tuple[int, int]:
    """(seed, offset) for one dropout call, drawn from torch's default CPU
    generator, so that ``torch.manual_seed(s)`` reproduces a run.

    Drawing a number is a side effect torch.compile cannot trace: with
    ``dropout_p > 0`` the drop-ins cause a graph break at this call (the custom
    op itself still compiles). Pass an explicit seed through the custom op to
    avoid it.
    """
    if dropout_p <= 0.0:
        return 0, 0
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu").item())
    return seed, 0


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alloc_forward(q, k, return_mask):
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    # empty_like keeps q's layout when it is dense (a BHSD-permuted view gives a
    # BHSD-stored output, so SDPA callers get a contiguous (B, H, S, D) back).
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), dtype=_lse_dtype(q.dtype), device=q.device)
    if return_mask:
        mask = torch.empty((b, hq, sq, sk), dtype=torch.uint8, device=q.device)
    else:
        mask = torch.empty((0,), dtype=torch.uint8, device=q.device)
    return out, lse, mask


@torch.library.custom_op("orchard::flash_attn_forward", mutates_args=())
def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    causal_top_left: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    return_mask: bool,
    deterministic: bool = False,
    op_name: str = "orchard.flash_attn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention forward on BSHD views. Returns (out, lse, mask):
    out like q, lse (B, Hq, Sq) float32 (float64 for float64 inputs), mask the
    uint8 dropout keep-mask (B, Hq, Sq, Sk) when return_mask, else empty.
    ``deterministic`` is not used by the forward; it is saved for the backward
    (bitwise-reproducible dq/dk/dv). ``op_name`` (the public function's name)
    prefixes error messages of this call and its backward."""
    _check_rank(q, k, v, "orchard.flash_attn_forward")
    out, lse, mask = _alloc_forward(q, k, return_mask)
    write_mask = return_mask and dropout_p > 0.0
    if return_mask and not write_mask:
        mask.fill_(1)  # no dropout: everything is kept
    with _device_guard(q):
        _C.forward(
            _d(q), _d(k), _d(v), out, lse, mask if write_mask else None,
            float(softmax_scale), bool(causal), bool(causal_top_left), float(dropout_p),
            int(seed) & 0xFFFFFFFFFFFFFFFF, int(offset) & 0xFFFFFFFFFFFFFFFF,
            _stream_of(q), op_name,
        )
    return out, lse, mask


@flash_attn_forward.register_fake
def _(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset, return_mask,
      deterministic=False, op_name="orchard.flash_attn"):
    _check_rank(q, k, v, "orchard.flash_attn_forward")
    return _alloc_forward(q, k, return_mask)


@torch.library.custom_op("orchard::flash_attn_backward", mutates_args=())
def flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    causal_top_left: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    deterministic: bool,
    op_name: str = "orchard.flash_attn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward on BSHD views. Returns (dq, dk, dv) shaped and
    laid out like q, k, v."""
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    args = (_d(q), _d(k), _d(v), _d(out), _d(dout), _d(lse), dq, dk, dv)
    opts = (
        float(softmax_scale), bool(causal), bool(causal_top_left), float(dropout_p),
        int(seed) & 0xFFFFFFFFFFFFFFFF, int(offset) & 0xFFFFFFFFFFFFFFFF, bool(deterministic),
        _stream_of(q), op_name,
    )
    with _device_guard(q):
        nbytes = _workspace_bytes(args, opts, q, k, causal, dropout_p, deterministic)
        workspace = torch.empty((nbytes,), dtype=torch.uint8, device=q.device) if nbytes > 0 else None
        _C.backward(*args, workspace, *opts)
    return dq, dk, dv


# Workspace sizes depend only on the problem's shapes, dtype, device and mode, so
# they are cached: asking the core means exporting all nine tensors through
# DLPack a second time per backward call. An undersized workspace could never
# corrupt memory (the core checks the size and raises), only fail loudly.
_WORKSPACE_BYTES: dict = {}


def _workspace_bytes(args, opts, q, k, causal, dropout_p, deterministic) -> int:
    key = (q.device, tuple(q.shape), tuple(k.shape), q.dtype, bool(causal), float(dropout_p) > 0.0,
           bool(deterministic))
    nbytes = _WORKSPACE_BYTES.get(key)
    if nbytes is None:
        nbytes = int(_C.backward_workspace_bytes(*args, *opts))
        if len(_WORKSPACE_BYTES) > 1024:
            _WORKSPACE_BYTES.clear()
        _WORKSPACE_BYTES[key] = nbytes
    return nbytes


@flash_attn_backward.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
      deterministic, op_name="orchard.flash_attn"):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _check_rank(q, k, v, op):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, seq, heads, head_dim), got shape "
                             f"{tuple(t.shape)}")


def _setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset, _return_mask,
     deterministic, op_name) = inputs
    out, lse, _mask = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.causal_top_left = causal_top_left
    ctx.dropout_p = dropout_p
    ctx.seed = seed
    ctx.offset = offset
    ctx.deterministic = deterministic
    ctx.op_name = op_name


def _backward(ctx, grad_out, grad_lse, grad_mask):
    # Gradients through lse and the mask are not propagated (as in flash-attn):
    # lse is a by-product of the softmax, the mask is a random draw.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = torch.ops.orchard.flash_attn_backward(
        grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.causal_top_left,
        ctx.dropout_p, ctx.seed, ctx.offset, deterministic, ctx.op_name,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


flash_attn_forward.register_autograd(_backward, setup_context=_setup_context)
