"""``flash_attn_varlen_func(..., block_table=...)``: packed queries over a paged KV cache, the
form flash-attn >= 2.5 accepts (a serving engine's prefill over its page pool).

k_cache, v_cache: (num_blocks, page_size, nheads_k, headdim[_v]); block_table: int32 (batch,
max_blocks_per_seq). Sequence b attends to its cache positions [0, len_k), len_k =
cu_seqlens_k[b + 1] - cu_seqlens_k[b]; position j is row j % page_size of block
block_table[b, j // page_size]. Any page size (flash-attn asks for multiples of 256).

How: the sequences' cache rows are gathered into one packed (total_k, nheads_k, headdim) copy —
one read and one write of the rows in use — and the call runs as a plain varlen call on it. So
it has every feature, dtype and kernel (Hopper's included) of the varlen path, and a backward:
gradients reach k_cache / v_cache through the gather. The copy costs what one pass over those
keys costs: next to a prefill's attention (every query row against every key) little, next to a
decode step's (a few rows) as much as the attention itself; ``flash_attn_with_kvcache`` reads a
paged cache in place for those.

Checks (op-prefixed ValueErrors, before anything runs): block_table's dtype, shape and device;
the caches' shapes; and, where the values can be read (not while a CUDA graph is captured or
torch.compile traces, as for cu_seqlens), every block a sequence uses inside the pool and each
sequence within its row of the table. Unchecked, out-of-range entries are clamped into the
pool: never read outside it, but meaningless."""

from __future__ import annotations

import torch

_Tensor = torch.Tensor


def _check_shapes(op: str, q, k_cache, v_cache, block_table, batch: int) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)):
        if not isinstance(t, _Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"{op}: with block_table, k and v are paged caches (num_blocks, page_size, nheads_k, "
                         f"headdim); got shapes {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"{op}: k_cache and v_cache must agree in (num_blocks, page_size, nheads_k); got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[0] < 1 or k_cache.shape[1] < 1:
        raise ValueError(f"{op}: the paged cache needs at least one block of at least one row; got shape "
                         f"{tuple(k_cache.shape)}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"{op}: block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"{op}: block_table must be (batch, max_blocks_per_seq) with batch = {batch} (from "
                         f"cu_seqlens_k) and at least one column; got shape {tuple(block_table.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


def _values_readable(t: _Tensor) -> bool:
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def gather_paged_kv(op: str, q, k_cache, v_cache, block_table, cu_seqlens_k, max_seqlen_k: int):
    """The packed (rows, nheads_k, headdim) k and v of a paged call, row r of sequence b (r in
    [cu_seqlens_k[b], cu_seqlens_k[b + 1])) holding its cache position r - cu_seqlens_k[b].
    rows = cu_seqlens_k[-1] where the values are readable, else batch * max_seqlen_k (the rows
    past cu_seqlens_k[-1] are filler no sequence reads)."""
    if not isinstance(cu_seqlens_k, _Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens_k must be a 1-D tensor (batch + 1,) with block_table")
    batch = cu_seqlens_k.numel() - 1
    _check_shapes(op, q, k_cache, v_cache, block_table, batch)
    if cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.device != q.device:
        return k_cache, v_cache  # the varlen checks that follow name the problem
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    max_blocks = block_table.shape[1]
    readable = _values_readable(cu_seqlens_k)
    rows = int(cu_seqlens_k[-1]) if readable else batch * int(max_seqlen_k)
    if batch == 0 or rows <= 0:
        return k_cache.new_empty((0, *k_cache.shape[2:])), v_cache.new_empty((0, *v_cache.shape[2:]))
    r = torch.arange(rows, dtype=torch.int32, device=q.device)
    seq = torch.searchsorted(cu_seqlens_k[1:], r, right=True).clamp_(max=batch - 1)
    pos = r - cu_seqlens_k[seq]  # cache position within the sequence
    blk = torch.div(pos, page, rounding_mode="floor")
    if readable:
        _check_blocks(op, seq, blk, block_table, num_blocks, page, max_blocks)
    ids = block_table[seq, blk.clamp(0, max_blocks - 1)].clamp_(0, num_blocks - 1).long()
    row = torch.remainder(pos, page).long()
    return k_cache[ids, row], v_cache[ids, row]


def _check_blocks(op, seq, blk, block_table, num_blocks, page, max_blocks) -> None:
    """Every row's block is within the table's row and names a block of the pool (one host read)."""
    past = blk >= max_blocks
    if bool(past.any()):
        i = int(past.nonzero()[0, 0])
        b = int(seq[i])
        raise ValueError(f"{op}: sequence {b} needs cache position {int(blk[i]) * page} and up, past its "
                         f"block_table row of {max_blocks} blocks x page_size {page}")
    ids = block_table[seq, blk]
    bad = (ids < 0) | (ids >= num_blocks)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: block_table[{int(seq[i])}, {int(blk[i])}] = {int(ids[i])} is outside the "
                         f"cache's {num_blocks} blocks")
