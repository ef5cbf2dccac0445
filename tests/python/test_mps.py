"""Real-MPS tests (Apple silicon, torch >= 2.7): ``pytest -m mps`` on a Mac; skipped
elsewhere. They have not been run yet — no Mac was available when the Metal backend was
written (it is verified on the emulated execution model: tests/metal and
test_mps_emulated.py)."""

import os

import pytest
import torch

import orchard
import orchard_ops

pytestmark = [
    pytest.mark.mps,
    pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS device"),
]


def test_smoke_orchard_ops_forward_backward_with_debug_logs(tmp_path, monkeypatch, capfd):
    # The original module's smoke test, on the GPU, checked against the CPU backend.
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_TENSOR_PROFILE", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    cpu = [torch.randn(2, 4, 64, requires_grad=True) for _ in range(3)]
    mps = [t.detach().to("mps").requires_grad_(True) for t in cpu]
    out, _ = orchard_ops.flash_attn_fwd(*mps)
    out.sum().backward()
    ref, _ = orchard_ops.flash_attn_fwd(*cpu)
    ref.sum().backward()
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=0)
    for a, b in zip(mps, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-5, rtol=0)
    log = (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text()
    assert "backend=mps variant=metal_fp32_d64" in log and "BWD #" in log
    err = capfd.readouterr().err
    assert "mps storage=" in err and "-> zero-copy" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_cpu_backend(dtype, d, causal):
    q, k, v, g = (torch.randn(2, 77, 4, d).to(dtype) for _ in range(4))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    outs = [t.to("mps").requires_grad_(True) for t in (q, k, v)]
    ref = orchard.flash_attn_func(*ins, causal=causal)
    ref.backward(g)
    out = orchard.flash_attn_func(*outs, causal=causal)
    out.backward(g.to("mps"))
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    for a, b in zip(outs, ins):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=tol, rtol=tol)


def test_dropout_mask_matches_cpu():
    q = torch.randn(1, 50, 2, 64)
    args = (0.125, True, False, 0.2, 1234, 5, True)
    _, _, cpu_mask = orchard.flash_attn_forward(q, q, q, *args)
    qm = q.to("mps")
    _, _, mps_mask = orchard.flash_attn_forward(qm, qm, qm, *args)
    assert torch.equal(mps_mask.cpu(), cpu_mask)
