"""Reference math for the tests: float64 attention on BSHD tensors, the
same-dtype naive computation for flash-attn's tolerance rule, a NumPy
Philox4x32-10 that reproduces Orchard's documented dropout mask, and the
eager-vs-CUDA-graph replay of a step."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def attention_ref(q, k, v, scale=None, causal=False, top_left=False, keep_mask=None, dropout_p=0.0,
                  upcast=True):
    """Math attention on BSHD tensors. upcast=True computes in float64 (the
    reference); upcast=False computes in the inputs' dtype (the 'naive'
    low-precision baseline). GQA by repeating k/v heads. Returns (out, lse)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rep = qh.shape[1] // kh.shape[1]
    if rep > 1:
        kh = kh.repeat_interleave(rep, dim=1)
        vh = vh.repeat_interleave(rep, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    sq, sk = s.shape[-2], s.shape[-1]
    if causal:
        off = 0 if top_left else sk - sq
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(sk, device=s.device)[None, :]
        s = s.masked_fill(j > i + off, float("-inf"))
    lse = torch.logsumexp(s.float() if not upcast else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)  # fully masked rows -> 0
    if keep_mask is not None:
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    out = (p @ vh).transpose(1, 2)
    return (out if upcast else out.to(dtype)), lse


def check_close_rule(got, ref, naive, atol, what=""):
    """flash-attn's rule: max|got - ref| <= 2 * max|naive - ref| + atol."""
    got, ref, naive = got.double().cpu(), ref.double().cpu(), naive.double().cpu()
    err = (got - ref).abs().max().item()
    base = (naive - ref).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 * naive error {base:.3e} + {atol:.1e}"
    return err, base


# ---- Philox4x32-10, vectorised (see include/orchard/philox.h) ----------------
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, key0, key1):
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = np.uint32(key0), np.uint32(key1)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = _M0 * c0.astype(np.uint64)
            p1 = _M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & _MASK32).astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & _MASK32).astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = np.uint32(k0 + _W0)
            k1 = np.uint32(k1 + _W1)
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    t = float(np.float32(p)) * 4294967296.0  # params carry dropout_p as float32
    if t <= 0.0:
        return 0
    if t >= 4294967295.0:
        return 4294967295
    return int(t + 0.5)


def philox_keep_mask(b, hq, sq, sk, p, seed, offset):
    """Orchard's keep-mask (b, hq, sq, sk) as a bool NumPy array."""
    off = np.uint32((offset & 0xFFFFFFFF) ^ (((offset >> 32) * 0x9E3779B9) & 0xFFFFFFFF))
    bh = np.arange(b * hq, dtype=np.uint32)[:, None, None]
    row = np.arange(sq, dtype=np.uint32)[None, :, None]
    col = np.arange(sk, dtype=np.uint32)[None, None, :]
    lanes = philox4x32_10(col >> np.uint32(2), row, bh, off, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    lane = col & np.uint32(3)
    c0, c1, c2, c3 = lanes
    draw = np.where(lane == 0, c0, np.where(lane == 1, c1, np.where(lane == 2, c2, c3)))
    return (draw >= np.uint32(keep_threshold(p))).reshape(b, hq, sq, sk)


def eager_and_graph_replay(step):
    """Runs step() eagerly (twice, on a side stream: the warm-up torch's graph capture
    wants), then captures it in a CUDA graph and replays that once. Returns (the last
    eager result, the captured outputs after the replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    g.replay()
    torch.cuda.synchronize()
    return eager, static


class OrchardOpLog(TorchDispatchMode):
    """Records the orchard ops that reach the dispatcher (their names), for the tests that
    check which calls take the public ops."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "orchard":
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
