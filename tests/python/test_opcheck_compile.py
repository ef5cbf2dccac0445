"""torch.library.opcheck on both custom ops, and torch.compile parity."""

import pytest
import torch
import torch.nn as nn

import orchard
from conftest import DEVICES
from helpers import OrchardOpLog, randn


def _fwd_args(device, dtype=torch.float32, dropout=0.0, mask=False, layout="bshd"):
    if layout == "bhsd":
        q = randn(2, 4, 12, 16, dtype=dtype, device=device).transpose(1, 2)
        k = randn(2, 2, 20, 16, dtype=dtype, device=device).transpose(1, 2)
        v = randn(2, 2, 20, 16, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = randn(2, 12, 4, 16, dtype=dtype, device=device)
        k = randn(2, 20, 2, 16, dtype=dtype, device=device)
        v = randn(2, 20, 2, 16, dtype=dtype, device=device)
    for t in (q, k, v):
        t.requires_grad_()
    return (q, k, v, 0.25, True, False, dropout, 42, 0, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["plain", "dropout_mask", "rng_state", "bhsd_top_left"])
def test_opcheck_forward(device, variant):
    if variant == "plain":
        args = _fwd_args(device)
    elif variant == "dropout_mask":
        args = _fwd_args(device, dropout=0.2, mask=True)
    elif variant == "rng_state":
        args = (*_fwd_args(device, dropout=0.2, mask=True), False, "orchard.flash_attn",
                torch.tensor([7, 1], dtype=torch.int64, device=device))
    else:
        args = list(_fwd_args(device, layout="bhsd"))
        args[5] = True
        args = tuple(args)
    torch.library.opcheck(torch.ops.orchard.flash_attn_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    q, k, v, *opts = _fwd_args(device)
    out, lse, _ = torch.ops.orchard.flash_attn_forward(q.detach(), k.detach(), v.detach(), *opts)
    do = randn(*out.shape, device=device)
    args = (do, q.detach(), k.detach(), v.detach(), out, lse, 0.25, True, False, 0.0, 0, 0, False)
    torch.library.opcheck(torch.ops.orchard.flash_attn_backward.default, args)


class TinyBlock(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).unbind(2)
        y = orchard.flash_attn_func(q, k, v, causal=True)
        y2 = orchard.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True)
        return self.proj((y + y2.transpose(1, 2)).reshape(b, t, c)).relu().sum(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(device, backend):
    torch._dynamo.reset()
    m = TinyBlock().to(device)
    x = randn(2, 24, 32, device=device)
    eager = m(x)
    g_eager = torch.autograd.grad(eager.sum(), list(m.parameters()))
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    got = compiled(x)
    g_got = torch.autograd.grad(got.sum(), list(m.parameters()))
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_with_dropout_fullgraph(device, backend):
    # The drop-ins draw the dropout key as a device tensor (torch.randint), so a
    # model with attention dropout compiles as one graph; with torch's own RNG in
    # the compiled graph (inductor: fallback_random) it matches eager under the
    # same torch seed, forward and backward.
    torch._dynamo.reset()

    def f(q):
        return orchard.flash_attn_func(q, q, q, dropout_p=0.3).sum(-1)

    q = randn(1, 16, 2, 8, device=device, requires_grad=True)
    torch.manual_seed(5)
    eager = f(q)
    (g_eager,) = torch.autograd.grad(eager.sum(), (q,))
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(5)
        got = torch.compile(f, backend=backend, fullgraph=True)(q)
        (g_got,) = torch.autograd.grad(got.sum(), (q,))
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_modes_and_fake_tensors_still_see_the_ops(device):
    # The autograd kernels call the kernel body directly when only a plain
    # CPU/CUDA key is left below autograd; a dispatch mode (or fake tensors)
    # must still go through the dispatcher and see both ops.
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v, *opts = _fwd_args(device)
    with OrchardOpLog() as log:
        out, _, _ = torch.ops.orchard.flash_attn_forward(q, k, v, *opts)
        out.sum().backward()
    assert log.ops == ["orchard.flash_attn_forward.default", "orchard.flash_attn_backward.default"]
    with FakeTensorMode():
        fq, fk = torch.empty(2, 5, 4, 8, device=device), torch.empty(2, 7, 2, 8, device=device)
        out, lse, mask = torch.ops.orchard.flash_attn_forward(fq, fk, fk, 0.3, False, False, 0.1, 0,
                                                              0, True)
    assert (out.shape, lse.shape, mask.shape) == ((2, 5, 4, 8), (2, 4, 5), (2, 4, 5, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_surface_unchanged(device):
    # What torch.library.custom_op produced before the ops were registered by
    # hand: grad_fn name, differentiable float outputs, trailing defaults.
    q, k, v, *opts = _fwd_args(device, dropout=0.0, mask=True)
    out, lse, mask = torch.ops.orchard.flash_attn_forward(q, k, v, *opts)
    assert type(out.grad_fn).__name__ == "GeneratedBackwardFor_orchard_flash_attn_forward_defaultBackward"
    assert out.requires_grad and lse.requires_grad and not mask.requires_grad
    assert bool((mask == 1).all())
    full, _, _ = torch.ops.orchard.flash_attn_forward(q, k, v, *opts, False, "orchard.flash_attn")
    torch.testing.assert_close(full, out, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.ops.orchard.flash_attn_forward(q, k, v, *opts)[0].requires_grad


def _feature_args(device, kind):
    """Forward-op arguments with the trailing feature arguments (_FEATURE_SCHEMA)."""
    q, k, v, *opts = _fwd_args(device)
    base = (q, k, v, *opts, False, "orchard.flash_attn", None)
    if kind == "window_softcap_alibi_sink":
        slopes = torch.rand(4, device=device)
        sink = randn(4, device=device, requires_grad=True)
        return base + (5, 3, 4.0, slopes, sink, None, None, None, 0, 0)
    if kind == "attn_mask":
        mask = randn(1, 4, 12, 20, device=device)
        args = list(base)
        args[4] = False  # SDPA: no is_causal with a mask
        return tuple(args) + (-1, -1, 0.0, None, None, mask, None, None, 0, 0)
    if kind == "dropout_offsets":  # dropout's global coordinates (context parallelism)
        q, k, v, *opts = _fwd_args(device, dropout=0.2, mask=True)
        return (q, k, v, *opts, False, "orchard.flash_attn", None,
                -1, -1, 0.0, None, None, None, None, None, 0, 0, 7, 5, 2, 8)
    lens_q, lens_k = [5, 0, 7], [9, 4, 7]  # varlen
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 13, 20], dtype=torch.int32, device=device)
    qv = randn(sum(lens_q), 4, 16, device=device, requires_grad=True)
    kv = randn(sum(lens_k), 2, 16, device=device, requires_grad=True)
    vv = randn(sum(lens_k), 2, 16, device=device, requires_grad=True)
    return (qv, kv, vv, *opts, False, "orchard.flash_attn", None,
            -1, -1, 0.0, None, None, None, cu_q, cu_k, max(lens_q), max(lens_k))


FEATURE_KINDS = ["window_softcap_alibi_sink", "attn_mask", "varlen", "dropout_offsets"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_opcheck_forward_with_features(device, kind):
    torch.library.opcheck(torch.ops.orchard.flash_attn_forward.default, _feature_args(device, kind))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_opcheck_backward_with_features(device, kind):
    args = _feature_args(device, kind)
    q, k, v = (t.detach() for t in args[:3])
    with torch.no_grad():
        out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, *args[3:])
    do = randn(*out.shape, device=device)
    fwd_opts = args[3:9]  # scale .. offset
    features = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args[13:])
    bwd = (do, q, k, v, out, lse, *fwd_opts, False, "orchard.flash_attn", None, *features)
    torch.library.opcheck(torch.ops.orchard.flash_attn_backward.default, bwd)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_features_fullgraph(device):
    torch._dynamo.reset()
    slopes = torch.rand(2, device=device)
    lens = [5, 11]
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)

    def f(q, qp, mask):
        a = orchard.flash_attn_func(q, q, q, window_size=(4, 2), softcap=3.0, alibi_slopes=slopes)
        b = orchard.flash_attn_varlen_func(qp, qp, qp, cu, cu, max(lens), max(lens), causal=True)
        c = orchard.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2),
                                                 q.transpose(1, 2), attn_mask=mask)
        return a.sum() + b.sum() + c.sum()

    q = randn(1, 16, 2, 8, device=device, requires_grad=True)
    qp = randn(16, 2, 8, device=device, requires_grad=True)
    mask = torch.rand(16, 16, device=device) > 0.2
    eager = f(q, qp, mask)
    g_eager = torch.autograd.grad(eager, (q, qp))
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, qp, mask)
    g_got = torch.autograd.grad(got, (q, qp))
    torch.testing.assert_close(got, eager)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_dropout_offsets_fullgraph(device):
    """The dropout coordinate arguments (SymInts) trace into one graph; the compiled
    call draws the same mask as eager (same key tensor)."""
    torch._dynamo.reset()
    rng = torch.tensor([11, 3], dtype=torch.int64, device=device)

    def f(q, row0):
        out, _, mask = torch.ops.orchard.flash_attn_forward(
            q, q, q, 0.25, True, False, 0.3, 0, 0, True, False, "orchard.flash_attn", rng,
            -1, -1, 0.0, None, None, None, None, None, 0, 0, row0, 3, 2, 6)
        return out.sum(-1), mask

    q = randn(1, 16, 2, 8, device=device, requires_grad=True)
    eager, m_eager = f(q, 40)
    (g_eager,) = torch.autograd.grad(eager.sum(), (q,))
    got, m_got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, 40)
    (g_got,) = torch.autograd.grad(got.sum(), (q,))
    assert torch.equal(m_got, m_eager)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)
