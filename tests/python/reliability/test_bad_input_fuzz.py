"""Randomized bad input (the fuzzing counterpart of test_bad_input.py's fixed matrix): hypothesis
draws a small valid call of one public entry point — orchard.flash_attn_func,
flash_attn_varlen_func (packed or paged keys; with a gradient, or without one, which takes the
KV-cache kernels' "decode form"), flash_attn_with_kvcache and scaled_dot_product_attention —
and the details of ONE defect from that entry point's catalogue (DEFECTS), and checks that the
bad call

  * raises the library's exception for the defect (ValueError for bad shapes, dtypes and values,
    TypeError for a non-tensor, NotImplementedError for what the kernels lack: the KV-cache
    kernels' head dims and page sizes, a float mask's gradient with dropout; RuntimeError for a
    KV-cache input that requires grad), its message starting with "<op name>: ";
  * leaves every input tensor (q, k, v, caches, new rows, index tensors, tables, masks) bitwise
    as it was (nothing is written before the checks);
  * leaves the library working: the valid call right after gives bitwise what it gave before.

The valid calls vary what the checks must read right: GQA, v's own head dim, permuted memory
layouts, index tensors and cu_seqlens as strided views over junk values, packed rows before
cu_seqlens[0] and after cu_seqlens[-1], SDPA's broadcast masks and extra batch dims.

One test per (entry point, defect), so that every defect runs in every CI run (hypothesis,
drawing the defect too, would favour the catalogue's first entries) and a failure names both.
Counts and replay as in the other randomized suites (reliability/_fuzz.py): derandomized in CI,
ORCHARD_FUZZ_RANDOM=1 / ORCHARD_FUZZ_EXAMPLES=<factor> for a bug hunt. The CUDA test draws the
same calls on the GPU (the `cuda` marker); a tensor on another device than q's is a defect on
both ("meta" beside CPU tensors, the CPU beside CUDA ones).

The bugs the suite found (session 50: a meta tensor among CPU ones, zero kv heads, varlen's decode
form skipping the dropout check, kvcache's window_size and non-tensor arguments, paged varlen keys
after an offset, an append into a self-overlapping cache) are fixed; fixed cases at the end pin
each one, and the catalogue draws them too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import orchard
from kvcache_reference import DTYPES, make_case
from test_paged_varlen import _cu, _paged_case

from ._fuzz import fuzz_settings
from .test_bad_input import bits

# (strided cu_seqlens make paged_varlen.py's torch.searchsorted copy its boundaries: a warning, not a defect)
pytestmark = pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous")

HEAD_DIMS = [8, 16, 32, 40, 64]  # multiples of 8: every call may take the KV-cache kernels
NAN, INF = float("nan"), float("inf")
JUNK = [-7, 2**31 - 1]  # between the values of strided index tensors: reading one is an error

API = {  # the name every error message starts with, and the entry point
    "flash": ("orchard.flash_attn_func", orchard.flash_attn_func),
    "varlen": ("orchard.flash_attn_varlen_func", orchard.flash_attn_varlen_func),
    "kvcache": ("orchard.flash_attn_with_kvcache", orchard.flash_attn_with_kvcache),
    "sdpa": ("orchard.scaled_dot_product_attention", orchard.scaled_dot_product_attention),
}
QKV = {"flash": ("q", "k", "v"), "varlen": ("q", "k", "v"), "kvcache": ("q", "k_cache", "v_cache"),
       "sdpa": ("query", "key", "value")}
HEADS = {"flash": -2, "varlen": -2, "kvcache": -2, "sdpa": -3}  # the heads axis of q, k, v
KEYS = {"flash": -3, "varlen": -3, "kvcache": -3, "sdpa": -2}   # the key-rows axis of k, v (page rows if paged)
SCALE = {"flash": "softmax_scale", "varlen": "softmax_scale", "kvcache": "softmax_scale", "sdpa": "scale"}
INDEX = ("cu_seqlens_q", "cu_seqlens_k", "block_table", "cache_seqlens", "cache_batch_idx", "cache_leftpad")


@dataclass
class Case:
    """One valid call: its keyword arguments and the sizes the defects need."""
    api: str
    kw: dict
    b: int          # batch entries (sequences for varlen)
    hq: int
    hkv: int
    d: int
    grad: bool      # q, k, v require grad (varlen: the gather form; without, the decode form)
    info: dict = field(default_factory=dict)  # per-API facts (lengths, page size, ...)

    @property
    def q(self):
        return self.kw[QKV[self.api][0]]


# ---- tensors ----------------------------------------------------------------------------------

def rand_like(t, shape=None, dtype=None):
    """A fresh random tensor shaped (and requiring grad) like t, or of the given shape / dtype."""
    dtype = dtype or t.dtype
    x = torch.randn(tuple(t.shape) if shape is None else shape, device=t.device)
    x = x.to(dtype) if dtype.is_floating_point or dtype.is_complex else (x * 3).to(dtype)
    return x.requires_grad_(t.requires_grad and dtype.is_floating_point)


def resized(t, axis, n):
    shape = list(t.shape)
    shape[axis] = n
    return rand_like(t, shape)


def relaid(draw, t):
    """t, or the same values stored in another dimension order (the last dim kept contiguous)."""
    if t.dim() < 3 or draw(st.integers(0, 2)):
        return t
    perm = list(range(t.dim()))
    perm[-3], perm[-2] = perm[-2], perm[-3]
    return t.permute(perm).contiguous().permute(perm)


def strided(draw, t):
    """An int32 index tensor, or the same values as a strided view over junk: 1-D every other
    element, 2-D (block tables) rows with a longer pitch (their rows stay contiguous)."""
    if t.dtype != torch.int32 or t.device.type == "meta" or draw(st.booleans()):
        return t  # (a meta view would import torch's meta kernels: a second per run)
    junk = draw(st.sampled_from(JUNK))
    if t.dim() == 2:
        return torch.cat([t, torch.full((t.shape[0], 3), junk, dtype=t.dtype, device=t.device)], 1)[:, :t.shape[1]]
    return torch.stack([t, torch.full_like(t, junk)], -1)[..., 0]


def leaf(t, grad):
    return t.detach().requires_grad_(grad)


def snap(t):
    """t's bytes (test_bad_input.bits) after a dense copy: bits' .contiguous() keeps a size-1
    view's stride, which its byte view refuses."""
    return bits(t.detach().clone(memory_format=torch.contiguous_format))


# ---- valid calls ------------------------------------------------------------------------------

def _heads(draw):
    hkv = draw(st.integers(1, 2))
    return hkv * draw(st.sampled_from([1, 2])), hkv  # h 1..4, GQA groups of 1 or 2


def _flash_features(draw, b, hq, device):
    """flash-attn's feature arguments, each off most of the time."""
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window_size"] = (draw(st.sampled_from([-1, 0, 3])), draw(st.sampled_from([-1, 0, 5])))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([0.0, 2.0, 30.0]))
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand((hq,) if draw(st.booleans()) else (b, hq), device=device) * 0.3
    return kw


@st.composite
def flash_case(draw, device, needs):
    dtype = draw(st.sampled_from(DTYPES))
    b, sq, sk = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    hq, hkv = _heads(draw)
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, d, *HEAD_DIMS]))  # v may have a head dim of its own
    grad = draw(st.booleans())
    kw = {n: leaf(relaid(draw, torch.randn(shape, device=device).to(dtype)), grad)
          for n, shape in (("q", (b, sq, hq, d)), ("k", (b, sk, hkv, d)), ("v", (b, sk, hkv, dv)))}
    kw.update(_flash_features(draw, b, hq, device))
    if draw(st.booleans()):
        kw["dropout_p"] = 0.25
        kw["return_attn_probs"] = draw(st.booleans())
    return Case("flash", kw, b, hq, hkv, d, grad)


def _packed(draw, lens, h, d, dtype, device):
    """(total, h, d) rows holding the sequences after `lead` rows of no sequence and before `pad`
    more, and their cu_seqlens (documented: such rows belong to no sequence)."""
    lead, pad = draw(st.sampled_from([0, 0, 2])), draw(st.sampled_from([0, 0, 3]))
    t = torch.randn(lead + sum(lens) + pad, h, d, device=device).to(dtype)
    return relaid(draw, t), _cu(lens, device) + lead


@st.composite
def varlen_case(draw, device, needs):
    """needs: "paged" (a block_table), "keys" (a sequence with keys), "long keys" (one longer than a page)."""
    dtype = draw(st.sampled_from(DTYPES))
    b = draw(st.integers(1, 3))
    hq, hkv = _heads(draw)
    d = draw(st.sampled_from(HEAD_DIMS))
    page = draw(st.sampled_from([8, 16] if "paged" in needs else [None, None, 8, 16]))  # 16: read in place
    lens_q = draw(st.lists(st.integers(0, 20), min_size=b, max_size=b))
    lens_k = lens_q if draw(st.booleans()) else draw(st.lists(st.integers(0, 40), min_size=b, max_size=b))
    least = page + 1 if "long keys" in needs else 1 if "keys" in needs else 0
    lens_k = [max(lens_k[0], least), *lens_k[1:]]
    grad = draw(st.booleans())
    q, cu_q = _packed(draw, lens_q, hq, d, dtype, device)
    if page is None:
        k, cu_k = _packed(draw, lens_k, hkv, d, dtype, device)
        kw = dict(k=k, v=relaid(draw, torch.randn(k.shape, device=device).to(dtype)))
    else:
        _, k, v, table, _, _ = _paged_case(lens_q, lens_k, page, hq=hq, hkv=hkv, d=d, dv=d, dtype=dtype,
                                           device=device, seed=draw(st.integers(0, 2**16)))
        kw = dict(k=k, v=v, block_table=strided(draw, table))
        cu_k = _cu(lens_k, device) + draw(st.sampled_from([0, 0, 5]))  # only the differences count
    kw.update(q=q, cu_seqlens_q=strided(draw, cu_q), cu_seqlens_k=strided(draw, cu_k),
              max_seqlen_q=max(lens_q) + draw(st.sampled_from([0, 0, 2])),  # an upper bound
              max_seqlen_k=max(lens_k), **_flash_features(draw, b, hq, device))
    for n in ("q", "k", "v"):
        kw[n] = leaf(kw[n], grad)
    return Case("varlen", kw, b, hq, hkv, d, grad, dict(lens_q=lens_q, lens_k=lens_k, page=page))


@st.composite
def kvcache_case(draw, device, needs):
    """needs: "paged" or "contiguous" (the cache), "new" (k / v to append), "rotary", "leftpad",
    "no leftpad", "batch_idx", "batch > 1"."""
    hq, hkv = _heads(draw)
    d = draw(st.sampled_from(HEAD_DIMS))
    page = draw(st.sampled_from([16, 32] if "paged" in needs else [None] if needs & {"contiguous", "batch_idx"}
                                else [None, None, 16, 32]))
    s_new = draw(st.sampled_from([1, 3] if needs & {"new", "rotary"} else [0, 1, 1, 3]))
    case = dict(dtype=draw(st.sampled_from(DTYPES)), b=draw(st.integers(2 if "batch > 1" in needs else 1, 3)),
                sq=draw(st.integers(1, 4)), hq=hq, hkv=hkv, d=d, capacity=draw(st.integers(max(1, s_new), 40)),
                s_new=s_new, page=page, batch_idx="batch_idx" in needs or page is None and draw(st.booleans()),
                leftpad="leftpad" in needs or "no leftpad" not in needs and draw(st.booleans()),
                rotary_dim=2 * draw(st.integers(1, d // 2)) if s_new and ("rotary" in needs or draw(st.booleans()))
                else 0)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    q, k_cache, v_cache, kw = make_case(device, **case)
    kw = {n: strided(draw, t) for n, t in kw.items()}
    kw.update(q=q, k_cache=relaid(draw, k_cache), v_cache=relaid(draw, v_cache), causal=draw(st.booleans()),
              window_size=(draw(st.sampled_from([-1, 0, 3])), draw(st.sampled_from([-1, 0, 2]))),
              softcap=draw(st.sampled_from([0.0, 0.0, 5.0])), num_splits=draw(st.sampled_from([0, 1, 3])))
    if case["rotary_dim"]:
        kw["rotary_interleaved"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand((hq,) if draw(st.booleans()) else (case["b"], hq), device=device) * 0.3
    capacity = kw["block_table"].shape[1] * page if page else case["capacity"]
    return Case("kvcache", kw, case["b"], hq, hkv, d, False, dict(case, capacity=capacity))


@st.composite
def sdpa_case(draw, device, needs):
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.sampled_from([(), (), (2,)]))  # (..., H, L, E): one more batch dim sometimes
    b, lq, lk = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    hq, hkv = _heads(draw)
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, d, *HEAD_DIMS]))
    grad = draw(st.booleans())
    kw = {n: leaf(relaid(draw, torch.randn(*lead, b, h, n_rows, e, device=device).to(dtype)), grad)
          for n, h, n_rows, e in (("query", hq, lq, d), ("key", hkv, lk, d), ("value", hkv, lk, dv))}
    kw["enable_gqa"] = hq != hkv or draw(st.booleans())
    mask = draw(st.sampled_from([None, None, "bool", "float"]))
    if mask:  # a broadcast shape: each dim of (..., b, hq, lq, lk) kept or 1, leading dims maybe left out
        full = [*lead, b, hq, lq, lk]
        shape = [n if draw(st.booleans()) else 1 for n in full][draw(st.integers(0, len(full) - 2)):]
        kw["attn_mask"] = (torch.rand(shape, device=device) > 0.3 if mask == "bool"
                           else torch.randn(shape, device=device).to(draw(st.sampled_from([dtype, torch.float32]))))
    else:
        kw["is_causal"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["scale"] = draw(st.sampled_from([0.0, 0.1, 2.0]))
    if draw(st.booleans()):
        kw["dropout_p"] = 0.2
    return Case("sdpa", kw, b, hq, hkv, d, grad)


CASES = {"flash": flash_case, "varlen": varlen_case, "kvcache": kvcache_case, "sdpa": sdpa_case}


# ---- the defect catalogue ---------------------------------------------------------------------
#
# A defect returns (the keyword arguments to change, the exception the call must raise); a value
# of DROP removes the argument. It never writes into the case's tensors: changed tensors are new.

DROP = object()
ALL = tuple(API)
NOT_KVCACHE = ("flash", "varlen", "sdpa")


@dataclass(frozen=True)
class Defect:
    id: str
    apis: tuple
    make: Callable                  # (draw, case) -> (changes, exception type(s))
    needs: frozenset = frozenset()  # what the valid call must have for the defect to apply (see the builders)


def _role(draw, c, roles="qkv"):
    """The argument name of one of q / k / v (drawn from `roles`)."""
    return QKV[c.api]["qkv".index(draw(st.sampled_from(roles)))]


def d_rank(draw, c):
    name = _role(draw, c)
    t = c.kw[name].detach()
    lower = t.shape[0] and draw(st.booleans())  # (an empty packed tensor has no row 0)
    return {name: leaf(t[0] if lower else t.unsqueeze(0), c.kw[name].requires_grad)}, ValueError


def d_dtype_mixed(draw, c):
    name = _role(draw, c)
    other = draw(st.sampled_from([t for t in (*DTYPES, torch.float64) if t != c.q.dtype]))
    return {name: rand_like(c.kw[name], dtype=other)}, ValueError


def d_dtype_not_float(draw, c):
    dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]))
    return {n: rand_like(c.kw[n], dtype=dtype) for n in QKV[c.api]}, ValueError


def d_not_a_tensor(draw, c):
    name = _role(draw, c)
    return {name: c.kw[name].tolist()}, TypeError


def d_kv_heads(draw, c):
    """k and v with a head count q's is no multiple of (hq + 1), or v's differing from k's."""
    _, k, v = QKV[c.api]
    if draw(st.booleans()):
        return {k: resized(c.kw[k], HEADS[c.api], c.hq + 1), v: resized(c.kw[v], HEADS[c.api], c.hq + 1)}, ValueError
    return {v: resized(c.kw[v], HEADS[c.api], c.hkv + 1)}, ValueError


def d_kv_heads_zero(draw, c):
    _, k, v = QKV[c.api]
    changes = {k: resized(c.kw[k], HEADS[c.api], 0), v: resized(c.kw[v], HEADS[c.api], 0)}
    return changes, ValueError


def d_head_dim(draw, c):
    """q's and k's head dims differ (v's may differ from both, except on the KV cache)."""
    q, k, v = QKV[c.api]
    name = draw(st.sampled_from([q, k] + ([v] if c.api == "kvcache" else [])))
    return {name: resized(c.kw[name], -1, c.d + 8)}, ValueError


def d_head_dim_out_of_range(draw, c):
    """Head dims 0 or past 256 (the KV-cache kernels: NotImplementedError, any d % 8 != 0 too)."""
    n = draw(st.sampled_from([0, 264] + ([12, 20] if c.api == "kvcache" else [])))
    names = list(QKV[c.api]) + [x for x in ("k", "v") if c.api == "kvcache" and x in c.kw]
    if c.api not in ("kvcache", "varlen") and draw(st.booleans()):
        names = names[2:]  # v's head dim alone
    return {x: resized(c.kw[x], -1, n) for x in names}, NotImplementedError if c.api == "kvcache" else ValueError


def d_kv_rows(draw, c):
    """v with more key rows than k (sdpa / flash: seqlen_k; varlen: total_k; caches: capacity or page)."""
    _, _, v = QKV[c.api]
    return {v: resized(c.kw[v], KEYS[c.api], c.kw[v].shape[KEYS[c.api]] + 1)}, ValueError


def d_batch(draw, c):
    _, k, v = QKV[c.api]
    n = c.kw[k].shape[0] + 1
    return {k: resized(c.kw[k], 0, n), v: resized(c.kw[v], 0, n)}, ValueError


def d_dropout(draw, c):
    bad = [1.0, 1.5, INF, -0.1, -INF, NAN]
    return {"dropout_p": draw(st.sampled_from(bad))}, ValueError


def d_scale(draw, c):
    return {SCALE[c.api]: draw(st.sampled_from([NAN, INF, -INF]))}, ValueError


def d_window(draw, c):
    left, right = draw(st.integers(-100, -2)), draw(st.integers(-100, 10))
    return {"window_size": (left, right) if draw(st.booleans()) else (right, left)}, ValueError


def d_window_arity(draw, c):
    return {"window_size": draw(st.sampled_from([(1,), (1, 2, 3), ()]))}, ValueError


def d_softcap(draw, c):
    return {"softcap": draw(st.sampled_from([-1.0, -1e-3, NAN, INF]))}, ValueError


def d_alibi(draw, c):
    """Slopes of a shape other than (hq,) / (b, hq), or not float32."""
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(c.hq + 1,), (c.b + 1, c.hq), (c.b, c.hq + 1), (c.b, c.hq, 1), ()]))
        return {"alibi_slopes": torch.rand(shape, device=c.q.device)}, ValueError
    dtype = draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]))
    return {"alibi_slopes": torch.ones(c.hq, device=c.q.device).to(dtype)}, ValueError


def d_sink(draw, c):
    sink = torch.zeros(c.hq + 1, device=c.q.device) if draw(st.booleans()) else torch.zeros(
        c.hq, device=c.q.device, dtype=torch.float64)
    return {"sink": sink}, ValueError


def d_other_device(draw, c):
    """One tensor argument on another device than q's: the CPU while q is on the GPU, "meta" (the
    other device torch has here) while q is on the CPU."""
    names = [n for n, t in c.kw.items() if isinstance(t, torch.Tensor) and n != QKV[c.api][0]]
    name = draw(st.sampled_from(names))
    other = "meta" if c.kw[QKV[c.api][0]].is_cpu else "cpu"
    return {name: leaf(c.kw[name].to(other), c.kw[name].requires_grad)}, ValueError


# varlen: cu_seqlens, max_seqlen and the paged form's block_table

def _cu_name(draw):
    return draw(st.sampled_from(["cu_seqlens_q", "cu_seqlens_k"]))


def _int32(c, values):
    return torch.tensor(values, dtype=torch.int32, device=c.q.device)


def d_cu_dtype(draw, c):
    name = _cu_name(draw)
    return {name: c.kw[name].to(draw(st.sampled_from([torch.int64, torch.int16, torch.float32])))}, ValueError


def d_cu_decreasing(draw, c):
    """An entry above the next one, or a negative first entry."""
    name = _cu_name(draw)
    vals = c.kw[name].tolist()
    i = draw(st.integers(0, c.b - 1))
    vals[i] = vals[i + 1] + 1
    if draw(st.booleans()):
        vals[0] = -1
    return {name: _int32(c, vals)}, ValueError


def d_cu_shape(draw, c):
    """cu_seqlens_q / _k of different lengths, 2-D, 0-d, or empty."""
    name = _cu_name(draw)
    cu = c.kw[name]
    how = draw(st.sampled_from(["longer", "shorter", "2-d", "0-d", "empty"]))
    if how == "0-d":
        return {name: cu[-1].clone()}, ValueError
    if how == "longer":
        return {name: torch.cat([cu, cu[-1:]])}, ValueError
    if how == "shorter":
        return {name: cu[:-1].clone()}, ValueError
    return {name: cu[None].clone() if how == "2-d" else cu[:0].clone()}, ValueError


def d_cu_total(draw, c):
    """The last offset past the packed rows (paged: the keys, counted from cu_seqlens_k[0], past
    what the table names, so the last sequence overflows its row); max_seqlen raised with it, so
    that only the total is wrong."""
    name = _cu_name(draw)
    vals = c.kw[name].tolist()
    rows = c.kw["q" if name == "cu_seqlens_q" else "k"].shape[0]
    if c.info["page"] and name == "cu_seqlens_k":
        rows = vals[0] + c.kw["block_table"].shape[1] * c.info["page"] * c.b
    vals[-1] = rows + draw(st.integers(1, 5))
    return {name: _int32(c, vals), name.replace("cu_seqlens", "max_seqlen"): vals[-1] - vals[0]}, ValueError


def d_max_seqlen(draw, c):
    """max_seqlen below the longest sequence, or negative."""
    which = draw(st.sampled_from(["q", "k"]))
    longest = max(c.info["lens_" + which])
    return {"max_seqlen_" + which: draw(st.sampled_from([longest - 1, -1]) if longest else st.just(-1))}, ValueError


def d_cu_not_a_tensor(draw, c):
    name = _cu_name(draw)
    return {name: c.kw[name].tolist()}, TypeError


def d_cu_meta(draw, c):
    """cu_seqlens (or the block_table) on another device, "meta" (which the CPU box has)."""
    name = draw(st.sampled_from(["cu_seqlens_q", "cu_seqlens_k"] + (["block_table"] if c.info["page"] else [])))
    return {name: c.kw[name].to("meta")}, ValueError


def _bad_block_id(draw, num_blocks):
    return draw(st.sampled_from([-1, -(2**31), num_blocks, 2**31 - 1]))


def d_table_entry(draw, c):
    """A block id outside the pool in an entry a sequence reads."""
    page = c.info["page"]
    s, j = draw(st.sampled_from([(s, j) for s, n in enumerate(c.info["lens_k"]) for j in range(-(-n // page))]))
    table = c.kw["block_table"].clone()
    table[s, j] = _bad_block_id(draw, c.kw["k"].shape[0])
    return {"block_table": table}, ValueError


def d_table_shape(draw, c):
    table = c.kw["block_table"]
    how = draw(st.sampled_from(["int64", "more rows", "fewer rows", "no columns", "1-d"]))
    if how == "int64":
        return {"block_table": table.long()}, ValueError
    if how == "more rows":
        return {"block_table": torch.cat([table, table[:1]])}, ValueError
    if how == "fewer rows":
        return {"block_table": table[:-1].clone()}, ValueError
    return {"block_table": table[:, :0].clone() if how == "no columns" else table[0].clone()}, ValueError


def d_table_too_narrow(draw, c):
    """Table rows too short for the longest sequence's keys."""
    cols = max(-(-n // c.info["page"]) for n in c.info["lens_k"])
    return {"block_table": c.kw["block_table"][:, :cols - 1].clone()}, ValueError


# flash_attn_with_kvcache: index tensors, appended rows, rotary tables, options

def d_index_dtype(draw, c):
    name = draw(st.sampled_from([n for n in INDEX if n in c.kw]))
    return {name: c.kw[name].to(draw(st.sampled_from([torch.int64, torch.int16, torch.float32])))}, ValueError


def d_index_length(draw, c):
    """cache_seqlens / _batch_idx / _leftpad with an entry more or less than q's batch, or 0-d."""
    name = draw(st.sampled_from([n for n in ("cache_seqlens", "cache_batch_idx", "cache_leftpad") if n in c.kw]))
    t = c.kw[name]
    return {name: draw(st.sampled_from([torch.cat([t, t[:1]]), t[:-1].clone(), t[0].clone()]))}, ValueError


def d_seqlens(draw, c):
    """cache_seqlens (tensor or int) negative, or with the new rows past the cache's end; leftpad
    zeroed so that only the seqlens are wrong."""
    past = c.info["capacity"] - c.info["s_new"] + draw(st.integers(1, 3))
    bad = draw(st.sampled_from([past, -1, -(2**31), 2**31 - 1]))
    changes = {"cache_leftpad": torch.zeros_like(c.kw["cache_leftpad"])} if "cache_leftpad" in c.kw else {}
    if draw(st.booleans()) and bad < 2**31 - 1:  # (an int beyond int32: see the report, torch's own error)
        return changes | {"cache_seqlens": bad}, ValueError
    vals = c.kw["cache_seqlens"].tolist()
    vals[draw(st.integers(0, c.b - 1))] = bad
    return changes | {"cache_seqlens": _int32(c, vals)}, ValueError


def d_new_rows_without_seqlens(draw, c):
    return {"cache_seqlens": DROP, "cache_leftpad": DROP}, ValueError


def d_leftpad(draw, c):
    vals = c.kw["cache_leftpad"].tolist()
    i = draw(st.integers(0, c.b - 1))
    vals[i] = draw(st.sampled_from([-1, int(c.kw["cache_seqlens"][i]) + 1]))
    return {"cache_leftpad": _int32(c, vals)}, ValueError


def d_batch_idx(draw, c):
    vals = c.kw["cache_batch_idx"].tolist()
    vals[draw(st.integers(0, c.b - 1))] = draw(st.sampled_from([-1, c.kw["k_cache"].shape[0], 2**31 - 1]))
    return {"cache_batch_idx": _int32(c, vals)}, ValueError


def d_batch_idx_with_table(draw, c):
    return {"cache_batch_idx": _int32(c, list(range(c.b)))}, ValueError


def d_cache_batch(draw, c):
    """A contiguous cache with fewer batch entries than q (and no cache_batch_idx)."""
    k, v = c.kw["k_cache"], c.kw["v_cache"]
    return {"cache_batch_idx": DROP, "k_cache": resized(k, 0, c.b - 1), "v_cache": resized(v, 0, c.b - 1)}, ValueError


def d_kv_table_entry(draw, c):
    """A block id outside the pool in an entry the call reads or appends to (up to cache_seqlens
    plus the new rows; the case has no leftpad)."""
    page, s_new = c.info["page"], c.info["s_new"]
    used = [(i, j) for i, n in enumerate(c.kw["cache_seqlens"].tolist()) for j in range(-(-(n + s_new) // page))]
    i, j = draw(st.sampled_from(used))
    table = c.kw["block_table"].clone()
    table[i, j] = _bad_block_id(draw, c.kw["k_cache"].shape[0])
    return {"block_table": table}, ValueError


def d_kv_table_shape(draw, c):
    """A table with a row more or less than q's batch, or no columns (no room for the sequence)."""
    table = c.kw["block_table"]
    how = draw(st.sampled_from(["more rows", "fewer rows", "no columns"]))
    if how == "no columns":
        return {"block_table": table[:, :0].clone()}, ValueError
    return {"block_table": torch.cat([table, table[:1]]) if how == "more rows" else table[:-1].clone()}, ValueError


def d_page_size(draw, c):
    """Pages of a size that is no multiple of 16 (the KV-cache kernels': NotImplementedError)."""
    rows = draw(st.sampled_from([8, 24, 0]))
    k, v = c.kw["k_cache"], c.kw["v_cache"]
    return {"k_cache": resized(k, 1, rows), "v_cache": resized(v, 1, rows)}, NotImplementedError


def d_new_rows(draw, c):
    """k without v (or v without k), or k / v whose rows, heads, head dim, batch or dtype do not fit."""
    how = draw(st.sampled_from(["k only", "v only", "rows", "heads", "head dim", "batch", "dtype"]))
    k, v = c.kw["k"], c.kw["v"]
    if how in ("k only", "v only"):
        return {"v" if how == "k only" else "k": DROP}, ValueError
    if how == "dtype":
        return {"k": rand_like(k, dtype=draw(st.sampled_from([t for t in DTYPES if t != k.dtype])))}, ValueError
    axis = {"rows": 1, "heads": 2, "head dim": 3, "batch": 0}[how]
    return {draw(st.sampled_from("kv")): resized(v, axis, v.shape[axis] + 1)}, ValueError


def d_rotary(draw, c):
    """Rotary tables too short, of width 0 or past d / 2, cos and sin of different shapes or
    dtypes, one without the other, or tables without new rows to rotate."""
    cos, sin = c.kw["rotary_cos"], c.kw["rotary_sin"]
    how = draw(st.sampled_from(["short", "width 0", "too wide", "cos vs sin", "cos only", "dtype",
                                "cos vs sin dtype", "1-d", "no new rows"]))
    if how == "short":
        n = c.info["capacity"] - draw(st.integers(1, c.info["capacity"]))
        return {"rotary_cos": cos[:n].clone(), "rotary_sin": sin[:n].clone()}, ValueError
    if how in ("width 0", "too wide"):
        w = 0 if how == "width 0" else c.d // 2 + draw(st.integers(1, 4))
        return {"rotary_cos": resized(cos, 1, w), "rotary_sin": resized(sin, 1, w)}, ValueError
    if how == "cos vs sin":
        return {"rotary_sin": resized(sin, draw(st.integers(0, 1)), sin.shape[0] + 1)}, ValueError
    if how == "cos only":
        return {"rotary_sin": DROP}, ValueError
    if how == "dtype":  # tables are q's dtype or float32
        return {"rotary_cos": cos.double(), "rotary_sin": sin.double()}, ValueError
    if how == "cos vs sin dtype":  # (or a dtype neither q's nor float32)
        return {"rotary_sin": sin.to(draw(st.sampled_from([t for t in DTYPES if t != sin.dtype])))}, ValueError
    if how == "1-d":
        return {"rotary_cos": cos[:, 0].clone(), "rotary_sin": sin[:, 0].clone()}, ValueError
    return {"k": DROP, "v": DROP}, ValueError


def d_num_splits(draw, c):
    return {"num_splits": draw(st.integers(-(2**31), -1))}, ValueError


def d_requires_grad(draw, c):
    """flash_attn_with_kvcache is forward only: a q or cache that requires grad is refused."""
    name = draw(st.sampled_from(["q", "k_cache", "v_cache"]))
    return {name: c.kw[name].detach().clone().requires_grad_()}, RuntimeError


# sdpa: attn_mask, GQA, rank

def _sdpa_rows(c):
    return c.q.shape[-2], c.kw["key"].shape[-2]


def d_mask_shape(draw, c):
    """An attn_mask that does not broadcast to (..., b, hq, lq, lk)."""
    lq, lk = _sdpa_rows(c)
    shape = draw(st.sampled_from([(lq + 1, lk), (lq, lk + 1), (1, c.hq + 1, lq, lk),
                                  (1,) * (c.q.dim() - 1) + (lq, lk)]))  # (a rank above query's)
    return {"attn_mask": torch.zeros(shape, device=c.q.device, dtype=torch.bool), "is_causal": DROP}, ValueError


def d_mask_dtype(draw, c):
    """Neither bool nor a float of query's dtype or float32."""
    dtypes = [torch.int32, torch.int64, torch.uint8, torch.float64, torch.float16, torch.bfloat16]
    dtype = draw(st.sampled_from([t for t in dtypes if t not in (c.q.dtype, torch.float32)]))
    return {"attn_mask": torch.zeros(_sdpa_rows(c), device=c.q.device).to(dtype), "is_causal": DROP}, ValueError


def d_mask_with_causal(draw, c):
    return {"attn_mask": torch.ones(_sdpa_rows(c), device=c.q.device, dtype=torch.bool), "is_causal": True}, ValueError


def d_mask_grad_dropout(draw, c):
    """A float mask that requires grad together with dropout: its gradient is not implemented."""
    mask = torch.zeros(_sdpa_rows(c), device=c.q.device, requires_grad=True)
    return {"attn_mask": mask, "is_causal": DROP, "dropout_p": 0.3}, NotImplementedError


def d_mask_elsewhere(draw, c):
    """attn_mask as a list, or on another device ("meta", which the CPU box has)."""
    lq, lk = _sdpa_rows(c)
    if draw(st.booleans()):
        return {"attn_mask": [[True] * lk] * lq, "is_causal": DROP}, TypeError
    return {"attn_mask": torch.ones(lq, lk, device="meta", dtype=torch.bool), "is_causal": DROP}, ValueError


def d_gqa_off(draw, c):
    """Fewer key heads than query heads without enable_gqa."""
    if c.hq != c.hkv:
        return {"enable_gqa": False}, ValueError
    return {"query": resized(c.q, -3, 2 * c.hq), "enable_gqa": False}, ValueError


def d_sdpa_rank(draw, c):
    """query, key, value of rank 2 (below sdpa's (N, L, E))."""
    return {n: leaf(c.kw[n].detach().flatten(0, -2), c.grad) for n in QKV["sdpa"]} | {"attn_mask": DROP}, ValueError


PAGED = frozenset({"paged"})
DEFECTS = [
    # every entry point: q / k / v
    Defect("rank", ALL, d_rank),
    Defect("dtype_mixed", ALL, d_dtype_mixed),
    Defect("dtype_not_float", ALL, d_dtype_not_float),
    Defect("kv_heads", ALL, d_kv_heads),
    Defect("kv_heads_zero", ALL, d_kv_heads_zero),
    Defect("head_dim", ALL, d_head_dim),
    Defect("head_dim_out_of_range", ALL, d_head_dim_out_of_range),
    Defect("kv_rows", ALL, d_kv_rows),
    Defect("scale", ALL, d_scale),
    Defect("not_a_tensor", ALL, d_not_a_tensor),
    Defect("batch", ("flash", "sdpa"), d_batch),
    Defect("dropout", NOT_KVCACHE, d_dropout),
    Defect("sink", NOT_KVCACHE, d_sink),
    # flash-attn's feature arguments
    Defect("window_below_minus_one", ("flash", "varlen", "kvcache"), d_window),
    Defect("window_arity", ("flash", "varlen", "kvcache"), d_window_arity),
    Defect("softcap", ("flash", "varlen", "kvcache"), d_softcap),
    Defect("alibi", ("flash", "varlen", "kvcache"), d_alibi),
    # varlen
    Defect("cu_dtype", ("varlen",), d_cu_dtype),
    Defect("cu_decreasing", ("varlen",), d_cu_decreasing),
    Defect("cu_shape", ("varlen",), d_cu_shape),
    Defect("cu_total", ("varlen",), d_cu_total),
    Defect("max_seqlen_short", ("varlen",), d_max_seqlen),
    Defect("cu_not_a_tensor", ("varlen",), d_cu_not_a_tensor),
    Defect("cu_or_table_on_meta", ("varlen",), d_cu_meta),
    Defect("table_entry", ("varlen",), d_table_entry, PAGED | {"keys"}),
    Defect("table_shape", ("varlen",), d_table_shape, PAGED),
    Defect("table_too_narrow", ("varlen",), d_table_too_narrow, PAGED | {"long keys"}),
    # flash_attn_with_kvcache
    Defect("index_dtype", ("kvcache",), d_index_dtype),
    Defect("index_length", ("kvcache",), d_index_length),
    Defect("seqlens", ("kvcache",), d_seqlens),
    Defect("new_rows_without_seqlens", ("kvcache",), d_new_rows_without_seqlens, frozenset({"new"})),
    Defect("leftpad", ("kvcache",), d_leftpad, frozenset({"leftpad"})),
    Defect("batch_idx", ("kvcache",), d_batch_idx, frozenset({"batch_idx"})),
    Defect("batch_idx_with_table", ("kvcache",), d_batch_idx_with_table, PAGED),
    Defect("cache_batch", ("kvcache",), d_cache_batch, frozenset({"contiguous", "batch > 1"})),
    Defect("table_entry", ("kvcache",), d_kv_table_entry, PAGED | {"no leftpad"}),
    Defect("table_shape", ("kvcache",), d_kv_table_shape, PAGED),
    Defect("page_size", ("kvcache",), d_page_size, PAGED),
    Defect("new_rows", ("kvcache",), d_new_rows, frozenset({"new"})),
    Defect("rotary", ("kvcache",), d_rotary, frozenset({"rotary"})),
    Defect("num_splits", ("kvcache",), d_num_splits),
    Defect("requires_grad", ("kvcache",), d_requires_grad),
    # sdpa
    Defect("mask_shape", ("sdpa",), d_mask_shape),
    Defect("mask_dtype", ("sdpa",), d_mask_dtype),
    Defect("mask_with_causal", ("sdpa",), d_mask_with_causal),
    Defect("mask_grad_dropout", ("sdpa",), d_mask_grad_dropout),
    Defect("mask_elsewhere", ("sdpa",), d_mask_elsewhere),
    Defect("gqa_off", ("sdpa",), d_gqa_off),
    Defect("rank_below_3", ("sdpa",), d_sdpa_rank),
    # any entry point: one tensor on another device
    Defect("other_device", ALL, d_other_device),
]


# ---- the check --------------------------------------------------------------------------------

def tensors(kw):
    """The call's tensor arguments that hold data (a meta tensor has none)."""
    return {n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def fresh_result(case, seed):
    """The valid call on clones of its tensors: its outputs and (the KV cache's append) caches."""
    kw = {n: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
          for n, t in case.kw.items()}
    torch.manual_seed(seed)  # the dropout key
    out = API[case.api][1](**kw)
    outs = list(out) if isinstance(out, tuple) else [out]
    if case.api == "kvcache":
        outs += [kw["k_cache"], kw["v_cache"]]
    return [snap(t) for t in outs]


def check_bad_call(case, defect, changes, exc, seed):
    op, fn = API[case.api]
    before = fresh_result(case, seed)  # (which also proves the drawn call valid)
    kw = {n: t for n, t in {**case.kw, **changes}.items() if t is not DROP}
    snapshot = {n: snap(t) for n, t in tensors(kw).items()}
    with pytest.raises(exc) as info:
        fn(**kw)
    msg = str(info.value)
    assert msg.startswith(op + ": "), f"{defect.id}: {type(info.value).__name__} not prefixed '{op}: ': {msg!r}"
    for n, t in tensors(kw).items():
        assert torch.equal(snap(t), snapshot[n]), f"{defect.id}: the failing call changed {n}"
    after = fresh_result(case, seed)
    assert all(torch.equal(x, y) for x, y in zip(before, after)), f"{defect.id}: the valid call changed after it"


@st.composite
def bad_calls(draw, api, defect, device):
    """(case, defect, changes, exception, seed): a valid call of `api` and the defect's changes to
    it (changed index tensors strided half the time, as the valid calls' are)."""
    case = draw(CASES[api](device, defect.needs))
    changes, exc = defect.make(draw, case)
    changes = {n: strided(draw, t) if n in INDEX and isinstance(t, torch.Tensor) else t for n, t in changes.items()}
    return case, defect, changes, exc, draw(st.integers(0, 2**31 - 1))


def params(defects):
    return [pytest.param(api, d, id=f"{api}-{d.id}") for d in defects for api in d.apis]


@pytest.mark.parametrize("api,defect", params(DEFECTS))
@given(data=st.data())
@fuzz_settings(8)
def test_bad_input_fuzz(api, defect, data):
    check_bad_call(*data.draw(bad_calls(api, defect, "cpu")))


@pytest.mark.cuda
@pytest.mark.parametrize("api,defect", params(DEFECTS))
@given(data=st.data())
@fuzz_settings(8)
def test_cuda_bad_input_fuzz(api, defect, data):
    check_bad_call(*data.draw(bad_calls(api, defect, "cuda")))


# ---- the bugs this suite found (session 50), pinned as fixed cases ------------------------------


def _expect_rejected(fn, op, exc=ValueError):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(op + ": "), str(info.value)


def _meta(name):
    """flash / sdpa / varlen / kvcache calls with one argument on "meta" while q is on the CPU."""
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    m = lambda t: t.to("meta")  # noqa: E731
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return {
        "flash-k": lambda: orchard.flash_attn_func(q, m(k), v),
        "flash-alibi_slopes": lambda: orchard.flash_attn_func(q, k, v, alibi_slopes=m(torch.ones(4))),
        "sdpa-key": lambda: orchard.scaled_dot_product_attention(bhsd(q), bhsd(m(k)), bhsd(v), enable_gqa=True),
        "sdpa-sink": lambda: orchard.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), enable_gqa=True,
                                                                   sink=m(torch.ones(4))),
        "varlen-k": lambda: orchard.flash_attn_varlen_func(q[0], m(k[0]), k[0], cu, cu, 5, 5),
        "kvcache-cache_seqlens": lambda: orchard.flash_attn_with_kvcache(
            q[:, :1], k, v, cache_seqlens=m(torch.ones(2, dtype=torch.int32))),
    }[name]


@pytest.mark.parametrize("name", ["flash-k", "flash-alibi_slopes", "sdpa-key", "sdpa-sink", "varlen-k",
                                  "kvcache-cache_seqlens"])
def test_meta_tensor_among_cpu_ones_is_refused(name):
    _expect_rejected(_meta(name), API[name.split("-")[0]][0])


def test_sdpa_zero_kv_heads_with_enable_gqa_is_refused():
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 0, 8, 16)
    _expect_rejected(lambda: orchard.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), API["sdpa"][0])


def test_varlen_zero_kv_heads_is_refused():
    q, kv, cu = torch.randn(8, 4, 16), torch.randn(8, 0, 16), torch.tensor([0, 3, 8], dtype=torch.int32)
    _expect_rejected(lambda: orchard.flash_attn_varlen_func(q, kv, kv, cu, cu, 5, 5), API["varlen"][0])


@pytest.mark.parametrize("p", [-0.1, NAN])
def test_varlen_decode_form_checks_dropout(p):
    q, kv, cu = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.tensor([0, 3, 8], dtype=torch.int32)
    _expect_rejected(lambda: orchard.flash_attn_varlen_func(q, kv, kv, cu, cu, 5, 5, dropout_p=p), API["varlen"][0])


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), 5])
def test_kvcache_window_size_must_be_a_pair(window):
    q, kc = torch.randn(2, 1, 4, 16), torch.randn(2, 32, 2, 16)
    _expect_rejected(lambda: orchard.flash_attn_with_kvcache(q, kc, kc.clone(), window_size=window),
                     API["kvcache"][0], (ValueError, TypeError))


def _paged_args(cu_k, table):
    torch.manual_seed(0)
    return dict(q=torch.randn(4, 4, 16), k=torch.randn(6, 16, 2, 16), v=torch.randn(6, 16, 2, 16),
                cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32),
                cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=2,
                block_table=torch.tensor(table, dtype=torch.int32))


def _listed(api, name):
    """A valid call of `api` with its argument `name` passed as a (nested) list."""
    q, k, cu = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.tensor([0, 3, 8], dtype=torch.int32)
    calls = {
        "flash": (orchard.flash_attn_func, dict(q=q, k=k, v=k, alibi_slopes=torch.ones(4), sink=torch.ones(4))),
        "sdpa": (orchard.scaled_dot_product_attention,
                 dict(query=q.transpose(1, 2), key=k.transpose(1, 2), value=k.transpose(1, 2), enable_gqa=True,
                      sink=torch.ones(4))),
        "varlen": (orchard.flash_attn_varlen_func,
                   dict(q=q[0], k=k[0], v=k[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5,
                        alibi_slopes=torch.ones(4))),
        "paged": (orchard.flash_attn_varlen_func, _paged_args([0, 2, 4], [[4], [1]])),
        "kvcache": (orchard.flash_attn_with_kvcache,
                    dict(q=q[:, :1], k_cache=torch.randn(2, 32, 2, 16), v_cache=torch.randn(2, 32, 2, 16),
                         k=k[:, :1], v=k[:, :1], cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                         rotary_cos=torch.ones(32, 8), rotary_sin=torch.zeros(32, 8), alibi_slopes=torch.ones(4))),
    }
    fn, kw = calls[api]
    kw[name] = kw[name].tolist()
    return fn, kw


@pytest.mark.parametrize("api,name", [("kvcache", "q"), ("kvcache", "k_cache"), ("kvcache", "cache_seqlens"),
                                      ("kvcache", "rotary_cos"), ("kvcache", "alibi_slopes"), ("paged", "q"),
                                      ("flash", "alibi_slopes"), ("flash", "sink"), ("sdpa", "sink"),
                                      ("varlen", "alibi_slopes")])
def test_non_tensor_arguments_raise_type_error(api, name):
    fn, kw = _listed(api, name)
    op = API["varlen" if api == "paged" else api][0]
    _expect_rejected(lambda: fn(**kw), op, TypeError)


@pytest.mark.parametrize("cu_k,table", [([20, 22, 24], [[4], [1]]), ([3, 5, 7], [[4, 99], [1, 99]])],
                         ids=["index_error", "unused_entry_refused"])
def test_paged_varlen_keys_after_an_offset(cu_k, table):
    """Sequence b's keys are its cache positions [0, cu_seqlens_k[b + 1] - cu_seqlens_k[b]): the
    same call with the offsets moved to 0 (and the table's unused column dropped) is the answer."""
    with torch.no_grad():
        got = orchard.flash_attn_varlen_func(**_paged_args(cu_k, table))
        moved = _paged_args([x - cu_k[0] for x in cu_k], [row[:1] for row in table])
        want = orchard.flash_attn_varlen_func(**moved)
    assert torch.equal(got, want)


def test_kvcache_append_into_self_overlapping_cache_is_refused():
    q, k_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cache = torch.randn(1, 32, 2, 16).expand(2, -1, -1, -1)
    _expect_rejected(lambda: orchard.flash_attn_with_kvcache(
        q, cache, cache.clone(), k=k_new, v=k_new, cache_seqlens=torch.tensor([3, 3], dtype=torch.int32)),
        API["kvcache"][0])


def test_kvcache_append_into_one_cache_passed_twice_is_refused():
    q, k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cache = torch.randn(2, 32, 2, 16)
    before = cache.clone()
    _expect_rejected(lambda: orchard.flash_attn_with_kvcache(
        q, cache, cache, k=k_new, v=v_new, cache_seqlens=torch.tensor([3, 3], dtype=torch.int32)),
        API["kvcache"][0])
    assert torch.equal(cache, before)
    with torch.no_grad():  # without an append, one tensor as both caches is a read: fine
        orchard.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([3, 3], dtype=torch.int32))


def test_kvcache_integer_arguments_past_int32():
    """num_splits past int32 means as many splits as there are keys (the plan clamps it); an int
    cache_seqlens past int32 is refused with the op's prefix."""
    q, cache = torch.randn(1, 1, 2, 16), torch.randn(1, 64, 2, 16)
    with torch.no_grad():
        want = orchard.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=40, num_splits=64)
        for n in (2**31, 2**32, 2**40):
            got = orchard.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=40, num_splits=n)
            assert torch.equal(got, want), n
    _expect_rejected(lambda: orchard.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=2**31),
                     API["kvcache"][0])
