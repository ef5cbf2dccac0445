"""The ring backward's caller-owned fp32 dQ accumulator.

Every ring step runs Orchard's backward over one block of (local queries, some
rank's keys), and the blocks' dQ add up. With the ordinary op each call allocates
its own fp32 dQ workspace (16 KiB per query row at h32 d128) and returns a dQ that
the ring adds to a running total: at a step the rank holds the total, the
workspace and the block's dQ together. Instead the ring allocates one fp32
accumulator (b, hq, rows16(s), cols8(d)), zeroed once; every call adds its dQ /
scale into it (``BackwardArgs::dq_accum`` in orchard/attention.h: the kernels'
reductions land there directly, nothing is cleared or converted per call), and
after the ring the accumulator becomes dQ in one pass (scale and rounding in one).

Layout: row-major rows of cols8(d) floats on the CPU; on CUDA each 16 x 8 tile is
in mma.sync's C-fragment order (backends/cuda/launch.h: tile-major, then lane
g * 4 + t, then the lane's values (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)), which
:func:`to_dq` undoes with a strided view. A call over rows r0.. of the shard adds
into the view ``acc[:, :, r0:]``, so every block's first row must be a multiple of
16 (:func:`usable` says when).
"""

from __future__ import annotations

import os

import torch

from .. import _ops

__all__ = ["usable", "zeros", "rows_view", "backward_into", "to_dq"]


def _rows16(n: int) -> int:
    return (n + 15) // 16 * 16


def _cols8(n: int) -> int:
    return (n + 7) // 8 * 8


def usable(q: torch.Tensor, deterministic: bool, row_starts) -> bool:
    """True when the accumulator path can run these calls: CPU (16/32-bit) or CUDA
    (16-bit) inputs, not deterministic, every block's first local row a multiple of
    16, whole 16-row tiles and 8-column tiles (so the conversion is one strided copy
    into dQ), and not switched off with ORCHARD_CP_DQ_ACCUM=0 (the comparison runs)."""
    if os.environ.get("ORCHARD_CP_DQ_ACCUM", "1") == "0" or deterministic:
        return False
    if q.device.type == "cpu":
        ok_dtype = q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif q.device.type == "cuda":
        ok_dtype = q.dtype in (torch.bfloat16, torch.float16)
    else:
        return False
    s, d = q.shape[1], q.shape[3]
    return ok_dtype and s % 16 == 0 and d % 8 == 0 and all(r % 16 == 0 for r in row_starts)


def zeros(q: torch.Tensor) -> torch.Tensor:
    b, s, h, d = q.shape
    return torch.zeros(b, h, _rows16(s), _cols8(d), dtype=torch.float32, device=q.device)


def rows_view(acc: torch.Tensor, rows: slice) -> torch.Tensor:
    """The accumulator of local query rows ``rows`` (a slice whose start is a multiple of 16)."""
    start = rows.start or 0
    return acc if start == 0 else acc[:, :, start:]


_WORKSPACE_BYTES: dict = {}
# Backward calls made through the accumulator since the last reset (tests pin the path).
stats = {"calls": 0}


def backward_into(acc, dout, q, k, v, out, lse, scale, causal, dropout_p, rng_state, features,
                  deterministic, op_name, dk=None, dv=None):
    """Orchard's backward of one block with its dQ / scale added into ``acc`` (a
    rows_view of the accumulator); returns (dk, dv), written into the given views
    when dk / dv are passed (any strides), else new tensors. causal is bottom-right
    top-left aligned (the ring's causal blocks are square diagonals)."""
    stats["calls"] += 1
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    feats = _ops._full_features(tuple(features))
    opts = (float(scale), bool(causal), True, float(dropout_p), 0, 0, bool(deterministic))

    def launch(stream):
        key = (q.device, q.shape, k.shape, v.shape, q.dtype, bool(causal), dropout_p > 0.0)
        nbytes = _WORKSPACE_BYTES.get(key)
        if nbytes is None:
            nbytes = int(_ops._C.backward_workspace_bytes(
                q.detach(), k.detach(), v.detach(), out.detach(), dout.detach(), lse.detach(), None,
                dk, dv, *opts, stream, op_name, _ops._features(*feats), None, acc))
            _WORKSPACE_BYTES[key] = nbytes
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes > 0 else None
        *t, rng = _ops._export(q, k, v, out, dout, lse, None, dk, dv, workspace, rng_state)
        _ops._C.backward(*t, *opts, stream, op_name, rng, _ops._features(*feats), None,
                         _ops._export(acc)[0])

    _ops._launch_on_device_of(q, launch)
    return dk, dv


def to_dq(acc: torch.Tensor, s: int, d: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """dQ (b, s, hq, d) in ``dtype`` = scale * the accumulator, in one pass (the product in
    fp32, rounded once, as the op's own conversion). Needs s % 16 == 0 and d % 8 == 0."""
    b, h = acc.shape[:2]
    dq = torch.empty(b, s, h, d, dtype=dtype, device=acc.device)
    copy_logical(dq, acc, mma_tiles=acc.device.type == "cuda", scale=scale)
    return dq


def copy_logical(dst: torch.Tensor, acc: torch.Tensor, mma_tiles: bool, scale: float = 1.0) -> None:
    """dst (b, s, hq, d) <- scale * the accumulator's values, read in its element order:
    row-major, or (mma_tiles) CUDA's tile order: slab (rt, ct, g, t, half, pair) holds row
    rt*16 + half*8 + g, column ct*8 + t*2 + pair. One strided pass, no temporary."""
    b, s, h, d = dst.shape
    if not mma_tiles:
        torch.mul(acc[:, :, :s, :d].permute(0, 2, 1, 3), scale, out=dst)
        return
    tiles = acc[:, :, :s].view(b, h, s // 16, d // 8, 8, 4, 2, 2)
    torch.mul(tiles.permute(0, 2, 6, 4, 1, 3, 5, 7), scale,
              out=dst.view(b, s // 16, 2, 8, h, d // 8, 4, 2))
