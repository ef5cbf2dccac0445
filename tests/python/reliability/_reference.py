"""Shared pieces of the reliability suite: the plain-torch attention
reference, flash-attn's tolerance rule, and strided/aliased input layouts.

Everything here is independent of Orchard (it only imports torch), so a
failure always points at Orchard, never at shared test code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

# --------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------


def _heads(q, k, v):
    """BSHD -> (b, h, s, d), k/v heads repeated for GQA."""
    g = q.shape[2] // k.shape[2]
    return (q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, dim=1),
            v.transpose(1, 2).repeat_interleave(g, dim=1))


def _probs(qh, kh, scale, causal, top_left, window=(-1, -1), softcap=0.0, alibi_slopes=None, sink=None,
           mask=None):
    """Softmax probabilities (b, h, sq, sk) and lse (b, h, sq) with a
    materialized score matrix; fully masked rows give p = 0, lse = -inf (or
    the sink) and no NaN (the max is made finite and the row sum guarded).
    Also returns the sink's probability (b, h, sq, 1; None without a sink)
    and d softcap(s)/ds = 1 - tanh^2 (None without softcap).

    Score order as flash-attn: s = scale q.k; softcap * tanh(s / softcap);
    - slope * |i + off - j| (ALiBi, off = 0 top-left, sk - sq bottom-right;
    causal and non-causal alike); + a float mask; then hidden (window,
    causal, bool mask False) -> -inf. The sink joins the denominator only."""
    sq, sk = qh.shape[-2], kh.shape[-2]
    s = (qh @ kh.transpose(-1, -2)) * scale
    dtanh = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
        dtanh = 1.0 - t.detach() ** 2
    off = 0 if top_left else sk - sq
    i = torch.arange(sq, device=qh.device)[:, None]
    j = torch.arange(sk, device=qh.device)[None, :]
    if alibi_slopes is not None:
        sl = alibi_slopes.to(device=s.device, dtype=s.dtype)
        sl = sl[None, :, None, None] if sl.dim() == 1 else sl[:, :, None, None]
        s = s - sl * (i + off - j).abs().to(s.dtype)
    left, right = window
    if causal:
        right = 0
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=qh.device)
    if left >= 0:
        hidden |= j < i + off - left
    if right >= 0:
        hidden |= j > i + off + right
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = hidden | ~mask.to(s.device)
        else:
            s = s + mask.to(device=s.device, dtype=s.dtype)
    s = s.masked_fill(hidden, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)
    sink_col = None
    if sink is not None:
        sink_col = sink.to(device=s.device, dtype=s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)
        m = torch.maximum(m, sink_col.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    if sink_col is not None:
        es = torch.exp(sink_col - m)
        l = l + es
    lg = torch.where(l > 0, l, torch.ones_like(l))
    p = e / lg
    psink = None if sink_col is None else es / lg
    return p, (m + torch.log(l.detach())).squeeze(-1), psink, dtanh


def _empty_problem(q, k) -> bool:
    return q.shape[1] == 0 or k.shape[1] == 0


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                        causal: bool = False, top_left: bool = False, keep: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0, window: tuple = (-1, -1), softcap: float = 0.0,
                        alibi_slopes: Optional[torch.Tensor] = None, sink: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None):
    """THE reference: attention on BSHD tensors, computed in the inputs' dtype
    with a materialized softmax, differentiable by autograd. Pass float64
    tensors for the reference, input-dtype tensors for the 'naive' forward
    baseline of the tolerance rule.

    q (b, sq, hq, d), k (b, sk, hkv, d), v (b, sk, hkv, dv), hq % hkv == 0
    (GQA by repeating k/v heads). causal: bottom-right aligned (query i sees
    keys j <= i + sk - sq) unless top_left (j <= i). keep: bool dropout
    keep-mask (b, hq, sq, sk); kept probabilities are scaled by
    1 / (1 - dropout_p). scale: default 1/sqrt(d).
    Features (flash-attn 2 semantics, see _probs): window (left, right) on
    the causal diagonal (-1 = unbounded; causal sets right = 0); softcap;
    alibi_slopes (hq,) or (b, hq); sink (hq,) logits joining each row's
    denominator (differentiable: pass a leaf to get dsink by autograd);
    mask bool (True = attend) or float additive, broadcastable to
    (b, hq, sq, sk).

    Returns (out (b, sq, hq, dv), lse (b, hq, sq)). A row that sees no key
    gives out 0 and lse -inf (the sink with one), with zero gradients (no
    NaN anywhere).
    """
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _empty_problem(q, k):
        graph = q.sum() + k.sum() + v.sum() + (0.0 if sink is None else sink.sum().to(q.dtype))
        out = q.new_zeros(b, sq, hq, v.shape[-1]) + 0.0 * graph  # keep the graph
        lse = torch.full((b, hq, sq), float("-inf"), dtype=q.dtype, device=q.device)
        if sink is not None:
            lse = lse.clone().copy_(sink.detach().to(q.dtype)[None, :, None].expand(b, hq, sq))
        return out, lse
    qh, kh, vh = _heads(q, k, v)
    p, lse, _, _ = _probs(qh, kh, scale, causal, top_left, window, softcap, alibi_slopes, sink, mask)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return (p @ vh).transpose(1, 2), lse


def _fold(t, hkv):
    """(b, hq, s, d) gradient of repeated k/v heads -> (b, s, hkv, d)."""
    b, hq, s, d = t.shape
    return t.reshape(b, hkv, hq // hkv, s, d).sum(dim=2).transpose(1, 2)


def attention_backward_naive(q, k, v, out, dout, *, scale: Optional[float] = None, causal: bool = False,
                             top_left: bool = False, keep: Optional[torch.Tensor] = None,
                             dropout_p: float = 0.0, window: tuple = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[torch.Tensor] = None, sink: Optional[torch.Tensor] = None,
                             mask: Optional[torch.Tensor] = None):
    """The FlashAttention backward formula done naively (materialized P) in
    the inputs' dtype — the low-precision baseline of the rule for gradients:
    dV = Pd^T dO, dP = (dO V^T) * keep / (1 - p), D = rowsum(dO * O),
    dS = P * (dP - D), dQ = scale dS K, dK = scale dS^T Q, with `out` the
    forward output rounded to the dtype, as a fused kernel has it; softcap
    multiplies dS by 1 - tanh^2 (ALiBi, masks and the sink change only P).
    Mathematically equal to autograd through attention_reference.
    BSHD in; (dq, dk, dv) BSHD out, dk/dv summed over GQA groups.
    The sink's gradient is sink_backward_naive."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _empty_problem(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.no_grad():
        qh, kh, vh = _heads(q, k, v)
        oh, doh = out.transpose(1, 2), dout.transpose(1, 2)
        p, _, _, dtanh = _probs(qh, kh, scale, causal, top_left, window, softcap, alibi_slopes, sink, mask)
        drop = None if keep is None else keep.to(p.dtype) / (1.0 - dropout_p)
        pd = p if drop is None else p * drop
        dp = doh @ vh.transpose(-1, -2)
        if drop is not None:
            dp = dp * drop
        ds = p * (dp - (doh * oh).sum(dim=-1, keepdim=True))
        if dtanh is not None:
            ds = ds * dtanh
        return ((ds @ kh) * scale).transpose(1, 2), _fold((ds.transpose(-1, -2) @ qh) * scale, hkv), \
            _fold(pd.transpose(-1, -2) @ doh, hkv)


def sink_backward_naive(q, k, v, out, dout, *, sink: torch.Tensor, scale: Optional[float] = None,
                        **features) -> torch.Tensor:
    """The sink gradient as a fused backward forms it, naively in the inputs'
    dtype: dsink_h = -sum over batch and rows of P_sink * D, D = rowsum(dO * O)
    with `out` rounded to the dtype (dropout does not enter: it acts on the
    key columns, which D already sums). Takes attention_reference's keyword
    arguments; BSHD in, (hq,) out."""
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _empty_problem(q, k):
        return torch.zeros(hq, dtype=q.dtype, device=q.device)
    features = {key: val for key, val in features.items() if key not in ("keep", "dropout_p")}
    with torch.no_grad():
        qh, kh, vh = _heads(q, k, v)
        oh, doh = out.transpose(1, 2), dout.transpose(1, 2)
        _, _, psink, _ = _probs(qh, kh, scale, sink=sink, **features)
        return -(psink[..., 0] * (doh * oh).sum(dim=-1)).sum(dim=(0, 2))


UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}


def _logit_error(qh, kh, g: float, scale: float) -> torch.Tensor:
    """The typical accumulation error of s_ij = scale q_i . k_j: g scale sum|q_i||k_j| (heads-first)."""
    return g * scale * (qh.abs() @ kh.abs().transpose(-1, -2))


def inherent_out_error(q, k, v, out, dtype, *, scale: Optional[float] = None, causal: bool = False,
                       top_left: bool = False, keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                       window: tuple = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Optional[torch.Tensor] = None, sink: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None):
    """First-order estimate of the forward error every kernel has from the
    logits' own rounding: s_ij = scale q_i . k_j accumulated in fp32 (fp64 for
    float64) carries an error of about g scale sum|q_i||k_j| (g = sqrt(d)
    u_acc, typical accumulation, as in inherent_grad_error), and an error
    ds_ij in the logits moves out_i by sum_j P_ij drop_ij ds_ij (v_j - out_i).
    It is the whole error when logits are large (|s| ~ 100+: 1e-4..4e-4 of
    out at |out| ~ 10, depending on the order of the sum), where the naive
    baseline's order may be the lucky one. Float64 BSHD in; a (b, sq, hq, dv)
    bound out."""
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _empty_problem(q, k):
        return torch.zeros_like(out)
    u_acc = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    g = math.sqrt(d) * u_acc
    with torch.no_grad():
        qh, kh, vh = _heads(q, k, v)
        oh = out.transpose(1, 2)
        p, _, _, _ = _probs(qh, kh, scale, causal, top_left, window, softcap, alibi_slopes, sink, mask)
        if keep is not None:
            p = p * keep.to(p.dtype) / (1.0 - dropout_p)
        w = p * _logit_error(qh, kh, g, scale)
        return (w @ vh.abs() + w.sum(dim=-1, keepdim=True) * oh.abs()).transpose(1, 2)


def inherent_grad_error(q, k, v, out, dout, dtype, *, scale: Optional[float] = None, causal: bool = False,
                        top_left: bool = False, keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        window: tuple = (-1, -1), softcap: float = 0.0,
                        alibi_slopes: Optional[torch.Tensor] = None, sink: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, with_sink: bool = False):
    """First-order estimate of the gradient error every FlashAttention
    backward has, however accurate it is otherwise. Two sources:

    1. dS = P * (dP - D) with D = rowsum(dO * O) taken from O rounded to
       `dtype` (bf16 / fp16: twice, P drop rounded before the PV product as
       in source 3), and dP, D each a length-d dot product accumulated in
       fp32 (fp64 for float64):
         |dD_i|   <= (u_o + g) * sum|dO_i O_i|  (u_o = u, bf16 / fp16 2u),  |ddP_ij| <= g * sum|dO_i||V_j| * drop_ij
       with u the dtype's unit roundoff and g = sqrt(d) * u_acc (typical,
       not worst-case, accumulation).
    2. P is recomputed as exp(s - lse) from an LSE stored in fp32 (like
       flash-attn's softmax_lse; converted between ln and log2 units), so P
       carries a relative error of about e_ij = 4 |lse_i| u_acc + 2 g scale
       sum|q_i||k_j| (the LSE's rounding; the logit's accumulation in the
       backward and, through the LSE, in the forward).
    Then |d dV| <= (e P drop)^T |dO|, |d dS| <= P (|ddP| + |dD|) + e P |dP - D|,
    |d dQ| <= scale |d dS| |K|, |d dK| <= scale |d dS|^T |Q|.
    3. bf16 / fp16: P drop and dS are rounded to the input dtype before the
       dV, dK, dQ products, as torch's and flash-attn's kernels round them (the
       CPU backend's AVX512-BF16 path and the CUDA kernels do): relative u per
       element, summed as independent roundings (root-sum-square, typical):
         |d dV_j| += u sqrt(sum_i (P drop)_ij^2 dO_i^2), and likewise
         scale u sqrt(dS^2 K^2) for dQ, scale u sqrt(dS^T^2 Q^2) for dK.
       It matters when a gradient is a small difference of large terms
       (session 46: dv -0.5156 against -0.5305 at sk = 1, 28 kept terms of
       magnitude ~1, a naive bf16 baseline that rounded luckily).

    When a gradient is a small difference of large terms (sharp softmax;
    sk == 1 where dq == 0 exactly) or logits are large (|lse| ~ 100+), this
    is the whole error, while the materialized baseline of the rule may round
    luckily — so it is added to the rule's atol.

    Features (attention_reference's keyword arguments) enter through P and
    the LSE (windows, masks, ALiBi, the sink), plus:
    * softcap: the recomputed score softcap * tanh(s / softcap) carries an
      absolute error of a few softcap * u_acc (a fast vector tanh on the CPU),
      added to e_i; and dS is multiplied by 1 - tanh^2, itself recomputed
      (relative error ~ 8 u_acc of P |dP - D|, added before the factor).
    * the sink (with_sink=True: a 4th bound, (hq,)): dsink_h = -sum P_sink D
      over every row of the head, so the row terms' errors add up:
      P_sink |dD_i| + e_i P_sink |D_i| (P_sink from the fp32 LSE), a
      sqrt(rows) * u_acc accumulation of the sum, and the rounding of the
      result to float32 (the sink parameter's dtype; this is what bounds a
      float64 run, whose atol is 1e-10).
    Float64 BSHD in; (bound_dq, bound_dk, bound_dv[, bound_dsink]) out."""
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if _empty_problem(q, k):
        zeros = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        return zeros + ((torch.zeros(hq, dtype=q.dtype, device=q.device),) if with_sink else ())
    u = UNIT_ROUNDOFF[dtype]
    u_acc = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    g = math.sqrt(d) * u_acc
    with torch.no_grad():
        qh, kh, vh = _heads(q, k, v)
        oh, doh = out.transpose(1, 2), dout.transpose(1, 2)
        p, lse, psink, dtanh = _probs(qh, kh, scale, causal, top_left, window, softcap, alibi_slopes, sink,
                                      mask)
        e_lse = 4.0 * u_acc * (torch.nan_to_num(lse.abs(), posinf=0.0)[..., None] + softcap)  # masked rows: p = 0
        # ... and the recomputed logit's own accumulation error (inherent_out_error's term), once for
        # the backward's sum and once for the forward's that the LSE carries: it exceeds the LSE's
        # where the logits cancel (sum|q||k| >> |s|; fp32 b1 sq3 sk65 d64, scale 2, inputs ~3: dv
        # 3.55e-4 off with P one-hot, the LSE term alone bounding 3.2e-4)
        e = e_lse + 2.0 * _logit_error(qh, kh, g, scale)
        drop = None if keep is None else keep.to(p.dtype) / (1.0 - dropout_p)
        # O's rounding: the output's own, and in bf16 / fp16 also P drop's before the PV product
        # (source 3's rounding, in the forward): 2u there (SDPA bf16 b2 sq1 sk1 d2, dropout 0.29:
        # with one key the exact dS is 0 and dk 7.67e-2 came from D alone, against 7.6e-2 with u)
        u_o = 2.0 * u if dtype in (torch.bfloat16, torch.float16) else u
        dd = (u_o + g) * (doh.abs() * oh.abs()).sum(dim=-1, keepdim=True)
        ddp = g * (doh.abs() @ vh.abs().transpose(-1, -2))
        dp = doh @ vh.transpose(-1, -2)
        if drop is not None:
            ddp, dp = ddp * drop, dp * drop
        big_d = (doh * oh).sum(dim=-1, keepdim=True)
        dp_minus_d = dp - big_d
        dds = p * (ddp + dd) + e * p * dp_minus_d.abs()
        if dtanh is not None:
            dds = dds * dtanh + 8.0 * u_acc * p * dp_minus_d.abs()
        bq = scale * (dds @ kh.abs())
        bk = scale * (dds.transpose(-1, -2) @ qh.abs())
        pe = e * p if drop is None else e * p * drop
        bv = pe.transpose(-1, -2) @ doh.abs()
        if dtype in (torch.bfloat16, torch.float16):  # source 3
            pd = p if drop is None else p * drop
            ds = p * dp_minus_d * (1.0 if dtanh is None else dtanh)
            bv = bv + u * (pd.square().transpose(-1, -2) @ doh.square()).sqrt()
            bq = bq + scale * u * (ds.square() @ kh.square()).sqrt()
            bk = bk + scale * u * (ds.square().transpose(-1, -2) @ qh.square()).sqrt()
        bounds = (bq.transpose(1, 2), _fold(bk, k.shape[2]), _fold(bv, k.shape[2]))
        if not with_sink:
            return bounds
        terms = psink * big_d  # (b, hq, sq, 1)
        rows = b * sq
        bs = (psink * dd + e_lse * terms.abs()).sum(dim=(0, 2, 3)) \
            + math.sqrt(rows) * u_acc * terms.abs().sum(dim=(0, 2, 3)) \
            + 2.0 ** -24 * terms.sum(dim=(0, 2, 3)).abs()
        return bounds + (bs,)


# --------------------------------------------------------------------------
# flash-attn's tolerance rule
# --------------------------------------------------------------------------

# atol of the rule, per unit of the reference's magnitude (max(1, max|ref|)).
# Low precision: one unit in the last place, so a kernel is never failed for
# the final rounding of its output when the naive math happens to be exact.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0 ** -7,
    torch.float16: 2.0 ** -10,
}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    # identical infinities count as equal; NaN anywhere counts as infinite error
    same = a.detach().double().cpu() == b.detach().double().cpu()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return diff.max().item()


def assert_rule(got: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype, what: str,
                atol_scale: float = 1.0, extra: float = 0.0) -> None:
    """max|got - ref| <= 2 * max|naive - ref| + atol (flash-attn's rule);
    `extra` is added to atol (e.g. inherent_grad_error's max)."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    ref_d = ref.detach().double().cpu()
    assert torch.isfinite(ref_d).all(), f"{what}: test bug: non-finite reference"
    naive_err = max_abs_err(naive, ref)
    assert math.isfinite(naive_err), f"{what}: test bug: naive baseline overflowed; shrink the inputs"
    mag = max(1.0, ref_d.abs().max().item())
    atol = ATOL[dtype] * mag * atol_scale + extra
    err = max_abs_err(got, ref)
    assert err <= 2 * naive_err + atol, (
        f"{what}: max error {err:.3e} > 2 * naive {dtype} error {naive_err:.3e} + atol {atol:.1e} "
        f"(|ref| max {mag:.3g})")


def assert_lse(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "lse") -> None:
    """Orchard's LSE is float32 (float64 for float64 inputs), computed from the
    inputs as given: only accumulation error, so a tight relative tolerance.
    -inf exactly where the reference is -inf (rows that see no key)."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == want, f"{what}: dtype {got.dtype}, expected {want}"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    masked = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), masked), f"{what}: -inf pattern differs from the reference"
    if (~masked).any():
        tol = (1e-11 if dtype == torch.float64 else 3e-5) * max(1.0, ref[~masked].abs().max().item())
        err = (got[~masked] - ref[~masked]).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------
# Layouts: how a logical 4-D tensor is laid out in memory
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Memory layout of one logical 4-D tensor (the API's logical order).

    The tensor is a view of a flat buffer (the autograd leaf): `offset`
    leading elements are skipped (storage offset, misaligned base); the rest
    is the tensor stored with its dims in order `perm` (outermost first; the
    identity is contiguous, (0, 2, 1, 3) is BHSD-stored BSHD or vice versa, a
    perm not ending in 3 makes the last-dim stride != 1); dim `slice_dim` is
    over-allocated and sliced [start::step]; dim `expand_dim` is stored with
    size 1 and broadcast (stride 0).
    """

    perm: tuple = (0, 1, 2, 3)
    slice_dim: Optional[int] = None
    step: int = 1
    start: int = 0
    offset: int = 0
    expand_dim: Optional[int] = None

    def __str__(self) -> str:
        parts = [] if self.perm == (0, 1, 2, 3) else ["perm" + "".join(map(str, self.perm))]
        if self.slice_dim is not None:
            parts.append(f"slice{self.slice_dim}[{self.start}::{self.step}]")
        if self.offset:
            parts.append(f"off{self.offset}")
        if self.expand_dim is not None:
            parts.append(f"expand{self.expand_dim}")
        return "+".join(parts) or "contig"


CONTIGUOUS = Layout()


def make_input(shape: Sequence[int], layout: Layout, dtype: torch.dtype, device, gen: torch.Generator,
               magnitude: float = 1.0, requires_grad: bool = True):
    """Returns (leaf, view): leaf is a flat buffer (random normal * magnitude,
    drawn in float64 from `gen`, so identical across dtypes/devices), and
    view(leaf) the logical tensor with `layout`. Apply `view` to a converted
    copy of the leaf to get the same view in another dtype."""
    shape = [int(s) for s in shape]
    base = list(shape)
    if layout.expand_dim is not None:
        base[layout.expand_dim] = 1
    alloc = list(base)
    if layout.slice_dim is not None:
        alloc[layout.slice_dim] = layout.start + base[layout.slice_dim] * layout.step
    storage = [alloc[p] for p in layout.perm]
    inv = [layout.perm.index(i) for i in range(4)]
    n = math.prod(storage)
    flat = torch.randn(layout.offset + n, generator=gen, dtype=torch.float64) * magnitude
    leaf = flat.to(dtype).to(device)
    if requires_grad:
        leaf.requires_grad_()

    def view(buf: torch.Tensor) -> torch.Tensor:
        t = buf[layout.offset:layout.offset + n].view(storage).permute(inv)
        if layout.slice_dim is not None:
            idx = [slice(None)] * 4
            sd = layout.slice_dim
            idx[sd] = slice(layout.start, layout.start + base[sd] * layout.step, layout.step)
            t = t[tuple(idx)]
        if layout.expand_dim is not None:
            t = t.expand(shape)
        assert list(t.shape) == shape, (t.shape, shape, layout)
        return t

    return leaf, view


def as_reference(leaf: torch.Tensor, view: Callable, dtype: torch.dtype = torch.float64):
    """(leaf copy in dtype with requires_grad, its view)."""
    r = leaf.detach().to(dtype).requires_grad_(leaf.requires_grad)
    return r, view(r)
