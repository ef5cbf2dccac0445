"""Dropout under context parallelism: the single-device mask, drawn block by block.

Orchard's mask is counter-based Philox indexed by (batch * heads + head, row,
column) of the attention matrix, keyed by (seed, offset). The ops take the
GLOBAL coordinates of the block a call computes (the trailing feature arguments
dropout_row_offset, dropout_col_offset, dropout_head_offset, dropout_heads), so
a kernel call on any block of rows, keys and heads draws exactly that block of
the mask the single-device call would. The modes here pass, for every call, the
global position of its first query row and first key and (head-sharded modes)
of its first head, with the single-device call's head count.

A call must therefore cover rows and keys that are contiguous in global
position: with dropout, a zigzag shard (two chunks) is split into its chunks.
Every rank draws the key as the single-device op does (one ``torch.randint`` of
(seed, offset) on the device, :func:`orchard._ops.draw_dropout_rng_state`), so
the same generator state on every rank — ``torch.manual_seed(s)`` everywhere —
gives exactly the single-device result with that state; the input check (one
all_gather before the first collective) raises on every rank if the ranks drew
different keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops

__all__ = ["Dropout", "for_call", "shard_chunks"]

# The feature arguments of the ops up to the dropout coordinates, at their defaults
# (window, softcap, ALiBi, sink, attn_mask, varlen); see _ops._FEATURE_SCHEMA.
_PLAIN_FEATURES = _ops._FEATURE_DEFAULTS[:10]


@dataclass(frozen=True)
class Dropout:
    """One call's dropout: probability, key (int64 (seed, offset) tensor on the
    device) and the head coordinates of this rank's heads (head-sharded modes)."""
    p: float
    rng_state: torch.Tensor
    head_offset: int = 0
    heads: int = 0  # the single-device call's query heads; 0: the call's own

    def op_args(self, row_offset, col_offset):
        """(dropout_p, rng_state, *features) for a call whose first query row and
        first key are at these global positions."""
        return (self.p, self.rng_state, *_PLAIN_FEATURES, int(row_offset), int(col_offset),
                int(self.head_offset), int(self.heads))

    def with_heads(self, head_offset, heads):
        return Dropout(self.p, self.rng_state, int(head_offset), int(heads))


def for_call(dropout_p, q):
    """The Dropout of one call (None without dropout): the key drawn exactly as the
    single-device op draws it (torch.randint of (seed, offset) on q's device). Bad
    input draws nothing and is left to the input check to report."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        return None
    if not (0.0 < p < 1.0) or not isinstance(q, torch.Tensor):
        return None
    return Dropout(p, _ops.draw_dropout_rng_state(p, q.device))


def shard_chunks(rank, size, s_local, layout):
    """[(global position of the first row, local rows slice)] of the pieces of
    rank's shard that are contiguous in global position: one for the contiguous
    layout, the two chunks (r and 2W-1-r) for zigzag."""
    if layout == "contiguous":
        return [(rank * s_local, slice(0, s_local))]
    c = s_local // 2
    return [(rank * c, slice(0, c)), ((2 * size - 1 - rank) * c, slice(c, s_local))]
