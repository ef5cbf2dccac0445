"""flash_attn_func and scaled_dot_product_attention drop-ins vs torch, and
their error paths."""

import pytest
import torch
import torch.nn.functional as F

import orchard
from conftest import DEVICES
from helpers import attention_ref, randn


def _torch_sdpa_f64(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sq,sk", [(32, 32), (20, 45), (45, 20)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_matches_torch(device, sq, sk, causal, gqa):
    hkv = 2 if gqa else 4
    q = randn(2, 4, sq, 32, device=device, requires_grad=True)
    k = randn(2, hkv, sk, 32, device=device, requires_grad=True)
    v = randn(2, hkv, sk, 32, device=device, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, scale=0.2)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _torch_sdpa_f64(q64, k64, v64, is_causal=causal, enable_gqa=gqa, scale=0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    do = randn(*out.shape, device=device)
    g = torch.autograd.grad(out, (q, k, v), do)
    r = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for a, b in zip(g, r):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_3d_and_5d_inputs(device):
    q3 = randn(3, 10, 16, device=device)
    torch.testing.assert_close(orchard.scaled_dot_product_attention(q3, q3, q3, is_causal=True).double(),
                               _torch_sdpa_f64(q3, q3, q3, is_causal=True), atol=2e-5, rtol=1e-4)
    q5 = randn(2, 3, 2, 10, 16, device=device)
    torch.testing.assert_close(orchard.scaled_dot_product_attention(q5, q5, q5).double(),
                               _torch_sdpa_f64(q5, q5, q5), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sq,sk", [(32, 32), (17, 40), (40, 17)])
def test_flash_attn_func_bottom_right_vs_sdpa_top_left(device, sq, sk):
    q = randn(2, sq, 4, 16, device=device)
    k = randn(2, sk, 2, 16, device=device)
    v = randn(2, sk, 2, 16, device=device)
    fa = orchard.flash_attn_func(q, k, v, causal=True)
    ref_br, _ = attention_ref(q, k, v, None, causal=True, top_left=False)
    torch.testing.assert_close(fa.double(), ref_br, atol=2e-5, rtol=1e-4)
    sd = orchard.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
    ref_tl = _torch_sdpa_f64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                             enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(sd.double(), ref_tl, atol=2e-5, rtol=1e-4)
    if sq != sk:
        assert not torch.allclose(fa, sd, atol=1e-3)  # the two conventions really differ


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_func_return_attn_probs(device):
    q = randn(1, 24, 2, 16, device=device)
    out, lse, smask = orchard.flash_attn_func(q, q, q, dropout_p=0.4, return_attn_probs=True)
    assert lse.shape == (1, 2, 24) and lse.dtype == torch.float32
    assert smask.shape == (1, 2, 24, 24) and smask.dtype == torch.bool
    ref, ref_lse = attention_ref(q, q, q, keep_mask=smask, dropout_p=0.4)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    out, lse, smask = orchard.flash_attn_func(q, q, q, return_attn_probs=True)
    assert smask.all()


def test_not_implemented_paths():
    q = randn(1, 8, 2, 16)
    qs = q.transpose(1, 2)
    with pytest.raises(NotImplementedError, match="gradient of a float attn_mask together with dropout"):
        orchard.scaled_dot_product_attention(qs, qs, qs, attn_mask=randn(8, 8, requires_grad=True),
                                             dropout_p=0.1)
    # block_table is implemented (test_paged_varlen.py): packed k / v with it are a shape error.
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="with block_table, k and v are paged caches"):
        orchard.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8, block_table=cu[None])


def test_gqa_needs_enable_gqa_like_torch():
    q, k = randn(1, 8, 4, 16), randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(RuntimeError, match="enable_gqa"):  # OrchardShapeError is a RuntimeError too
        orchard.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="must divide"):
        orchard.scaled_dot_product_attention(q, randn(1, 3, 4, 16), randn(1, 3, 4, 16), enable_gqa=True)


@pytest.mark.parametrize("bad,match", [
    (lambda q: orchard.flash_attn_func(q, q.double(), q), "dtype"),
    (lambda q: orchard.flash_attn_func(q, q[..., :8], q), "shape"),
    (lambda q: orchard.flash_attn_func(q, q[:, :, :3], q[:, :, :3]), "heads"),
    (lambda q: orchard.flash_attn_func(q, q, q, dropout_p=1.0), "dropout_p"),
    (lambda q: orchard.flash_attn_func(q[0], q[0], q[0]), "4-D"),
    (lambda q: orchard.flash_attn_func(q.int(), q.int(), q.int()), "dtype"),
    (lambda q: orchard.flash_attn_func(*(randn(1, 4, 1, 512),) * 3), "head dim"),
])
def test_bad_input_raises_op_prefixed_value_error(bad, match):
    q = randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match=match) as info:
        bad(q)
    assert str(info.value).startswith("orchard."), str(info.value)


def test_sdpa_dropout_training_semantics():
    # Like torch: dropout applies whenever dropout_p > 0; p = 0 is exact.
    q = randn(1, 2, 16, 8)
    a = orchard.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    b = orchard.scaled_dot_product_attention(q, q, q)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b.double(), _torch_sdpa_f64(q, q, q), atol=2e-5, rtol=1e-4)


def test_public_api_and_version():
    assert orchard.__version__ == "0.1.0"
    info = orchard.build_info()
    assert info["version"] == "0.1.0"
    assert isinstance(info["cuda_compiled"], bool) and info["cpu_threads"] >= 1
    known = {"generic", "avx2-fma", "avx512", "avx512-bf16", "amx", "f16c"}
    assert info["cpu_kernels"] and set(info["cpu_kernels"].split()) <= known, info["cpu_kernels"]
