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
    """round(256 p) saturated to [0, 256], in double from float32 p as philox.h does."""
    t = float(np.float32(p)) * 256.0  # params carry dropout_p as float32
    if not t > 0.0:
        return 0
    if t >= 256.0:
        return 256
    return int(t + 0.5)


def keep_probability(p: float) -> float:
    """The mask's keep probability: 1 - round(256 p) / 256 (kept values are still scaled by 1 / (1 - p))."""
    return 1.0 - keep_threshold(p) / 256.0


def philox_keep_mask(b, hq, sq, sk, p, seed, offset):
    """Orchard's keep-mask (b, hq, sq, sk) as a bool NumPy array: element (row, col) draws byte
    2 ((col / 8) % 2) + col % 2 of word 2 ((row / 8) % 2) + (col / 16) % 2 of the Philox call with
    counter (4 (col / 32) + (col / 2) % 4, 8 (row / 16) + row % 8, batch * hq + head, off)."""
    off = np.uint32((offset & 0xFFFFFFFF) ^ (((offset >> 32) * 0x9E3779B9) & 0xFFFFFFFF))
    bh = np.arange(b * hq, dtype=np.uint32)[:, None, None]
    row = np.arange(sq, dtype=np.uint32)[None, :, None]
    col = np.arange(sk, dtype=np.uint32)[None, None, :]
    one, three, seven = np.uint32(1), np.uint32(3), np.uint32(7)
    x = ((col >> np.uint32(5)) << np.uint32(2)) | ((col >> one) & three)
    y = ((row >> np.uint32(4)) << np.uint32(3)) | (row & seven)
    words = np.stack(np.broadcast_arrays(*philox4x32_10(x, y, bh, off, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)))
    word = ((row >> np.uint32(3)) & one) * np.uint32(2) + ((col >> np.uint32(4)) & one)
    word = np.broadcast_to(word, words.shape[1:])
    shift = ((col >> np.uint32(3)) & one) * np.uint32(16) + (col & one) * np.uint32(8)
    draw = (np.take_along_axis(words, word[None], axis=0)[0] >> shift) & np.uint32(0xFF)
    return (draw >= keep_threshold(p)).reshape(b, hq, sq, sk)


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
