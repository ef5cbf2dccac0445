"""PyTorch custom ops over orchard._C.

Two ops are registered with ``torch.library``:

* ``orchard::flash_attn_forward(q, k, v, softmax_scale, causal, causal_top_left,
  dropout_p, seed, offset, return_mask, deterministic=False, op_name=...,
  rng_state=None) -> (out, lse, mask)``
* ``orchard::flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal,
  causal_top_left, dropout_p, seed, offset, deterministic, op_name=...,
  rng_state=None) -> (dq, dk, dv)``

Dropout is keyed by (seed, offset), or, when ``rng_state`` (an int64 tensor of
2 elements on q's device) is given, by its values when the kernels run: the
drop-ins draw it with ``torch.randint`` on the device, which torch.compile traces
and CUDA graphs replay with a fresh draw each time.

Tensors are in logical BSHD order, (batch, seq, heads, head_dim), with any
strides: a BHSD tensor is passed as ``x.transpose(1, 2)``, which the C++ core
reads in place. Outputs are allocated here by torch (its caching allocator, on
the inputs' device) and filled by the C++ core on the current CUDA stream;
nothing crosses the boundary but DLPack views and a stream handle.

When orchard/_C_torch.so loads (built with torch >= 2.10; see the section on
the stable-ABI ops below), the CPU/CUDA kernels of these ops and the drop-ins'
eager calls run internal C++ ops registered through torch's stable ABI instead
of exporting DLPack capsules from Python; ORCHARD_DISABLE_STABLE_OPS=1 turns
that off.

Environment variables read by the C++ core:

* ``ORCHARD_DEBUG_FLASH_ATN=1`` appends one line per kernel call (shapes,
  backend, kernel variant, staged copies, elapsed ms) to
  ``orchard_flash_attn_<pid>.log`` in the temp dir (or ``ORCHARD_LOG_DIR``).
* ``ORCHARD_TENSOR_PROFILE=1`` prints to stderr, per tensor, whether it was
  read zero-copy or staged (and why).
"""

from __future__ import annotations

import ctypes
import math
import os

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _C

__all__ = [
    "flash_attn_forward",
    "flash_attn_backward",
    "default_scale",
    "draw_dropout_seed",
    "draw_dropout_rng_state",
]


def default_scale(head_dim: int) -> float:
    # head_dim 0 is invalid; return a placeholder and let the C++ validation
    # raise its op-prefixed error (instead of a ZeroDivisionError here).
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def window_bound(w: int) -> int:
    """A window_size entry as the kernels' int64: a bound past 2^63 - 1 lies past every length, so it
    means what 2^63 - 1 means (unbounded); one below -2^63 stays below -1 (refused by the checks)."""
    return max(-2, min(w, 2**63 - 1))


def check_dropout(op: str, dropout_p) -> None:
    """dropout_p in [0, 1) (NaN is not), or the op's ValueError; not a number: the op's TypeError."""
    try:
        if 0.0 <= dropout_p < 1.0:
            return
    except TypeError:
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}") from None
    raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def resolve_scale(op: str, softmax_scale, head_dim: int) -> float:
    """softmax_scale as a float (None: 1 / sqrt(head_dim)); a value that is no number raises the op's
    error instead of float()'s (the C++ checks refuse non-positive and non-finite ones)."""
    if softmax_scale is None:
        return default_scale(head_dim)
    try:
        return float(softmax_scale)
    except TypeError:
        raise TypeError(f"{op}: softmax_scale must be a number or None, got {type(softmax_scale).__name__}") from None
    except ValueError:
        raise ValueError(f"{op}: softmax_scale must be a number or None, got {softmax_scale!r}") from None


_U64 = 0xFFFFFFFFFFFFFFFF


def draw_dropout_rng_state(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The dropout key of one call as a tensor: int64 (seed, offset) drawn on
    ``device`` by torch's generator for it (``torch.manual_seed(s)`` reproduces a
    run), or None without dropout. The kernels read it when they run, so this
    traces under torch.compile (no graph break) and a CUDA graph replay draws a
    new key (a fresh dropout mask) each time, as torch's own dropout does."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def draw_dropout_seed(dropout_p: float) -> tuple[int, int]:
    """(seed, offset) as Python ints for one dropout call, drawn from torch's
    default CPU generator, for callers of the custom ops that pass explicit
    seeds. Drawing a host number is a side effect torch.compile cannot trace
    (a graph break), and a CUDA graph would replay the captured value; the
    drop-ins use :func:`draw_dropout_rng_state` instead.
    """
    if dropout_p <= 0.0:
        return 0, 0
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu").item())
    return seed, 0


# ---------------------------------------------------------------------------
# Registration. The two ops are defined with torch.library.Library rather than
# the torch.library.custom_op decorator: the schemas, tags, fake kernels and
# autograd behaviour are the ones custom_op produced, but custom_op's generic
# Python wrappers cost ~50 us per eager call (its autograd forward alone spends
# ~50 us in torch._library.utils.fill_defaults, which rebuilds the schema's
# argument list once per argument), which dominated small problems.
# ---------------------------------------------------------------------------

# The feature arguments both ops take last (all defaulted): sliding window
# (flash-attn's window_size), softcap, ALiBi slopes (float32 (h,) or (b, h)), sink
# logits (float32 (h,)), SDPA's attn_mask (rank 4, broadcastable, bool or float),
# and varlen (int32 cu_seqlens with the max lengths; q/k/v are then
# (total, heads, dim) and lse is (heads, total_q)), and dropout's global coordinates
# (context parallelism: this call draws the block at these row/column/head offsets of
# the mask of a call with dropout_heads query heads, 0 = this call's; only the dropout
# index reads them, all 0 is the plain mask).
_FEATURE_SCHEMA = ("SymInt window_left=-1, SymInt window_right=-1, float softcap=0.0, "
                   "Tensor? alibi_slopes=None, Tensor? sink=None, Tensor? attn_mask=None, "
                   "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, SymInt max_seqlen_q=0, "
                   "SymInt max_seqlen_k=0, SymInt dropout_row_offset=0, SymInt dropout_col_offset=0, "
                   "SymInt dropout_head_offset=0, SymInt dropout_heads=0")
_FEATURE_DEFAULTS = (-1, -1, 0.0, None, None, None, None, None, 0, 0, 0, 0, 0, 0)
_NUM_FEATURES = len(_FEATURE_DEFAULTS)

# True while a test stand-in for torch.mps.compile_shader routes CPU tensors
# through the Metal path (orchard._mps.use_compiler); MPS tensors always go there.
_MPS_STAND_IN = False

_LIB = torch.library.Library("orchard", "DEF")  # noqa: TOR901 (kept alive for the process)
_LIB.define(
    "flash_attn_forward(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, "
    "bool causal_top_left, float dropout_p, SymInt seed, SymInt offset, bool return_mask, "
    "bool deterministic=False, str op_name=\"orchard.flash_attn\", Tensor? rng_state=None, "
    + _FEATURE_SCHEMA + ") -> (Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)
_LIB.define(
    "flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "float softmax_scale, bool causal, bool causal_top_left, float dropout_p, SymInt seed, "
    "SymInt offset, bool deterministic, str op_name=\"orchard.flash_attn\", "
    "Tensor? rng_state=None, " + _FEATURE_SCHEMA + ") -> (Tensor, Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)
_FWD = torch.ops.orchard.flash_attn_forward.default
_BWD = torch.ops.orchard.flash_attn_backward.default
# Trailing defaults, which the dispatcher may strip before calling a Python kernel.
_FWD_DEFAULTS = (False, "orchard.flash_attn", None, *_FEATURE_DEFAULTS)
_BWD_DEFAULTS = ("orchard.flash_attn", None, *_FEATURE_DEFAULTS)

# As custom_op does, keep torch.compile from tracing into the Python kernels when
# the dispatcher calls them from a frame it is compiling.
_disable_dynamo = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
# torch._C._any_requires_grad is newer than torch 2.6 (scripts/check_wheel_torch.sh runs
# the same wheel under 2.6): there, the same check in Python.
def host_values_readable(t: torch.Tensor) -> bool:
    """Whether a tensor's values may be read back to the host for a check: not while torch.compile
    traces, nor while a CUDA graph is captured (a copy and a sync are illegal there)."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _any_requires_grad_py(*args):
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and _any_requires_grad_py(*a):
            return True
    return False


_any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or _any_requires_grad_py
_is_grad_enabled = torch._C.is_grad_enabled


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
    rng_state: torch.Tensor | None = None,
    *features,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention forward on BSHD views (``torch.ops.orchard.flash_attn_forward``).
    Returns (out, lse, mask): out like q, lse (B, Hq, Sq) float32 (float64 for
    float64 inputs), mask the uint8 dropout keep-mask (B, Hq, Sq, Sk) when
    return_mask, else empty. ``deterministic`` is not used by the forward; it is
    saved for the backward (bitwise-reproducible dq/dk/dv). ``op_name`` (the
    public function's name) prefixes error messages of this call and its
    backward. ``rng_state``: optional int64 (seed, offset) tensor on q's device
    that replaces seed/offset when the kernels run (see the module docstring).
    ``features``: the trailing feature arguments of the op schema (_FEATURE_SCHEMA)."""
    return _FWD(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                return_mask, deterministic, op_name, rng_state, *features)


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
    rng_state: torch.Tensor | None = None,
    *features,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward on BSHD views (``torch.ops.orchard.flash_attn_backward``).
    Returns (dq, dk, dv) shaped and laid out like q, k, v. Dropout needs the
    forward's (seed, offset) or rng_state."""
    return _BWD(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, seed,
                offset, deterministic, op_name, rng_state, *features)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_with_head_dim(q, d_v):
    """An uninitialized tensor shaped like q but with head dim d_v, in q's
    memory order when q is dense with a contiguous last dim (so a BHSD-stored q
    gives a BHSD-stored output), else row-major."""
    order = sorted(range(q.dim()), key=lambda i: -q.stride(i))
    shape = (*q.shape[:-1], d_v)
    if order[-1] != q.dim() - 1:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    t = torch.empty([shape[i] for i in order], dtype=q.dtype, device=q.device)
    inverse = [0] * q.dim()
    for pos, i in enumerate(order):
        inverse[i] = pos
    return t.permute(inverse)


def _alloc_forward(q, k, v, return_mask, cu_seqlens_q=None, max_seqlen_q=0, max_seqlen_k=0):
    dev = q.device
    # empty_like keeps q's layout when it is dense (a BHSD-permuted view gives a
    # BHSD-stored output, so SDPA callers get a contiguous (B, H, S, D) back).
    # (torch.empty with the sizes as separate arguments parses ~1 us faster than
    # with a tuple.)
    out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else _empty_with_head_dim(q, v.shape[-1])
    if cu_seqlens_q is None:
        b, sq, hq, _ = q.shape
        sk = k.shape[1]
        lse = torch.empty(b, hq, sq, dtype=_lse_dtype(q.dtype), device=dev)
    else:  # varlen: q is (total_q, hq, d), lse (hq, total_q)
        total_q, hq, _ = q.shape
        b, sq, sk = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
        lse = torch.empty(hq, total_q, dtype=_lse_dtype(q.dtype), device=dev)
    if return_mask:
        mask = torch.empty(b, hq, sq, sk, dtype=torch.uint8, device=dev)
    else:
        mask = torch.empty(0, dtype=torch.uint8, device=dev)
    return out, lse, mask


def _check_rank(q, k, v, op, rank=4):
    layout = "(batch, seq, heads, head_dim)" if rank == 4 else "(total, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def check_tensor(op, name, t, optional=False):
    """A TypeError naming the argument unless t is a tensor (or None, where optional)."""
    if not isinstance(t, torch.Tensor) and not (optional and t is None):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(t).__name__}")


def check_one_device(op, named):
    """A ValueError unless every tensor of the (name, tensor or None) pairs is on the first's (q's)
    device. The kernels check devices themselves; this serves the calls that never reach them: a
    meta tensor among real ones sends a call to the fake kernels (the dispatcher picks the Meta
    kernel), which would hand back uninitialized memory."""
    (first, q), *rest = named
    for name, t in rest:
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {q.device}")


_FEATURE_TENSORS = ((3, "alibi_slopes"), (4, "sink"), (5, "attn_mask"), (6, "cu_seqlens_q"), (7, "cu_seqlens_k"))


def _fake_device_check(op, features, **tensors):
    """check_one_device over a fake kernel's tensors, q first, and its feature tensors."""
    check_one_device(op, [*tensors.items(), *((name, features[i]) for i, name in _FEATURE_TENSORS)])


def _full_features(features):
    """The feature arguments with the defaults the dispatcher may have stripped
    from the end of the call put back."""
    return features if len(features) == _NUM_FEATURES else (*features, *_FEATURE_DEFAULTS[len(features):])


def _features(window_left, window_right, softcap, alibi_slopes, sink, attn_mask, cu_seqlens_q,
              cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_row_offset=0, dropout_col_offset=0,
              dropout_head_offset=0, dropout_heads=0):
    """The `features` argument of _C.forward/backward: None when every feature
    is off (the common case costs nothing), else the tuple with tensors exported."""
    if (window_left == -1 and window_right == -1 and softcap == 0.0 and alibi_slopes is None
            and sink is None and attn_mask is None and cu_seqlens_q is None
            and cu_seqlens_k is None and dropout_row_offset == 0 and dropout_col_offset == 0
            and dropout_head_offset == 0 and dropout_heads == 0):
        return None
    slopes, snk, mask, cuq, cuk = _export(alibi_slopes, sink, attn_mask, cu_seqlens_q, cu_seqlens_k)
    return (int(window_left), int(window_right), float(softcap), slopes, snk, mask, cuq, cuk,
            int(max_seqlen_q), int(max_seqlen_k), int(dropout_row_offset), int(dropout_col_offset),
            int(dropout_head_offset), int(dropout_heads))


# The kernels hand orchard._C DLPack capsules made by torch.utils.dlpack.to_dlpack
# (~0.4 us each) instead of tensors, on which nanobind calls Tensor.__dlpack__, a
# Python method (~3 us each). __dlpack__ ends in the same to_dlpack; a tensor it
# would refuse (requires_grad, another CUDA device than the current one) nanobind
# then exports with to_dlpack anyway, so the capsules are what _C always got.
# Should to_dlpack itself fail, the tensors go to _C as before, and nanobind
# reports the failure as it always did. A capsule is consumed by one call.


def _export(*tensors):
    """What _C receives for these tensors (None stays None): DLPack capsules, or, if
    to_dlpack refuses one, the detached tensors (the same memory) for nanobind."""
    try:
        return tuple(None if t is None else _to_dlpack(t) for t in tensors)
    except Exception:
        return tuple(None if t is None else t.detach() for t in tensors)


def _launch_on_device_of(t, launch):
    """launch(stream): on t's CUDA device with its current stream (torch refuses to
    export, through DLPack, a CUDA tensor that is not on the current device, and
    kernels must launch on the tensor's device), or with stream 0 on the CPU."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            launch(torch.cuda.current_stream(t.device).cuda_stream)
    else:
        launch(0)


def _forward_kernel(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                    return_mask, deterministic=False, op_name="orchard.flash_attn", rng_state=None,
                    *features):
    if q.is_mps or _MPS_STAND_IN:  # the Metal backend (MPS tensors) launches from Python
        from . import _mps
        if _mps.handles(q):
            return _mps.forward(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed,
                                offset, return_mask, op_name, rng_state, features)
    if _SFWD is not None and q.device.type in _STABLE_DEVICES:  # the C++ op (_C_torch.so)
        try:
            return _SFWD(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                         return_mask, deterministic, op_name, rng_state, *features)
        except RuntimeError as e:
            raise _stable_error(e) from None
    features = _full_features(features)
    cu_q, max_q, max_k = features[6], features[8], features[9]
    rank = 4 if cu_q is None else 3
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        _check_rank(q, k, v, op_name, rank)
    out, lse, mask = _alloc_forward(q, k, v, return_mask, cu_q, max_q, max_k)
    write_mask = return_mask and dropout_p > 0.0
    if return_mask and not write_mask:
        mask.fill_(1)  # no dropout: everything is kept
    _launch_on_device_of(q, lambda stream: _run_forward(
        q, k, v, out, lse, mask if write_mask else None, softmax_scale, causal, causal_top_left,
        dropout_p, seed, offset, stream, op_name, rng_state, features))
    return out, lse, mask


_forward_impl = _disable_dynamo(_forward_kernel)  # the CompositeExplicitAutograd kernel


def _run_forward(q, k, v, out, lse, mask, softmax_scale, causal, causal_top_left, dropout_p, seed,
                 offset, stream, op_name, rng_state=None, features=_FEATURE_DEFAULTS):
    *t, rng = _export(q, k, v, out, lse, mask, rng_state)
    _C.forward(*t, float(softmax_scale), bool(causal), bool(causal_top_left), float(dropout_p),
               int(seed) & _U64, int(offset) & _U64, int(stream), op_name, rng,
               _features(*features))


def _forward_fake(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, seed, offset,
                  return_mask, deterministic=False, op_name="orchard.flash_attn", rng_state=None,
                  *features):
    features = _full_features(features)
    cu_q, max_q, max_k = features[6], features[8], features[9]
    _check_rank(q, k, v, op_name, 4 if cu_q is None else 3)
    _fake_device_check(op_name, features, q=q, k=k, v=v)
    return _alloc_forward(q, k, v, return_mask, cu_q, max_q, max_k)


def _backward_kernel(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p,
                     seed, offset, deterministic, op_name="orchard.flash_attn", rng_state=None,
                     *features):
    if q.is_mps or _MPS_STAND_IN:  # the Metal backend (MPS tensors) launches from Python
        from . import _mps
        if _mps.handles(q):
            return _mps.backward(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left,
                                 dropout_p, seed, offset, op_name, rng_state, features)
    if _SBWD is not None and q.device.type in _STABLE_DEVICES:  # the C++ op (_C_torch.so)
        try:
            return _SBWD(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p,
                         seed, offset, deterministic, op_name, rng_state, *features)
        except RuntimeError as e:
            raise _stable_error(e) from None
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    opts = (float(softmax_scale), bool(causal), bool(causal_top_left), float(dropout_p),
            int(seed) & _U64, int(offset) & _U64, bool(deterministic))
    _launch_on_device_of(q, lambda stream: _run_backward(dout, q, k, v, out, lse, dq, dk, dv, opts,
                                                         stream, op_name, rng_state,
                                                         _full_features(features)))
    return dq, dk, dv


_backward_impl = _disable_dynamo(_backward_kernel)  # the CompositeExplicitAutograd kernel


# Workspace sizes depend only on the problem's shapes, dtype, device and mode, so
# they are cached: asking the core means exporting all nine tensors through
# DLPack a second time per backward call. An undersized workspace could never
# corrupt memory (the core checks the size and raises), only fail loudly.
_WORKSPACE_BYTES: dict = {}


def _run_backward(dout, q, k, v, out, lse, dq, dk, dv, opts, stream, op_name, rng_state=None,
                  features=_FEATURE_DEFAULTS):
    stream = int(stream)
    _, causal, _, dropout_p, _, _, deterministic = opts
    feature_key = None if all(f is d for f, d in zip(features, _FEATURE_DEFAULTS)) else tuple(
        f if not isinstance(f, torch.Tensor) else (f.shape, f.dtype) for f in features)
    key = (q.device, q.shape, k.shape, v.shape, q.dtype, causal, dropout_p > 0.0, deterministic,
           feature_key)
    nbytes = _WORKSPACE_BYTES.get(key)
    if nbytes is None:
        nbytes = int(_C.backward_workspace_bytes(q.detach(), k.detach(), v.detach(), out.detach(),
                                                 dout.detach(), lse.detach(), dq, dk, dv, *opts,
                                                 stream, op_name, _features(*features)))
        if len(_WORKSPACE_BYTES) > 1024:
            _WORKSPACE_BYTES.clear()
        _WORKSPACE_BYTES[key] = nbytes
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes > 0 else None
    *t, rng = _export(q, k, v, out, dout, lse, dq, dk, dv, workspace, rng_state)
    _C.backward(*t, *opts, stream, op_name, rng, _features(*features))


def _backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p,
                   seed, offset, deterministic, op_name="orchard.flash_attn", rng_state=None,
                   *features):
    _fake_device_check(op_name, _full_features(features), q=q, k=k, v=v, dout=dout, out=out, lse=lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---------------------------------------------------------------------------
# Autograd: what custom_op + register_autograd generated, without its generic
# per-call work. The Function classes keep custom_op's names (so grad_fn names
# are unchanged); the backward op is not differentiable, and backpropagating
# through it raises custom_op's error.
#
# Below autograd, custom_op redispatches through the dispatcher (~15 us from
# Python). When the keyset left after autograd has a plain CPU or CUDA key on
# top, that redispatch could only reach the CompositeExplicitAutograd kernel, so
# it is called directly; anything else (fake tensors, dispatch modes, meta,
# other backends) still redispatches.
# ---------------------------------------------------------------------------

_DIRECT_KEYS = frozenset((torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))


def _below_autograd(op, kernel, keyset, args):
    if keyset.highestPriorityTypeId() in _DIRECT_KEYS:
        return kernel(*args)
    with _BelowAutograd():
        return op.redispatch(keyset, *args)


def _fwd_function_forward(ctx, keyset, q, k, v, softmax_scale, causal, causal_top_left, dropout_p,
                          seed, offset, return_mask, deterministic, op_name, rng_state, *features):
    out, lse, mask = _below_autograd(_FWD, _forward_kernel, keyset,
                                     (q, k, v, softmax_scale, causal, causal_top_left, dropout_p,
                                      seed, offset, return_mask, deterministic, op_name, rng_state,
                                      *features))
    # rng_state is saved too: the backward must regenerate the same mask (under a
    # CUDA graph it is the captured buffer that each replay's draw refills).
    # The feature tensors (slopes, sink, mask, cu_seqlens) are saved with them.
    ctx.save_for_backward(q, k, v, out, lse, rng_state, *features[3:8])
    ctx.features = features
    # No zero-filled gradients for the outputs the backward ignores (lse, mask):
    # materializing them cost two fill kernels and, measured on the H100 through
    # torch.profiler, ~0.4 ms of host time each per backward call at d128 s8k.
    ctx.set_materialize_grads(False)
    ctx.opts = (softmax_scale, causal, causal_top_left, dropout_p, seed, offset, deterministic,
                op_name)
    return out, lse, mask


def _fwd_function_backward(ctx, grad_out, grad_lse, grad_mask):
    # Gradients through lse and the mask are not propagated (as in flash-attn):
    # lse is a by-product of the softmax, the mask is a random draw.
    q, k, v, out, lse, rng_state, *feature_tensors = ctx.saved_tensors
    (softmax_scale, causal, causal_top_left, dropout_p, seed, offset, deterministic,
     op_name) = ctx.opts
    f = ctx.features
    features = (*f[:3], *feature_tensors, *f[8:])
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    args = (grad_out, q, k, v, out, lse, softmax_scale, causal, causal_top_left, dropout_p, seed,
            offset, deterministic, op_name, rng_state, *features)
    # The C++ op straight away where the public op's Autograd kernel would reach it (no
    # double backward, modes or subclasses): as _eager_function_backward.
    direct = (_SBWD is not None and q.device.type in _STABLE_DEVICES and not _MPS_STAND_IN
              and not _is_grad_enabled() and not _dispatch_modes() and not _function_modes()
              and not _functorch_active() and _plain_tensors(args))
    dq, dk, dv = _backward_kernel(*args) if direct else _BWD(*args)
    sink, attn_mask = features[4], features[5]
    dsink = dbias = None
    if sink is not None and ctx.needs_input_grad[18]:
        dsink = sink_grad(grad_out, out, lse, sink, varlen=features[6] is not None)
    if attn_mask is not None and ctx.needs_input_grad[19]:
        dbias = attn_bias_grad(q, k, v, out, grad_out, lse, softmax_scale, attn_mask)
    return (None, dq, dk, dv, None, None, None, None, None, None, None, None, None, None,
            None, None, None, None, dsink, dbias, None, None, None, None, None, None, None, None)


def attn_bias_grad(q, k, v, out, dout, lse, softmax_scale, bias):
    """The gradient of an additive attention bias (SDPA's float attn_mask when it
    requires grad): dBias = dS = P * (dO V^T - rowsum(dO * O)), with P recomputed
    from the forward's LSE. It is (batch, heads, L, S) — the size of the bias
    expanded — as in torch's own SDPA backward; one batch entry at a time in
    float32 (float64 for float64 inputs). Not fused: only a bias that is learned
    pays for it. (Dropout with such a bias is refused by the drop-in.)"""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[2] // k.shape[2]
    grads = []
    for b in range(q.shape[0]):
        qh, kh, vh, oh, doh = (t[b].transpose(0, 1).to(acc) for t in (q, k, v, out, dout))  # (h, s, e)
        if rep > 1:
            kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
        s = torch.baddbmm(bias[b].to(acc).expand(qh.shape[0], qh.shape[1], kh.shape[1]), qh,
                          kh.transpose(1, 2), alpha=softmax_scale)
        l = lse[b].to(acc)[..., None]
        p = torch.where(torch.isfinite(l), torch.exp(s - l), torch.zeros((), dtype=acc, device=s.device))
        dp = torch.bmm(doh, vh.transpose(1, 2))
        grads.append(p * (dp - (doh * oh).sum(-1, keepdim=True)))
    return torch.stack(grads).to(bias.dtype)


def sink_grad(dout, out, lse, sink, varlen=False):
    """The gradient of the sink logits: dsink[h] = -sum over (batch, row) of
    P_sink * rowsum(dO * O), with P_sink = exp(sink[h] - lse) (the sink's share of
    each row's softmax). One pass over dO and O, in the LSE's precision."""
    rowdot = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (b, s, h) or (total, h)
    if varlen:  # lse (h, total_q); -inf on packed rows no sequence owns (out 0 there): no share
        p_sink = torch.exp(sink.to(lse.dtype)[:, None] - lse).masked_fill(torch.isneginf(lse), 0.0)
        return -(p_sink * rowdot.transpose(0, 1)).sum(1).to(sink.dtype)
    p_sink = torch.exp(sink.to(lse.dtype)[None, :, None] - lse)  # (b, h, s)
    return -(p_sink * rowdot.transpose(1, 2)).sum((0, 2)).to(sink.dtype)


def _bwd_function_forward(ctx, keyset, *args):
    return _below_autograd(_BWD, _backward_kernel, keyset, args)


def _bwd_function_backward(ctx, *grads):
    raise RuntimeError(f"Trying to backward through {_BWD} but no autograd formula was registered. "
                       f"Please use register_autograd to add one.")


_ForwardFunction = type("GeneratedBackwardFor_orchard_flash_attn_forward_default",
                        (torch.autograd.Function,),
                        {"forward": staticmethod(_fwd_function_forward),
                         "backward": staticmethod(_fwd_function_backward)})
_BackwardFunction = type("GeneratedBackwardFor_orchard_flash_attn_backward_default",
                         (torch.autograd.Function,),
                         {"forward": staticmethod(_bwd_function_forward),
                          "backward": staticmethod(_bwd_function_backward)})


def _with_defaults(args, num_args, defaults):
    """args with the trailing defaulted arguments they leave out filled in (num_args in all)."""
    return (*args, *defaults[len(args) - (num_args - len(defaults)):])


def _autograd_kernel(op, function, kernel, num_args, defaults):
    """The op's Autograd kernel: record `function` when a gradient is needed,
    else run below autograd. Trailing defaulted arguments may be left out."""
    @_disable_dynamo
    def run(keyset, *args):
        if len(args) != num_args:
            args = _with_defaults(args, num_args, defaults)
        keyset = keyset & _AFTER_AUTOGRAD
        if _is_grad_enabled() and _any_requires_grad(*args):
            return function.apply(keyset, *args)
        return _below_autograd(op, kernel, keyset, args)
    return run


# The drop-ins' calls with feature arguments (masks, windows, softcap, ALiBi, sinks, varlen):
# what the public op's Autograd kernel (run, above) does for an eager call on plain CPU / CUDA
# tensors, without the dispatcher's round trips through Python (forward and backward). The same
# Function (grad_fn name), saved tensors and backward formula; anything eager_ok or the C++ op
# cannot serve unchanged takes the public op. Measured on the 2-core dev box (CPU tensors, b1 h1
# s16 d16, a key-padding mask, µs per call; a noisy box): forward 40 -> 29, forward with grad
# 70 -> 57, forward + backward 249 -> 208.
_DIRECT_KEYSETS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                   "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}
_fwd_apply = super(torch.autograd.Function, _ForwardFunction).apply  # as _eager_apply
_FWD_ARGS = 13 + _NUM_FEATURES
_FWD_TENSOR_AT = (12, 16, 17, 18, 19, 20)  # rng_state, alibi_slopes, sink, attn_mask, cu_seqlens_q / _k


def _plain_tensors(args):
    return all(type(a) is _Tensor for a in args if isinstance(a, _Tensor))


def feature_forward(*args):
    """orchard::flash_attn_forward(*args) (features included) for the drop-ins."""
    if len(args) != _FWD_ARGS:
        args = _with_defaults(args, _FWD_ARGS, _FWD_DEFAULTS)
    q, k, v = args[0], args[1], args[2]
    extra = [args[i] for i in _FWD_TENSOR_AT if args[i] is not None]
    if _SFWD is None or not eager_ok(q, k, v) or any(type(t) is not _Tensor for t in extra):
        return _FWD(*args)
    if _is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                               or any(t.requires_grad for t in extra)):
        keyset = _DIRECT_KEYSETS[q.device.type]
        if _wrapped(q) or _wrapped(k) or _wrapped(v) or any(_wrapped(t) for t in extra):
            return _ForwardFunction.apply(keyset, *args)
        return _fwd_apply(keyset, *args)
    return _forward_kernel(*args)


_forward_autograd = _autograd_kernel(_FWD, _ForwardFunction, _forward_kernel, _FWD_ARGS, _FWD_DEFAULTS)
_backward_autograd = _autograd_kernel(_BWD, _BackwardFunction, _backward_kernel,
                                      15 + _NUM_FEATURES, _BWD_DEFAULTS)


_LIB.impl("flash_attn_forward", _forward_impl, "CompositeExplicitAutograd")
_LIB.impl("flash_attn_backward", _backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake("orchard::flash_attn_forward", _forward_fake, lib=_LIB)
torch.library.register_fake("orchard::flash_attn_backward", _backward_fake, lib=_LIB)
_LIB.impl("flash_attn_forward", _forward_autograd, "Autograd", with_keyset=True)
_LIB.impl("flash_attn_backward", _backward_autograd, "Autograd", with_keyset=True)


# ---------------------------------------------------------------------------
# The stable-ABI C++ ops (orchard/_C_torch.so, python/binding/torch_ops.cpp).
#
# orchard::_flash_fwd / _flash_bwd take the arguments of the two ops above and
# do in C++ what _forward_kernel / _backward_kernel do for CPU and CUDA tensors
# (allocate through torch, set the device, take the current stream, call the
# same core that orchard._C holds). They are built when torch >= 2.10 is found
# at build time and loaded here when they load; else (older torch, a build
# without them, ORCHARD_DISABLE_STABLE_OPS=1) everything runs the DLPack path.
#
# Used in two places:
# * _forward_kernel / _backward_kernel (the ops' CPU/CUDA kernels, which
#   torch.compile'd graphs and direct op calls reach) call them instead of
#   exporting DLPack capsules;
# * the drop-ins' eager hot path (eager_forward below) calls them (without them,
#   the DLPack kernels) straight from flash_attn_func / scaled_dot_product_attention,
#   skipping the Python Autograd kernel of orchard::flash_attn_forward, with a
#   lean autograd Function when a gradient is needed. Whatever that path cannot serve
#   unchanged (torch.compile tracing, dispatch or function modes, tensor
#   subclasses, autocast, MPS, feature arguments) goes through the public op.
# ---------------------------------------------------------------------------

_SFWD = _SBWD = None
_STABLE_DEVICES = frozenset(("cpu", "cuda"))
STABLE_OPS_STATUS = "not loaded"
_MIN_STABLE_TORCH = (2, 10)  # the first stable ABI with str arguments (op_name)


def _torch_version() -> tuple[int, int]:
    try:
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def _load_stable_ops():
    """Loads orchard/_C_torch.so and hands it orchard._C's core; returns the op
    overloads (fwd, bwd, fwd_plain, bwd_plain, kvcache_fwd), or None with
    STABLE_OPS_STATUS saying why not."""
    global STABLE_OPS_STATUS
    if os.environ.get("ORCHARD_DISABLE_STABLE_OPS", "") not in ("", "0"):
        STABLE_OPS_STATUS = "disabled (ORCHARD_DISABLE_STABLE_OPS)"
        return None
    if _torch_version() < _MIN_STABLE_TORCH:
        STABLE_OPS_STATUS = f"torch {torch.__version__} < 2.10 (stable ABI without str arguments)"
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_torch.so")
    if not os.path.exists(path):
        STABLE_OPS_STATUS = "not built (no torch >= 2.10 headers at build time)"
        return None
    core_api = getattr(_C, "_core_api", None)
    if core_api is None:
        STABLE_OPS_STATUS = "orchard._C has no _core_api (a _C from another build)"
        return None
    try:
        torch.ops.load_library(path)
        if ctypes.CDLL(path).orchard_torch_set_core_api(ctypes.c_void_p(core_api())) != 0:
            STABLE_OPS_STATUS = "_C_torch.so and orchard._C come from different builds"
            return None
        ops = (torch.ops.orchard._flash_fwd.default, torch.ops.orchard._flash_bwd.default,
               torch.ops.orchard._flash_fwd_plain.default, torch.ops.orchard._flash_bwd_plain.default,
               torch.ops.orchard._kvcache_fwd.default)
    except Exception as e:  # noqa: BLE001 (any failure leaves the DLPack path in charge)
        STABLE_OPS_STATUS = f"failed to load: {type(e).__name__}: {e}"
        return None
    STABLE_OPS_STATUS = "loaded"
    return ops


_ERROR_TYPES = {"ValueError": ValueError, "NotImplementedError": NotImplementedError,
                "RuntimeError": RuntimeError, "OutOfMemoryError": torch.OutOfMemoryError}


def _stable_error(e: RuntimeError) -> BaseException:
    """The exception the DLPack path raises for an error the C++ op reported as a
    tagged RuntimeError ("[orchard:ValueError] orchard.flash_attn_func: ...");
    anything else (torch's own errors) unchanged."""
    msg = str(e)
    start = msg.find("[orchard:")
    end = msg.find("] ", start)
    if start < 0 or end < 0:
        return e
    return _ERROR_TYPES.get(msg[start + 9:end], RuntimeError)(msg[end + 2:])


def _forward_plain_fake(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                       op_name, rng_state, bhsd=False):
    if bhsd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse, mask = _forward_fake(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, 0,
                                   0, return_mask, False, op_name, rng_state)
    return (out.transpose(1, 2) if bhsd else out), lse, (mask if return_mask else None)


def _backward_plain_fake(dout, q, k, v, out, lse, *rest):
    return _backward_fake(dout, q, k, v, out, lse)  # like q, k, v in either layout


_SFWD_PLAIN = _SBWD_PLAIN = _SKVCACHE = None
_stable = _load_stable_ops()
if _stable is not None:
    _SFWD, _SBWD, _SFWD_PLAIN, _SBWD_PLAIN, _SKVCACHE = _stable
    # Fake kernels, so that tracing code that reaches the internal ops still works.
    torch.library.register_fake("orchard::_flash_fwd", _forward_fake, lib=_LIB)
    torch.library.register_fake("orchard::_flash_bwd", _backward_fake, lib=_LIB)
    torch.library.register_fake("orchard::_flash_fwd_plain", _forward_plain_fake, lib=_LIB)
    torch.library.register_fake("orchard::_flash_bwd_plain", _backward_plain_fake, lib=_LIB)
    # The internal ops run only where autograd has nothing to record (inside the autograd
    # Functions' forward / backward, below the public ops' Autograd kernel, in no-grad decode):
    # a fallthrough skips torch's autograd fallback kernel, which otherwise scans the
    # arguments for requires_grad on every call (~0.6 us per call on the CPU proxy).
    for _name in ("_flash_fwd", "_flash_bwd", "_flash_fwd_plain", "_flash_bwd_plain", "_kvcache_fwd"):
        _LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")
del _stable

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
_are_deterministic = torch.are_deterministic_algorithms_enabled
_Tensor = torch.Tensor
# The eager path's C++ ops (the short schemas: without feature arguments, seed and
# offset, a call converts 10 arguments instead of 23, ~1 us less), called without
# OpOverload.__call__'s Python frame (it only forwards to _op).
_SFWD_CALL = getattr(_SFWD_PLAIN, "_op", _SFWD_PLAIN)
_SBWD_CALL = getattr(_SBWD_PLAIN, "_op", _SBWD_PLAIN)
# flash_attn_with_kvcache's eager call (kvcache.py; None without _C_torch.so).
_SKVCACHE_CALL = getattr(_SKVCACHE, "_op", _SKVCACHE)


def eager_ok(q, k, v) -> bool:
    """Whether eager_forward may serve this call: it is eager (not traced by
    torch.compile), no dispatch/function mode, autocast or Metal stand-in would see
    or change the public op, and q, k, v are plain CPU or CUDA tensors (not negative
    views, when the DLPack kernels would serve them)."""
    return (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and (q.is_cuda or q.is_cpu) and not _MPS_STAND_IN and not _is_compiling()
            and not _dispatch_modes() and not _function_modes() and not _any_autocast()
            and not _functorch_active()  # vmap / grad transforms: the public op
            # DLPack exports a negative view's storage as stored: without the C++ op (whose
            # dispatcher resolves it), such tensors take the public op, which does too.
            and (_SFWD_CALL is not None or not (q.is_neg() or k.is_neg() or v.is_neg())))


_cuda_device = getattr(torch._C, "_cuda_getDevice", None)
_cuda_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _dlpack_launch(q, launch):
    """_launch_on_device_of for the eager path: the raw current stream of q's
    device, switching devices only when q is not on the current one."""
    if not q.is_cuda:
        return launch(0)
    index = q.device.index
    if _cuda_raw_stream is None or _cuda_device() != index:
        return _launch_on_device_of(q, launch)
    return launch(_cuda_raw_stream(index))


def _dlpack_forward_plain(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                          op_name, rng_state):
    """_forward_kernel's DLPack path for a call without feature arguments, with
    the generic steps left out (what the eager path runs without _C_torch.so)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _check_rank(q, k, v, op_name, 4)
    out, lse, mask = _alloc_forward(q, k, v, return_mask)
    write_mask = return_mask and dropout_p > 0.0
    if return_mask and not write_mask:
        mask.fill_(1)  # no dropout: everything is kept
    _dlpack_launch(q, lambda stream: _C.forward(
        _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out), _to_dlpack(lse),
        _to_dlpack(mask) if write_mask else None, softmax_scale, causal, causal_top_left,
        dropout_p, 0, 0, stream, op_name, None if rng_state is None else _to_dlpack(rng_state),
        None))
    return out, lse, mask


def _dlpack_backward_plain(dout, q, k, v, out, lse, softmax_scale, causal, causal_top_left,
                           dropout_p, deterministic, op_name, rng_state):
    """_backward_kernel's DLPack path without feature arguments (eager path)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts = (softmax_scale, causal, causal_top_left, dropout_p, 0, 0, deterministic)
    # _run_backward's workspace cache, under the key it gives a call without features.
    key = (q.device, q.shape, k.shape, v.shape, q.dtype, causal, dropout_p > 0.0, deterministic,
           None)
    if key not in _WORKSPACE_BYTES:
        _dlpack_launch(q, lambda stream: _run_backward(dout, q, k, v, out, lse, dq, dk, dv, opts,
                                                       stream, op_name, rng_state))
        return dq, dk, dv
    nbytes = _WORKSPACE_BYTES[key]
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes > 0 else None
    _dlpack_launch(q, lambda stream: _C.backward(
        _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out), _to_dlpack(dout),
        _to_dlpack(lse), _to_dlpack(dq), _to_dlpack(dk), _to_dlpack(dv),
        None if workspace is None else _to_dlpack(workspace), *opts, stream, op_name,
        None if rng_state is None else _to_dlpack(rng_state), None))
    return dq, dk, dv


def _t12(*tensors):
    return tuple(t.transpose(1, 2) for t in tensors)


def _eager_kernel(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                  deterministic, op_name, rng_state, bhsd=False):
    """The forward of the eager path. bhsd: q, k, v (and the returned out) are
    (B, H, S, D), the SDPA drop-in's tensors, which the C++ op reads as given."""
    if _SFWD_CALL is None:  # the DLPack path, still without the dispatcher's Python kernels
        if bhsd:
            q, k, v = _t12(q, k, v)
        out, lse, mask = _dlpack_forward_plain(q, k, v, softmax_scale, causal, causal_top_left,
                                               dropout_p, return_mask, op_name, rng_state)
        return (out.transpose(1, 2) if bhsd else out), lse, mask
    try:
        return _SFWD_CALL(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                          op_name, rng_state, bhsd)
    except RuntimeError as e:
        raise _stable_error(e) from None


def eager_forward(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                  deterministic, op_name, rng_state, bhsd=False, lse_used=True):
    """flash_attn_forward(q, k, v, ..., seed=0, offset=0, ...) without feature
    arguments, for a call eager_ok accepted, with the same outputs, gradients
    (grad_fn name included) and errors as the public op, but without its
    dispatcher round trip through Python: the C++ op when loaded, else the
    DLPack kernel directly; a lean autograd Function when a gradient is needed.
    bhsd=True: q, k, v are (B, H, S, D) and so is out (the SDPA drop-in).
    lse_used=False: the caller drops the lse, so a call that needs a gradient may
    take the aten route (_aten_forward: torch's C++ autograd node; its lse is not
    differentiable, and its grad_fn is torch's ScaledDotProductFusedAttention...)."""
    if _is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if (not lse_used and bhsd in _ATEN_LAYOUTS and not return_mask and rng_state is None
                and not deterministic and not _are_deterministic()):
            out = _aten_forward(q, k, v, softmax_scale, causal, causal_top_left, bhsd)
            if out is not None:
                return out, None, None
        opts = (softmax_scale, causal, causal_top_left, dropout_p, return_mask, deterministic,
                op_name, bhsd)
        if _wrapped(q) or _wrapped(k) or _wrapped(v):
            return _EagerFunction.apply(q, k, v, rng_state, opts)
        # What Function.apply ends in when no functorch transform is active (eager_ok)
        # and no (dead) functorch wrapper is passed: ~2-4 us less per call on the dev box.
        return _eager_apply(q, k, v, rng_state, opts)
    return _eager_kernel(q, k, v, softmax_scale, causal, causal_top_left, dropout_p, return_mask,
                         deterministic, op_name, rng_state, bhsd)


def _eager_function_forward(ctx, q, k, v, rng_state, opts):
    softmax_scale, causal, causal_top_left, dropout_p, return_mask, deterministic, op_name, bhsd = opts
    out, lse, mask = _eager_kernel(q, k, v, softmax_scale, causal, causal_top_left, dropout_p,
                                   return_mask, deterministic, op_name, rng_state, bhsd)
    ctx.save_for_backward(q, k, v, out, lse, rng_state)
    ctx.set_materialize_grads(False)  # as _fwd_function_forward: no zero grads for lse/mask
    ctx.opts = opts
    return out, lse, mask


def _eager_function_backward(ctx, grad_out, grad_lse, grad_mask):
    q, k, v, out, lse, rng_state = ctx.saved_tensors
    softmax_scale, causal, causal_top_left, dropout_p, _, deterministic, op_name, bhsd = ctx.opts
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    deterministic = deterministic or _are_deterministic()
    public = (_is_grad_enabled() or type(grad_out) is not _Tensor or _dispatch_modes()
              or _function_modes() or (_SBWD_CALL is None and grad_out.is_neg()))
    if _SBWD_CALL is not None and not public:
        try:
            dq, dk, dv = _SBWD_CALL(grad_out, q, k, v, out, lse, softmax_scale, causal,
                                    causal_top_left, dropout_p, deterministic, op_name, rng_state,
                                    bhsd)
        except RuntimeError as e:
            raise _stable_error(e) from None
        return dq, dk, dv, None, None
    if bhsd:  # the paths below read BSHD views
        grad_out, q, k, v, out = _t12(grad_out, q, k, v, out)
    if public:
        # create_graph (the public op refuses a double backward as before), a mode or
        # a subclass: the public op, as _fwd_function_backward calls it.
        dq, dk, dv = _BWD(grad_out, q, k, v, out, lse, softmax_scale, causal, causal_top_left,
                          dropout_p, 0, 0, deterministic, op_name, rng_state)
    else:
        dq, dk, dv = _dlpack_backward_plain(grad_out, q, k, v, out, lse, softmax_scale, causal,
                                            causal_top_left, dropout_p, deterministic, op_name,
                                            rng_state)
    if bhsd:
        dq, dk, dv = _t12(dq, dk, dv)
    return dq, dk, dv, None, None


# Named like _ForwardFunction, so grad_fn names do not depend on the path taken.
_EagerFunction = type("GeneratedBackwardFor_orchard_flash_attn_forward_default",
                      (torch.autograd.Function,),
                      {"forward": staticmethod(_eager_function_forward),
                       "backward": staticmethod(_eager_function_backward)})
_eager_apply = super(torch.autograd.Function, _EagerFunction).apply  # torch._C._FunctionBase.apply
_functorch_active = torch._C._are_functorch_transforms_active
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


# ---------------------------------------------------------------------------
# The aten route (issue 12): _C_torch.so also serves
# aten::_scaled_dot_product_fused_attention_overrideable (+ _backward) on CPU and CUDA
# tensors (python/binding/torch_ops.cpp), torch's SDPA op for out-of-tree backends, whose
# autograd node is C++. A training call through it records no Python autograd node: no
# Function.apply, no Python backward (which on CUDA runs on autograd's device thread).
# Contract: SDPA's - (B, H, S, D), top-left causal - without dropout / bias. So it serves
#   * the SDPA drop-in's eager calls (bhsd) that need a gradient, always;
#   * flash_attn_func's (BSHD) when ORCHARD_ATEN_AUTOGRAD=all, through transposed views
#     (causal only when sq == sk, where bottom-right = top-left): their four
#     TransposeBackward nodes cost more than the Python node on the CPU proxy
#     (bench/NOTES.md), so it waits for a CUDA measurement (bench/overhead_probe.py).
# The lse is not differentiable there (the op's formula), so callers that hand the lse
# out keep the Function. ORCHARD_ATEN_AUTOGRAD=0 turns the route off. Any error on the
# route (bad input) re-runs the call on the Function path, which raises the op-prefixed
# error as before (nothing has been launched when the op refuses an input).
# ---------------------------------------------------------------------------

_ATEN_MODE = os.environ.get("ORCHARD_ATEN_AUTOGRAD", "sdpa").strip().lower()
_ATEN_LAYOUTS = frozenset() if (_SFWD_CALL is None or _ATEN_MODE in ("0", "off", "none")) else (
    frozenset((True, False)) if _ATEN_MODE in ("1", "all") else frozenset((True,)))
_ATEN_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_fused_attention_overrideable", None)
_ATEN_SDPA = getattr(getattr(_ATEN_SDPA, "default", None), "_op", None)
if _ATEN_SDPA is None:
    _ATEN_LAYOUTS = frozenset()


def aten_masked_forward(q, k, v, softmax_scale, attn_mask, deterministic):
    """The SDPA drop-in's masked call ((B, H, S, D) tensors, attn_mask the rank-4 view it built,
    no dropout, no sink) through the aten op with attn_bias. A training call gets torch's C++
    autograd node instead of the Python Function, whose backward on CUDA runs Python on
    autograd's device thread (H200, b4 h16 s1k d128, a key-padding mask: 516 us of host time per
    forward + backward against 207 without a mask, dev/host_profile_mask.py, session 38); a call
    that needs no gradient gets the op's shorter host path (2-core box, CPU tensors, best of 5:
    the drop-in's masked forward under no_grad 31 -> 22 us, unmasked 14, session 39). None when the call does
    not fit it (a bias that needs its gradient, deterministic training, an error: the caller
    takes the Function path, which raises the op-prefixed one)."""
    if True not in _ATEN_LAYOUTS or type(attn_mask) is not _Tensor:
        return None
    if _is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or attn_mask.requires_grad):
        if attn_mask.requires_grad or deterministic or _are_deterministic():
            return None
    return _aten_forward(q, k, v, softmax_scale, False, True, True, attn_mask)


def _aten_forward(q, k, v, softmax_scale, causal, causal_top_left, bhsd, attn_mask=None):
    """out through the aten op (its C++ autograd node), or None when this call does not
    fit it (the caller then records the Function). attn_mask: the SDPA drop-in's rank-4
    view (bhsd calls only)."""
    if k.is_meta or v.is_meta:
        return None  # (torch's Meta kernel would answer; the Function's fake kernel refuses it)
    try:
        if bhsd:
            if causal and not causal_top_left and q.shape[2] != k.shape[2]:
                return None
            return _ATEN_SDPA(q, k, v, attn_mask, 0.0, causal, False, scale=softmax_scale)[0]
        if causal and not causal_top_left and q.shape[1] != k.shape[1]:
            return None
        return _ATEN_SDPA(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0, causal,
                          False, scale=softmax_scale)[0].transpose(1, 2)
    except RuntimeError:
        return None
