"""The README's support matrix is what the code does: every cell runs here on
the backends present. "fwd+bwd" must run forward and backward, "fwd" forward
only (the backward raises NotImplementedError), "no" must raise
NotImplementedError with the op name, before anything runs."""

import pathlib
import re

import pytest
import torch

import orchard
from conftest import HAS_CUDA
from helpers import randn

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = {"CPU": "cpu", "CUDA": "cuda", "Metal (MPS)": "mps"}


def _matrix():
    text = README.read_text()
    block = re.search(r"<!-- support-matrix:start -->(.*?)<!-- support-matrix:end -->", text, re.S)
    assert block, "README has no support matrix"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in block.group(1).strip().splitlines()]
    header, rows = rows[0], rows[2:]
    return header[1:], {r[0]: dict(zip(header[1:], r[1:])) for r in rows}


COLUMNS, MATRIX = _matrix()


def _available(device):
    if device == "cpu":
        return True
    if device == "cuda":
        return HAS_CUDA
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _qkv(device, dtype, d=32, dv=None, b=2, s=24, hq=4, hkv=2):
    q = randn(b, s, hq, d, dtype=dtype, device=device, requires_grad=True)
    k = randn(b, s, hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = randn(b, s, hkv, dv or d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _flash(**kw):
    def run(device, dtype):
        q, k, v = _qkv(device, dtype)
        return orchard.flash_attn_func(q, k, v, **kw), (q, k, v)
    return run


def _alibi(device, dtype):
    q, k, v = _qkv(device, dtype)
    slopes = torch.rand(4, device=device)
    return orchard.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes), (q, k, v)


def _sink(device, dtype):
    q, k, v = _qkv(device, dtype)
    sink = torch.zeros(4, device=device, requires_grad=True)
    return orchard.flash_attn_func(q, k, v, causal=True, sink=sink), (q, k, v, sink)


def _varlen(device, dtype):
    cu = torch.tensor([0, 5, 5, 24], dtype=torch.int32, device=device)
    q, k, v = (randn(24, h, 32, dtype=dtype, device=device, requires_grad=True) for h in (4, 2, 2))
    return orchard.flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True), (q, k, v)


def _paged_varlen(device, dtype):
    cu_q = torch.tensor([0, 5, 5, 24], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 30, 32, 51], dtype=torch.int32, device=device)
    table = torch.tensor([[3, 0], [5, 5], [1, 4]], dtype=torch.int32, device=device)  # 16-row pages
    q = randn(24, 4, 32, dtype=dtype, device=device, requires_grad=True)
    k, v = (randn(6, 16, 2, 32, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    out = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 19, 30, causal=True, block_table=table)
    return out, (q, k, v)


def _attn_mask(device, dtype):
    q, k, v = (t.transpose(1, 2) for t in _qkv(device, dtype, hkv=4))
    bool_mask = torch.rand(24, 24, device=device) > 0.3
    bias = randn(2, 1, 24, 24, dtype=dtype, device=device)
    a = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask | torch.eye(24, dtype=torch.bool, device=device))
    b = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return a + b, (q, k, v)


def _attn_mask_sink(device, dtype):
    # A key-padding mask (B, 1, 1, S), batch 1 padded, with gpt-oss's sinks.
    q, k, v = (t.transpose(1, 2) for t in _qkv(device, dtype, hkv=4))
    keep = torch.arange(24, device=device) < torch.tensor([24, 15], device=device)[:, None]
    sink = torch.zeros(4, device=device, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], sink=sink)
    return out, (q, k, v, sink)


def _dv(device, dtype):
    q, k, v = _qkv(device, dtype, d=32, dv=16)
    return orchard.flash_attn_func(q, k, v, causal=True), (q, k, v)


FEATURES = {
    "causal, GQA/MQA, dropout": _flash(causal=True, dropout_p=0.1),
    "sliding window": _flash(window_size=(5, 2)),
    "softcap": _flash(softcap=3.0),
    "ALiBi": _alibi,
    "sink": _sink,
    "varlen": _varlen,
    "varlen + block_table (paged KV)": _paged_varlen,
    "attn_mask (bool / float)": _attn_mask,
    "attn_mask + sink": _attn_mask_sink,
    "value head dim != head dim": _dv,
}


def test_matrix_lists_every_feature_and_backend():
    assert set(COLUMNS) == set(BACKENDS), COLUMNS
    assert set(FEATURES) | {"dtypes", "head dims"} == set(MATRIX), sorted(MATRIX)
    for feature, cells in MATRIX.items():
        if feature in FEATURES:
            for col, cell in cells.items():
                assert cell in ("fwd+bwd", "fwd", "no"), (feature, col, cell)


def _params():
    for col, device in BACKENDS.items():
        mark = [pytest.mark.cuda] if device == "cuda" else []
        yield from (pytest.param(f, col, id=f"{col}-{f}", marks=mark) for f in FEATURES)


def _expect_not_implemented(fn, what):
    try:
        fn()
    except NotImplementedError as e:
        assert str(e).startswith("orchard."), str(e)
        return
    raise AssertionError(f"{what}: the matrix says unsupported but it ran")


@pytest.mark.parametrize("feature,column", list(_params()))
def test_feature_cell(feature, column):
    device = BACKENDS[column]
    if not _available(device):
        pytest.skip(f"no {column} device")
    cell = MATRIX[feature][column]
    for name in MATRIX["dtypes"][column].split():
        dtype = DTYPES[name]
        what = f"{feature} on {column} {name}"
        if cell == "no":
            _expect_not_implemented(lambda: FEATURES[feature](device, dtype), what)
            continue
        out, inputs = FEATURES[feature](device, dtype)
        assert torch.isfinite(out).all(), what
        grads = lambda: torch.autograd.grad(out.float().sum(), inputs)
        if cell == "fwd":
            _expect_not_implemented(grads, what + " backward")
        else:
            assert all(torch.isfinite(g).all() for g in grads()), what


@pytest.mark.parametrize("column", [pytest.param(c, marks=[pytest.mark.cuda] if d == "cuda" else [])
                                    for c, d in BACKENDS.items()])
def test_dtype_and_head_dim_cells(column):
    device = BACKENDS[column]
    if not _available(device):
        pytest.skip(f"no {column} device")
    listed = MATRIX["dtypes"][column].split()
    for name, dtype in DTYPES.items():
        call = lambda: orchard.flash_attn_func(*_qkv(device, dtype))
        if name in listed:
            assert torch.isfinite(call()).all()
        else:
            with pytest.raises((NotImplementedError, ValueError, TypeError, RuntimeError)):
                call()
    dims = MATRIX["head dims"][column]
    dtype = DTYPES[listed[-1]]
    ok = [8, 64, 256] if dims.startswith("multiples of 8") else [1, 59, 256]
    for d in ok:
        assert torch.isfinite(orchard.flash_attn_func(*_qkv(device, dtype, d=d))).all(), d
    if dims.startswith("multiples of 8"):
        with pytest.raises((NotImplementedError, ValueError)):
            orchard.flash_attn_func(*_qkv(device, dtype, d=59))
