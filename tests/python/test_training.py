"""Training smoke tests through the seed-compatible orchard_ops API and the
demo's model."""

import sys

import pytest
import torch

import orchard_ops
from conftest import DEVICES
from helpers import attention_ref, randn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_orchard_ops_forward_backward(device, rank, causal):
    shape = (2, 40, 32) if rank == 3 else (2, 4, 40, 32)
    q, k, v = (randn(*shape, device=device, requires_grad=True) for _ in range(3))
    out, mask = orchard_ops.flash_attn_fwd(q, k, v, None, 0.0, causal)
    assert out.shape == q.shape and mask.numel() == 0
    out.sum().backward()
    to_bshd = (lambda t: t.unsqueeze(2)) if rank == 3 else (lambda t: t.transpose(1, 2))
    from_bshd = (lambda t: t.squeeze(2)) if rank == 3 else (lambda t: t.transpose(1, 2))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(to_bshd(q64), to_bshd(k64), to_bshd(v64), None, causal, top_left=True)
    ref = from_bshd(ref)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, r in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [3, 4])
def test_orchard_ops_dropout_mask(device, rank):
    shape = (2, 30, 16) if rank == 3 else (2, 3, 30, 16)
    q = randn(*shape, device=device, requires_grad=True)
    out, mask = orchard_ops.flash_attn_fwd(q, q, q, 0.25, 0.2, True)
    want = (2, 30, 30) if rank == 3 else (2, 3, 30, 30)
    assert mask.shape == want and mask.dtype == torch.bool
    assert 0.7 < mask.float().mean().item() < 0.9
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_orchard_ops_rejects_bad_rank():
    with pytest.raises(ValueError, match="orchard_ops.flash_attn_fwd"):
        orchard_ops.flash_attn_fwd(randn(4, 8), randn(4, 8), randn(4, 8), None, 0.0, False)


def test_training_loop_reduces_loss():
    # A few optimiser steps on a tiny attention model: loss must fall.
    torch.manual_seed(0)
    d, h, s = 32, 4, 24
    proj = torch.nn.Linear(d, 3 * d)
    out_proj = torch.nn.Linear(d, d)
    params = list(proj.parameters()) + list(out_proj.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    x = randn(4, s, d)
    target = randn(4, s, d)
    losses = []
    for _ in range(30):
        qkv = proj(x).view(4, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y, _ = orchard_ops.flash_attn_fwd(qkv[0], qkv[1], qkv[2], None, 0.0, True)
        loss = ((out_proj(y.transpose(1, 2).reshape(4, s, d)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_demo_grad_check_and_short_run(capsys):
    from orchard import demo
    rc = demo.main(["--steps", "30", "--layers", "1", "--d-model", "32", "--heads", "2", "--ctx", "32",
                    "--batch", "8", "--lr", "1e-2", "--no-progress", "--sample", "20", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "max relative error" in text, text
    assert rc == 0, text
