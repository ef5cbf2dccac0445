"""``flash_attn_varlen_func(..., block_table=...)``: packed queries over a paged KV cache, the
form flash-attn >= 2.5 accepts (a serving engine's prefill over its page pool).

k_cache, v_cache: (num_blocks, page_size, nheads_k, headdim[_v]); block_table: int32 (batch,
max_blocks_per_seq). Sequence b attends to its cache positions [0, len_k), len_k =
cu_seqlens_k[b + 1] - cu_seqlens_k[b]; position j is row j % page_size of block
block_table[b, j // page_size]. Any page size (flash-attn asks for multiples of 256).

How, in one of two forms:
- decode form: calls with at most KVCACHE_MAX_ROWS query rows per sequence that need no gradient
  (a decode or speculative step of a serving batch) run on the KV-cache kernels, which read the
  pages in place: each sequence's query rows are placed at the end of a (batch, max_seqlen_q)
  block (so the kernels' bottom-right diagonal is the sequence's own) and the results taken back
  out. Taken when ``flash_attn_with_kvcache`` has everything the call asks for (under
  torch.compile too, as the traceable op ``orchard::kvcache_forward``): no dropout, sink
  or attention-probability output; fp32 / bf16 / fp16; head dim a multiple of 8 up to 256 with
  v's equal to q's; pages a multiple of 16 rows; CPU or CUDA.
- gather form (every other call): the sequences' cache rows are gathered into one packed
  (total_k, nheads_k, headdim) copy — one read and one write of the rows in use — and the call
  runs as a plain varlen call on it: every feature, dtype and kernel (Hopper's included) of the
  varlen path, and a backward (gradients reach k_cache / v_cache through the gather). Next to a
  prefill's attention the copy is cheap (a 4 x 1024-token causal prefill, 2 CPU threads: 1.04-1.06x
  the packed call's time in fp32, 1.09-1.11x in bf16); a decode step (4 sequences x 4096 keys,
  d128) took 65.9 / 34.8 ms gathered (fp32 / bf16) and takes 7.5 / 10.7 ms in the decode form
  (bench/RESULTS.md, session 40).

The decode form also serves flash_attn_varlen_func calls without a block_table (packed keys, read
in place as one cache entry that every sequence indexes from its first key): a serving step over
packed keys, 4 sequences x 4096 keys d128 fp32 on 2 CPU threads, 21.1 -> 6.5 ms.

Checks (op-prefixed ValueErrors, before anything runs): block_table's dtype, shape and device;
the caches' shapes; and, where the values can be read (not while a CUDA graph is captured or
torch.compile traces, as for cu_seqlens), every block a sequence uses inside the pool and each
sequence within its row of the table. Unchecked, out-of-range entries are clamped into the
pool: never read outside it, but meaningless."""

from __future__ import annotations

import torch

from ._ops import check_one_device, host_values_readable
from .kvcache import OP as _KVCACHE_OP
from .kvcache import flash_attn_with_kvcache, serves_in_place

_Tensor = torch.Tensor

#: Query rows per sequence (max_seqlen_q) up to which a call takes the decode form.
KVCACHE_MAX_ROWS = 16


def check_paged_shapes(op: str, q, k_cache, v_cache, block_table, batch: int) -> None:
    """The table's dtype, shape and device and the caches' shapes."""
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
    check_one_device(op, (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table)))


def check_paged_blocks(op: str, k_cache, block_table, cu_seqlens_k) -> None:
    """Where the values can be read (one host read): each sequence within its row of the table,
    every block it uses inside the pool. After check_paged_shapes and the cu_seqlens_k checks."""
    if cu_seqlens_k.numel() < 2 or not host_values_readable(cu_seqlens_k):
        return
    num_blocks, page, max_blocks = k_cache.shape[0], k_cache.shape[1], block_table.shape[1]
    seq, blk, _ = _key_rows(cu_seqlens_k, int(cu_seqlens_k[-1]), page)
    past = blk >= max_blocks
    if bool(past.any()):
        i = int(past.nonzero()[0, 0])
        raise ValueError(f"{op}: sequence {int(seq[i])} needs cache position {int(blk[i]) * page} and up, past "
                         f"its block_table row of {max_blocks} blocks x page_size {page}")
    ids = block_table[seq, blk]
    bad = (ids < 0) | (ids >= num_blocks)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: block_table[{int(seq[i])}, {int(blk[i])}] = {int(ids[i])} is outside the "
                         f"cache's {num_blocks} blocks")


def keys_from_zero(cu_seqlens_k):
    """cu_seqlens_k starting at 0: a paged sequence's keys are its cache positions [0, length), so
    only the differences count (flash-attn reads them so too). The tensor itself where it already
    starts at 0; a shifted copy (one small op, no host read) where the values cannot be read
    (CUDA graph capture, torch.compile). Left as is where the checks after it will refuse it."""
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() == 0 \
            or cu_seqlens_k.is_meta:
        return cu_seqlens_k
    if host_values_readable(cu_seqlens_k) and int(cu_seqlens_k[0]) == 0:
        return cu_seqlens_k
    return cu_seqlens_k - cu_seqlens_k[:1]


def _key_rows(cu_seqlens_k, rows: int, page: int):
    """(sequence, block column, cache position) of packed key rows [0, rows)."""
    batch = cu_seqlens_k.numel() - 1
    r = torch.arange(rows, dtype=torch.int32, device=cu_seqlens_k.device)
    seq = torch.searchsorted(cu_seqlens_k[1:], r, right=True).clamp_(max=batch - 1)
    pos = r - cu_seqlens_k[seq]
    return seq, torch.div(pos, page, rounding_mode="floor"), pos


def gather_paged_kv(q, k_cache, v_cache, block_table, cu_seqlens_k, max_seqlen_k: int):
    """The gather form's packed (rows, nheads_k, headdim) k and v (after check_paged), row r of
    sequence b (r in [cu_seqlens_k[b], cu_seqlens_k[b + 1])) holding its cache position
    r - cu_seqlens_k[b]. rows = cu_seqlens_k[-1] where the values are readable, else
    batch * max_seqlen_k (the rows past cu_seqlens_k[-1] are filler no sequence reads)."""
    batch = cu_seqlens_k.numel() - 1
    num_blocks, page, max_blocks = k_cache.shape[0], k_cache.shape[1], block_table.shape[1]
    rows = int(cu_seqlens_k[-1]) if host_values_readable(cu_seqlens_k) else batch * int(max_seqlen_k)
    if batch == 0 or rows <= 0:
        return k_cache.new_empty((0, *k_cache.shape[2:])), v_cache.new_empty((0, *v_cache.shape[2:]))
    seq, blk, pos = _key_rows(cu_seqlens_k, rows, page)
    ids = block_table[seq, blk.clamp(0, max_blocks - 1)].clamp_(0, num_blocks - 1).long()
    row = torch.remainder(pos, page).long()
    return k_cache[ids, row], v_cache[ids, row]


def decode_form_applies(q, k_cache, v_cache, max_seqlen_q: int, dropout_p, sink, return_attn_probs) -> bool:
    """Whether the call runs on the KV-cache kernels (the module docstring's decode form)."""
    if not (0 < int(max_seqlen_q) <= KVCACHE_MAX_ROWS) or return_attn_probs:
        return False
    if q.dim() != 3 or k_cache.dim() != v_cache.dim() or k_cache.dim() not in (3, 4):
        return False  # the varlen path's checks name what is wrong
    # 4-D: a page pool, whose pages the kernels take in multiples of 16 rows; 3-D: packed
    # (total_k, nheads_k, headdim) keys, read as one cache entry.
    if k_cache.dim() == 4 and k_cache.shape[1] % 16:
        return False
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return False  # the KV-cache kernels read rows in place; the gather form copies such views
    return serves_in_place(q, k_cache, v_cache, dropout_p, sink)


def attend_decode_form(op, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, block_table,
                       softmax_scale, causal, window_size, softcap, alibi_slopes):
    """(out (total_q, nheads, headdim), lse (nheads, total_q) float32) of the decode form, or None
    when the KV-cache kernels cannot read these caches in place (NotImplementedError before
    anything runs: CUDA's 16-byte strides), for the caller's other path. Rows of q past
    cu_seqlens_q[-1] belong to no sequence: out 0, lse -inf, as on the varlen path. Without a
    block_table, k / v are packed (total_k, nheads_k, headdim) keys, read as one cache entry that
    every sequence indexes from its first key (cache_batch_idx 0, cache_leftpad cu_seqlens_k[b],
    cache_seqlens cu_seqlens_k[b + 1])."""
    batch = cu_seqlens_q.numel() - 1
    total, heads, d = q.shape
    if batch == 0:  # no sequence: every row is one no sequence owns
        return q.new_zeros(q.shape), torch.full((heads, total), float("-inf"), device=q.device)
    max_q = int(max_seqlen_q)
    r = torch.arange(total, dtype=torch.int32, device=q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:], r, right=True)
    # Rows before cu_seqlens_q[0] or from cu_seqlens_q[-1] on belong to no sequence.
    inside = (seq < batch) & (r >= cu_seqlens_q[0])
    seq = seq.clamp_(max=max(batch - 1, 0))
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1])[seq]
    slot = (r - cu_seqlens_q[seq] + max_q - len_q).clamp_(0, max_q - 1).long()  # end-aligned
    seq = seq.long()
    # Rows outside every sequence go to a spare batch entry, so no boolean indexing (which would
    # read its count back to the host, and cannot run while a CUDA graph is captured).
    q_pad = q.new_zeros(batch + 1, max_q, heads, d)
    q_pad[torch.where(inside, seq, batch), slot] = q
    q_pad = q_pad[:batch]
    if block_table is not None:
        where = dict(cache_seqlens=(cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32), block_table=block_table)
    else:
        k_cache, v_cache = k_cache.unsqueeze(0), v_cache.unsqueeze(0)
        where = dict(cache_seqlens=cu_seqlens_k[1:].contiguous(), cache_leftpad=cu_seqlens_k[:-1].contiguous(),
                     cache_batch_idx=torch.zeros(batch, dtype=torch.int32, device=q.device))
    try:
        out_pad, lse_pad = flash_attn_with_kvcache(q_pad, k_cache, v_cache, softmax_scale=softmax_scale,
                                                   causal=causal, window_size=window_size, softcap=softcap,
                                                   alibi_slopes=alibi_slopes, return_softmax_lse=True, **where)
    except NotImplementedError:
        return None
    except (ValueError, TypeError) as e:  # bad alibi_slopes, say: named as the caller's op
        raise type(e)(str(e).replace(_KVCACHE_OP, op, 1)) from None
    out = torch.where(inside[:, None, None], out_pad[seq, slot], 0.0).to(q.dtype)
    lse = torch.where(inside[None, :], lse_pad[seq, :, slot].transpose(0, 1), float("-inf"))
    return out, lse
