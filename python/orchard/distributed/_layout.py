"""Sequence layouts: which global positions each rank holds.

* ``"contiguous"``: rank r holds positions [r * S/W, (r + 1) * S/W).
* ``"zigzag"`` (head-tail): the sequence is cut into 2W equal chunks and rank r
  holds chunk r followed by chunk 2W-1-r. This is the layout of torch's context
  parallelism (``_HeadTailLoadBalancer`` in torch.distributed.tensor.experimental),
  so shards made by either interoperate. Under a causal mask every rank then does
  the same amount of work.
"""

from __future__ import annotations

import torch

from . import _comm

__all__ = ["shard_positions", "shard_sequence", "unshard_sequence", "zigzag_chunk_order"]

LAYOUTS = ("zigzag", "contiguous")


def _check_layout(layout, op):
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be 'zigzag' or 'contiguous', got {layout!r}")


def zigzag_chunk_order(world_size: int) -> list[int]:
    """The global chunk index (of 2W chunks) at each chunk slot of the rank-major
    zigzag concatenation: [0, 2W-1, 1, 2W-2, ...]."""
    order = []
    for r in range(world_size):
        order += [r, 2 * world_size - 1 - r]
    return order


def _divisor(layout, world_size):
    return 2 * world_size if layout == "zigzag" else world_size


def shard_positions(seqlen: int, world_size: int, rank: int, layout: str = "zigzag",
                    device=None) -> torch.Tensor:
    """Global positions (int64) of the rows rank ``rank`` holds, in local order."""
    op = "orchard.distributed.shard_positions"
    _check_layout(layout, op)
    n = _divisor(layout, world_size)
    if seqlen % n != 0:
        raise ValueError(f"{op}: sequence length {seqlen} is not divisible by {n} "
                         f"({'2 * ' if layout == 'zigzag' else ''}world size {world_size}, "
                         f"layout {layout!r})")
    if not 0 <= rank < world_size:
        raise ValueError(f"{op}: rank {rank} not in [0, {world_size})")
    if layout == "contiguous":
        s = seqlen // world_size
        return torch.arange(rank * s, (rank + 1) * s, device=device)
    c = seqlen // n
    a = torch.arange(rank * c, (rank + 1) * c, device=device)
    b = torch.arange((n - 1 - rank) * c, (n - rank) * c, device=device)
    return torch.cat([a, b])


def _world_rank(group, world_size, rank, op):
    if world_size is not None or rank is not None:
        if world_size is None or rank is None:
            raise ValueError(f"{op}: pass both world_size and rank, or a group")
        return int(world_size), int(rank)
    info = _comm.group_info(group, op)
    return info.size, info.rank


def shard_sequence(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1, *,
                   world_size: int | None = None, rank: int | None = None) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` (same on every rank) along
    ``dim`` (1 for BSHD). Pass a group / DeviceMesh (default: the default group),
    or world_size and rank explicitly (no process group needed). No
    communication. Returns a contiguous tensor."""
    op = "orchard.distributed.shard_sequence"
    _check_layout(layout, op)
    w, r = _world_rank(group, world_size, rank, op)
    s = x.shape[dim]
    n = _divisor(layout, w)
    if s % n != 0:
        raise ValueError(f"{op}: sequence length {s} (dim {dim}) is not divisible by {n} "
                         f"({'2 * ' if layout == 'zigzag' else ''}world size {w}, layout "
                         f"{layout!r})")
    if layout == "contiguous":
        return x.narrow(dim, r * (s // w), s // w).contiguous()
    c = s // n
    return torch.cat([x.narrow(dim, r * c, c), x.narrow(dim, (n - 1 - r) * c, c)], dim=dim)


def reorder_gathered(x: torch.Tensor, world_size: int, layout: str, dim: int = 1,
                     inverse: bool = False) -> torch.Tensor:
    """Rank-major concatenation of shards (along dim) -> natural order, or back
    (inverse=True). Identity for the contiguous layout."""
    if layout == "contiguous" or world_size == 1:
        return x
    n = 2 * world_size
    order = zigzag_chunk_order(world_size)  # slot -> chunk
    if inverse:
        idx = order  # natural chunks picked in slot order
    else:
        idx = [0] * n
        for slot, chunk in enumerate(order):
            idx[chunk] = slot  # chunk -> slot
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[i] for i in idx], dim=dim)


def unshard_sequence(x_local: torch.Tensor, group=None, layout: str = "zigzag",
                     dim: int = 1) -> torch.Tensor:
    """The full sequence, in natural order, from every rank's shard (one
    all_gather; every rank gets the result). Inverse of :func:`shard_sequence`.
    Not differentiable."""
    op = "orchard.distributed.unshard_sequence"
    _check_layout(layout, op)
    info = _comm.group_info(group, op)
    xm = x_local.detach().movedim(dim, 0).contiguous()
    out = torch.empty(info.size * xm.shape[0], *xm.shape[1:], dtype=xm.dtype, device=xm.device)
    _comm.all_gather(out, xm, info)
    out = reorder_gathered(out, info.size, layout, dim=0)
    return out.movedim(0, dim)
