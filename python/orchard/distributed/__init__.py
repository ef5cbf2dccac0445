"""Context parallelism for Orchard over ``torch.distributed``: one sequence
sharded across the ranks of a process group (NCCL on GPUs, gloo on the CPU),
attention computed with Orchard's fused kernels (``torch.ops.orchard.*``) and
differentiable end to end.

Modes (all take BSHD shards, flash-attn's argument order, and a ProcessGroup or
1-D DeviceMesh as ``group``):

* :func:`ring_flash_attn_func` — K/V rotate around the ring (batch_isend_irecv,
  overlapped with the kernels), partial results merged with the LSE in fp32;
  backward: a second ring carries dK/dV (W-1 exchanges, sums in fp32). One
  kernel call per ring step (zigzag or not, causal or not; dropout splits a step
  into its chunk pairs). Any number of heads; memory per rank O(S/W). ``layout="zigzag"`` balances causal work.
* :func:`ulysses_flash_attn_func` — all_to_all to head shards and back; needs
  heads and kv-heads divisible by the group size.
* :func:`allgather_flash_attn_func` — all_gather K/V, reduce-scatter dK/dV;
  cheap with GQA/MQA (K/V much smaller than Q).
* :func:`hybrid_flash_attn_func` — Ulysses inside a node, ring across nodes.

Shards: :func:`shard_sequence` / :func:`unshard_sequence` (``layout`` "zigzag" —
rank r holds chunks r and 2W-1-r of 2W, the head-tail layout of torch's context
parallelism — or "contiguous"), :func:`hybrid_shard_sequence` for the hybrid.

Dropout (``dropout_p``) gives exactly the single-device result: Orchard's mask
is Philox indexed by (batch * heads + head, row, col), and every kernel call here
passes the global position of its first query row, first key and first head
(the ops' dropout_*_offset arguments), so it draws its block of the
single-device mask (_dropout.py). Every rank draws the key from torch's
generator as ``orchard.flash_attn_func`` does: seed the ranks alike
(``torch.manual_seed``); the input check raises if their keys differ.

Bad input (mismatched shards across ranks, lengths the layout cannot split,
heads Ulysses cannot split, no process group) raises an error prefixed with the
function name on every rank: one small all_gather of a metadata tensor runs
before the first collective (``check_inputs=False`` skips it).
"""

from __future__ import annotations

from ._comm import comm_stats, reset_comm_stats
from ._layout import shard_positions, shard_sequence, unshard_sequence
from ._merge import merge_attention
from .allgather import allgather_flash_attn_func
from .hybrid import hybrid_flash_attn_func, hybrid_shard_sequence, hybrid_unshard_sequence
from .ring import ring_flash_attn_func
from .ulysses import ulysses_flash_attn_func

__all__ = [
    "ring_flash_attn_func",
    "ulysses_flash_attn_func",
    "allgather_flash_attn_func",
    "hybrid_flash_attn_func",
    "shard_sequence",
    "unshard_sequence",
    "shard_positions",
    "hybrid_shard_sequence",
    "hybrid_unshard_sequence",
    "merge_attention",
    "comm_stats",
    "reset_comm_stats",
]
