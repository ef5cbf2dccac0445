"""torch.autocast: Orchard's ops take the autocast dtype, as torch's SDPA does
(python/orchard/_autocast.py). CPU in CI; the CUDA cases are marked cuda."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orchard
from conftest import DEVICES

# The autocast dtypes torch supports on each device type, default first.
AMP_DTYPES = {"cpu": [torch.bfloat16, torch.float16], "cuda": [torch.float16, torch.bfloat16]}


def _cases():
    for dev in DEVICES:
        name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        for dt in AMP_DTYPES[name]:
            yield pytest.param(name, dt, marks=marks, id=f"{name}-{str(dt).split('.')[-1]}")


def _qkv(device, b=2, s=24, h=4, hkv=2, d=32):
    mk = lambda heads: torch.randn(b, s, heads, d, device=device, requires_grad=True)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


@pytest.mark.parametrize("device,dtype", list(_cases()))
def test_flash_attn_func_takes_autocast_dtype(device, dtype):
    q, k, v = _qkv(device)
    with torch.autocast(device, dtype=dtype):
        out = orchard.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == dtype
    # the same as casting by hand (autocast must not change the math)
    want = orchard.flash_attn_func(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype),
                                   causal=True)
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    # gradients reach the float32 leaves, in float32
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("kind", ["causal", "mask"])
@pytest.mark.parametrize("device,dtype", list(_cases()))
def test_sdpa_dropin_follows_torch_sdpa_under_autocast(device, dtype, kind):
    q, k, v = (t.detach().transpose(1, 2) for t in _qkv(device, hkv=4))  # (B, H, S, D) float32
    mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], device=device) > 0.3
    with torch.autocast(device, dtype=dtype):
        for kw in [dict(is_causal=True) if kind == "causal" else dict(attn_mask=mask)]:
            got = orchard.scaled_dot_product_attention(q, k, v, **kw)
            ref = F.scaled_dot_product_attention(q, k, v, **kw)
            assert got.dtype == ref.dtype == dtype
            if "attn_mask" in kw:  # rows the random mask hides entirely: torch gives NaN, Orchard 0
                keep = mask.any(-1, keepdim=True).expand_as(ref)
                got, ref = got[keep], ref[keep]
            exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
            exact = exact[keep] if "attn_mask" in kw else exact
            # flash-attn's rule: no worse than 2x torch's own low-precision error
            err = (got.double() - exact).abs().max().item()
            ref_err = (ref.double() - exact).abs().max().item()
            assert err <= 2 * ref_err + 1e-3, (kw.keys(), err, ref_err)


@pytest.mark.parametrize("device,dtype", list(_cases()))
def test_feature_tensors_keep_their_dtypes(device, dtype):
    """sink / ALiBi slopes stay float32 and varlen cu_seqlens int32 under autocast."""
    q, k, v = _qkv(device, hkv=4)
    sink = torch.randn(4, device=device, requires_grad=True)
    slopes = torch.rand(4, device=device)
    with torch.autocast(device, dtype=dtype):
        out = orchard.flash_attn_func(q, k, v, causal=True, sink=sink, alibi_slopes=slopes,
                                      window_size=(5, 0), softcap=3.0)
        cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
        vout = orchard.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 14, 14, causal=True)
    assert out.dtype == dtype and vout.dtype == dtype
    out.float().sum().backward()
    assert sink.grad is not None and sink.grad.dtype == torch.float32


def test_no_autocast_no_cast_and_disabled_region():
    q, k, v = (t.detach() for t in _qkv("cpu"))
    assert orchard.flash_attn_func(q, k, v).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert orchard.flash_attn_func(q, k, v).dtype == torch.float32
        # float64 is not an autocast-eligible dtype (as in torch)
        assert orchard.flash_attn_func(q.double(), k.double(), v.double()).dtype == torch.float64
    # a CUDA autocast region leaves CPU tensors alone
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert orchard.flash_attn_func(q, k, v).dtype == torch.float32


def test_mixed_input_dtypes_unified_by_autocast():
    q, k, v = (t.detach() for t in _qkv("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orchard.flash_attn_func(q, k.bfloat16(), v.half())
    assert out.dtype == torch.bfloat16


def test_autocast_training_step_matches_sdpa_model():
    """A small attention block trained one step under CPU autocast: Orchard and
    torch's SDPA give the same bf16 loss and float32 gradients to bf16 accuracy."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 3 * 32)
    x = torch.randn(2, 16, 32)

    def step(attn):
        proj.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = proj(x).view(2, 16, 3, 4, 8).unbind(2)
            o = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            loss = o.float().square().mean()
        loss.backward()
        return loss.detach(), proj.weight.grad.clone()

    l_o, g_o = step(orchard.scaled_dot_product_attention)
    l_r, g_r = step(F.scaled_dot_product_attention)
    assert g_o.dtype == torch.float32
    torch.testing.assert_close(l_o, l_r, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g_o, g_r, rtol=5e-2, atol=5e-3)


def test_autocast_under_torch_compile():
    q, k, v = (t.detach() for t in _qkv("cpu", s=16))
    f = torch.compile(lambda q, k, v: orchard.flash_attn_func(q, k, v, causal=True),
                      fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(q, k, v)
    assert out.dtype == torch.bfloat16
    want = orchard.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
