"""Process groups, input validation across ranks, and the point-to-point and
collective helpers every mode goes through (so tests can count exchanges).

Validation: every public function calls :func:`validate` before its first
collective. Each rank checks its own input, then all ranks exchange one small
int64 metadata tensor (one ``all_gather``) and every rank raises the same kind of
op-prefixed error when any rank's input is bad or the ranks disagree — so a bad
shard never leaves the others waiting in a collective.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None

__all__ = ["comm_stats", "kernel_stats", "reset_comm_stats", "resolve_group"]

# Number of exchanges made since the last reset, by kind:
#   "kv"      one K/V ring step (batch_isend_irecv of K and V)
#   "dkv"     one dK/dV ring step (batch_isend_irecv of the dK and dV accumulator)
#   "all_to_all", "all_gather", "reduce_scatter"  one collective each
#   "validate"  the metadata all_gather of an input check
comm_stats: dict[str, int] = {}

# Attention kernel calls since the last reset, by kind ("fwd", "bwd"): the ring
# counts its per-step calls here so tests can pin them (one call per ring step
# without dropout).
kernel_stats: dict[str, int] = {}

# Benchmarks only (bench/cp_bench.py): when True, exchanges are skipped and
# each "received" buffer is a copy of what would have been sent, so the same
# kernels run on the same shapes without communication. Results are wrong.
_SKIP_EXCHANGE = False


def reset_comm_stats() -> None:
    comm_stats.clear()
    kernel_stats.clear()


def count_kernel(kind: str) -> None:
    kernel_stats[kind] = kernel_stats.get(kind, 0) + 1


def _count(kind: str) -> None:
    comm_stats[kind] = comm_stats.get(kind, 0) + 1


def _need_dist(op: str) -> None:
    if dist is None or not dist.is_available():
        raise RuntimeError(f"{op}: torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError(f"{op}: the default process group is not initialized; call "
                           f"torch.distributed.init_process_group() first (every rank)")


def resolve_group(group, op: str = "orchard.distributed"):
    """A ProcessGroup from None (the default group), a ProcessGroup, or a 1-D
    DeviceMesh (or a named 1-D slice of one, ``mesh["cp"]``)."""
    _need_dist(op)
    if group is None:
        return dist.group.WORLD
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{op}: a DeviceMesh must be 1-D here (pass mesh['<dim name>']); "
                             f"got a {group.ndim}-D mesh")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"{op}: group must be None, a ProcessGroup or a 1-D DeviceMesh, got "
                    f"{type(group).__name__}")


@dataclass(frozen=True)
class GroupInfo:
    group: object
    rank: int
    size: int
    next_global: int  # global rank of (rank + 1) % size in the group
    prev_global: int  # global rank of (rank - 1) % size in the group


def group_info(group, op: str) -> GroupInfo:
    pg = resolve_group(group, op)
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of "
                         f"the process group it was given")
    size = dist.get_world_size(pg)
    nxt = dist.get_global_rank(pg, (rank + 1) % size)
    prv = dist.get_global_rank(pg, (rank - 1) % size)
    return GroupInfo(pg, rank, size, nxt, prv)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_LAYOUTS = {"contiguous": 1, "zigzag": 2}
_ERR_KIND = {None: 0, ValueError: 1, NotImplementedError: 2, TypeError: 3}
_KIND_ERR = {v: k for k, v in _ERR_KIND.items()}
_META_LEN = 24


def _meta_device(pg, q):
    backend = str(dist.get_backend(pg)).lower()
    on_cuda = isinstance(q, torch.Tensor) and q.is_cuda
    if "nccl" in backend and ("gloo" not in backend or on_cuda):
        if on_cuda:
            return q.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _local_check(op, q, k, v, causal, layout, dropout_p, softmax_scale, size, heads_divisible,
                 same_kv_len, seq_factor=1):
    """(exception class, message) for this rank's input, or (None, '')."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return ValueError, (f"{op}: {name} must be 4-D (batch, local_seqlen, heads, head_dim), "
                                f"got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        return ValueError, f"{op}: unsupported dtype {q.dtype} (float16, bfloat16, float32, float64)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return ValueError, f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if k.device != q.device or v.device != q.device:
        return ValueError, f"{op}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if k.shape != v.shape:
        return ValueError, f"{op}: k and v shapes differ ({tuple(k.shape)} vs {tuple(v.shape)})"
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        return ValueError, (f"{op}: batch/head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} "
                            f"do not match")
    if same_kv_len and k.shape[1] != s:
        return ValueError, (f"{op}: q and k/v shards must cover the same positions (same local "
                            f"length); got {s} and {k.shape[1]}")
    hkv = k.shape[2]
    if hkv == 0 or h % hkv != 0:
        return ValueError, (f"{op}: number of query heads ({h}) must be a multiple of key/value "
                            f"heads ({hkv})")
    if layout not in _LAYOUTS:
        return ValueError, f"{op}: layout must be 'zigzag' or 'contiguous', got {layout!r}"
    if layout == "zigzag" and (s * seq_factor) % 2 != 0:
        return ValueError, (f"{op}: the zigzag layout holds two equal chunks per rank, so the "
                            f"ring's local sequence length must be even; got {s * seq_factor} "
                            f"(the global length must be a multiple of 2 * the ring size)")
    if heads_divisible and (h % size != 0 or hkv % size != 0):
        return ValueError, (f"{op}: query heads ({h}) and key/value heads ({hkv}) must both be "
                            f"divisible by the group size ({size}) for the all-to-all")
    if not 0.0 <= float(dropout_p) < 1.0:
        return ValueError, f"{op}: dropout_p must be in [0, 1), got {dropout_p}"
    if softmax_scale is not None and not float(softmax_scale) > 0.0:
        return ValueError, f"{op}: softmax_scale must be > 0, got {softmax_scale}"
    return None, ""


def gather_verdict(op, info: GroupInfo, q, k, v, *, causal, layout, dropout_p, softmax_scale,
                   heads_divisible=False, same_kv_len=True, seq_factor=1, upstream=None,
                   rng_state=None):
    """(exception class, message) for this group: this rank's own error, or the
    first other rank's, or disagreement between ranks; (None, '') when all is well.
    One all_gather of a small int64 tensor. ``upstream``: an earlier verdict of
    this rank (another group's) to pass on to this group's members. ``rng_state``:
    the dropout key this rank drew (int64 (seed, offset)), which every rank must
    share (the ranks draw the blocks of one mask)."""
    err_cls, msg = _local_check(op, q, k, v, causal, layout, dropout_p, softmax_scale, info.size,
                                heads_divisible, same_kv_len, seq_factor)
    if err_cls is None and upstream is not None and upstream[0] is not None:
        err_cls, msg = upstream
    meta = [0] * _META_LEN
    meta[0] = _ERR_KIND.get(err_cls, 1)
    if err_cls is None:
        meta[1:5] = list(q.shape)
        meta[5:9] = list(k.shape)
        meta[9] = _DTYPES[q.dtype]
        meta[10] = 2 if q.is_cuda else 1
        meta[11] = int(bool(causal))
        meta[12] = _LAYOUTS[layout]
        meta[13] = -1 if softmax_scale is None else _f64_bits(softmax_scale)
        meta[14] = _f64_bits(dropout_p)
        if rng_state is not None:
            meta[15:17] = [int(x) for x in rng_state.tolist()]
    if info.size == 1:
        return err_cls, msg
    dev = _meta_device(info.group, q)
    local = torch.tensor(meta, dtype=torch.int64, device=dev)
    gathered = torch.empty(info.size * _META_LEN, dtype=torch.int64, device=dev)
    _count("validate")
    dist.all_gather_into_tensor(gathered, local, group=info.group)
    rows = gathered.view(info.size, _META_LEN).cpu().tolist()
    if err_cls is not None:
        return err_cls, msg
    bad = [r for r, row in enumerate(rows) if row[0] != 0]
    if bad:
        kind = _KIND_ERR.get(rows[bad[0]][0]) or ValueError
        return kind, (f"{op}: rank(s) {bad} of the group rejected their input (see the error "
                      f"raised on that rank); this rank's input is fine")
    fields = ((1, 5, "q shape"), (5, 9, "k/v shape"), (9, 10, "dtype"), (10, 11, "device type"),
              (11, 12, "causal"), (12, 13, "layout"), (13, 14, "softmax_scale"),
              (14, 15, "dropout_p"), (15, 17, "dropout key"))
    for lo, hi, what in fields:
        vals = [tuple(row[lo:hi]) for row in rows]
        if any(x != vals[0] for x in vals):
            per_rank = {r: (x if hi - lo > 1 else x[0]) for r, x in enumerate(vals)}
            if what == "dtype":
                names = {v: k for k, v in _DTYPES.items()}
                per_rank = {r: names.get(x, x) for r, x in per_rank.items()}
            if what == "dropout key":
                return ValueError, (f"{op}: ranks drew different dropout keys {per_rank} (seed, "
                                    f"offset): dropout needs the same random generator state on "
                                    f"every rank of the group (e.g. torch.manual_seed(s) on all "
                                    f"of them), since each rank draws its block of one mask")
            return ValueError, (f"{op}: ranks disagree on {what} (every rank must pass shards of "
                                f"the same shape, dtype and options): {per_rank}")
    return None, ""


def validate(op, info: GroupInfo, q, k, v, *, check=True, **kw):
    """Raise, on every rank of the group, if any rank's input is bad or the ranks
    disagree (see :func:`gather_verdict`). check=False: local checks only, no
    collective (for callers that guarantee consistent input)."""
    if not check:
        err_cls, msg = _local_check(op, q, k, v, kw.get("causal"), kw.get("layout"),
                                    kw.get("dropout_p", 0.0), kw.get("softmax_scale"), info.size,
                                    kw.get("heads_divisible", False), kw.get("same_kv_len", True),
                                    kw.get("seq_factor", 1))
    else:
        err_cls, msg = gather_verdict(op, info, q, k, v, **kw)
    if err_cls is not None:
        raise err_cls(msg)


# ---------------------------------------------------------------------------
# Exchanges
# ---------------------------------------------------------------------------

class RingExchange:
    """Sends tensors to the next rank of the ring and receives the same shapes
    from the previous one (``batch_isend_irecv``). On CUDA the ops are issued on
    a side communication stream that first waits for the compute stream, so the
    transfer runs while the caller launches its next kernel; ``wait()`` makes the
    compute stream wait for the transfer. On the CPU (gloo) it is the same
    without streams."""

    _streams: dict = {}

    def __init__(self, info: GroupInfo, kind: str):
        self.info = info
        self.kind = kind

    @classmethod
    def _comm_stream(cls, device):
        s = cls._streams.get(device)
        if s is None:
            s = torch.cuda.Stream(device=device)
            cls._streams[device] = s
        return s

    def start(self, send: list, recv: list | None = None):
        """Post the exchange; returns a handle whose ``wait()`` returns the received tensors."""
        if recv is None:
            recv = [torch.empty_like(t) for t in send]
        _count(self.kind)
        if _SKIP_EXCHANGE:
            for r, s in zip(recv, send):
                r.copy_(s)
            return _Done(recv)
        info = self.info
        ops = [dist.P2POp(dist.isend, t, info.next_global, info.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, info.prev_global, info.group) for t in recv]
        dev = send[0].device
        if dev.type == "cuda":
            cur = torch.cuda.current_stream(dev)
            comm = self._comm_stream(dev)
            comm.wait_stream(cur)
            with torch.cuda.stream(comm):
                reqs = dist.batch_isend_irecv(ops)
            return _Pending(reqs, recv, send, comm, cur)
        reqs = dist.batch_isend_irecv(ops)
        return _Pending(reqs, recv, send, None, None)


class _Done:
    def __init__(self, recv):
        self.recv = recv

    def wait(self):
        return self.recv


class _Pending:
    def __init__(self, reqs, recv, send, comm, cur):
        self.reqs, self.recv, self.send, self.comm, self.cur = reqs, recv, send, comm, cur

    def wait(self):
        if self.comm is not None:
            with torch.cuda.stream(self.comm):
                for r in self.reqs:
                    r.wait()
            self.cur.wait_stream(self.comm)
            # The sent buffers were read on the comm stream; keep the caching
            # allocator from reusing them before that stream is done.
            for t in self.send:
                t.record_stream(self.comm)
            for t in self.recv:
                t.record_stream(self.comm)
        else:
            for r in self.reqs:
                r.wait()
        self.send = None
        return self.recv


def all_to_all(out: torch.Tensor, inp: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """all_to_all_single along dim 0 (equal splits)."""
    if info.size == 1:
        out.copy_(inp)
        return out
    _count("all_to_all")
    if _SKIP_EXCHANGE:
        out.copy_(inp)
        return out
    dist.all_to_all_single(out, inp, group=info.group)
    return out


def all_gather(out: torch.Tensor, inp: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """all_gather_into_tensor: out is (size * inp.shape[0], ...)."""
    if info.size > 1:
        _count("all_gather")
    if _SKIP_EXCHANGE or info.size == 1:
        out.view(info.size, *inp.shape).copy_(inp.unsqueeze(0).expand(info.size, *inp.shape))
        return out
    dist.all_gather_into_tensor(out, inp.contiguous(), group=info.group)
    return out


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Sum over ranks of inp (size * out.shape[0], ...), this rank's slice into out."""
    if info.size > 1:
        _count("reduce_scatter")
    n = out.shape[0]
    if _SKIP_EXCHANGE or info.size == 1:
        out.copy_(inp[info.rank * n:(info.rank + 1) * n])
        return out
    backend = str(dist.get_backend(info.group)).lower()
    if inp.is_cuda or "gloo" not in backend:
        dist.reduce_scatter_tensor(out, inp.contiguous(), group=info.group)
        return out
    # gloo has no reduce_scatter: all_reduce, keep this rank's slice.
    buf = inp.contiguous().clone()
    dist.all_reduce(buf, group=info.group)
    out.copy_(buf[info.rank * n:(info.rank + 1) * n])
    return out
