"""Dropout at the shapes the sm90 (Hopper) kernels take (with ORCHARD_SM90_DROPOUT=1: all of them;
unset: the head-dim buckets measured faster than the sm80 kernels)
(src/backends/cuda/sm90/dropout_scores.cuh): the forward's output applies the documented mask
(the mask an sm80 call returns for the same key: the same bits on every path) and the backward
(the sm90 one with the switch, else the sm80 kernels), fed that forward's out and LSE,
gives the reference gradients. In this process the switch is whatever the environment says; on a
GPU that runs the sm90 kernels a child pytest repeats the cases with the switch on and checks,
through the debug log, that each case ran the kernels it should."""

import os

import pytest
import torch

import orchard  # noqa: F401 (registers the ops)
from helpers import attention_ref, check_close_rule, randn

pytestmark = pytest.mark.cuda

_SCALE, _P = 0.125, 0.3
_PLAIN_FEATURES = (-1, -1, 0.0, None, None, None, None, None, 0, 0)

# (dtype, d, causal, b, sq, sk, hq, hkv, row offset, column offset,
#  (forward, backward) on the sm90 kernels with the switch)
CASES = [
    (torch.bfloat16, 64, False, 2, 300, 300, 4, 2, 0, 0, (True, True)),  # d64: 3 WGs (192-row tiles)
    (torch.bfloat16, 64, True, 1, 200, 457, 4, 4, 0, 0, (True, True)),  # bottom-right; 2 WGs (< 2048 keys)
    (torch.float16, 64, True, 1, 260, 2100, 2, 1, 32, 64, (True, True)),  # causal on 3 WGs, offsets
    (torch.bfloat16, 128, False, 2, 300, 300, 4, 2, 0, 0, (True, True)),
    (torch.float16, 128, True, 2, 300, 300, 4, 4, 16, 32, (True, True)),  # a context-parallel block on the 16 / 32 grid
    (torch.bfloat16, 120, False, 1, 129, 260, 2, 2, 0, 0, (True, True)),  # the 128 bucket, zero-filled columns
    (torch.bfloat16, 192, False, 1, 200, 1100, 2, 2, 0, 0, (True, True)),  # d192's 96-key tiles (>= 1024 keys)
    (torch.bfloat16, 192, True, 1, 300, 300, 2, 1, 0, 0, (True, True)),
    (torch.bfloat16, 256, False, 1, 200, 2100, 2, 2, 0, 0, (True, True)),  # 64-key tiles (plain: 80)
    (torch.float16, 256, True, 1, 300, 300, 2, 2, 48, 16, (False, True)),  # columns off the 32 grid: sm80 forward
    (torch.bfloat16, 160, True, 2, 130, 200, 4, 2, 0, 0, (True, True)),  # the 192 bucket, zero-filled columns
    (torch.bfloat16, 80, False, 1, 200, 200, 2, 2, 0, 0, (True, True)),  # the d96 bucket: 3 WGs x 96 keys
    (torch.bfloat16, 96, True, 2, 400, 700, 3, 3, 16, 96, (True, True)),
    (torch.bfloat16, 128, False, 1, 200, 200, 2, 2, 0, 8, (False, False)),  # off the 16 grid: the sm80 kernels
    (torch.float16, 128, True, 2, 300, 300, 4, 4, 3, 16, (False, False)),  # draw per element there
]


def _ids(case):
    dtype, d, causal, b, sq, sk, hq, hkv, r0, c0, _ = case
    return f"{str(dtype)[6:]}-d{d}-{'causal' if causal else 'full'}-{sq}x{sk}-h{hq}:{hkv}-off{r0},{c0}"


def _fwd(q, k, v, causal, rng, r0, c0, return_mask):
    return torch.ops.orchard.flash_attn_forward(q, k, v, _SCALE, causal, False, _P, 0, 0, return_mask, False,
                                                "orchard.flash_attn", rng, *_PLAIN_FEATURES, r0, c0, 0, 0)


def _bwd(do, q, k, v, out, lse, causal, rng, r0, c0):
    return torch.ops.orchard.flash_attn_backward(do, q, k, v, out, lse, _SCALE, causal, False, _P, 0, 0, False,
                                                 "orchard.flash_attn", rng, *_PLAIN_FEATURES, r0, c0, 0, 0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_sm90_dropout_forward_applies_the_mask(case):
    dtype, d, causal, b, sq, sk, hq, hkv, r0, c0, _ = case
    q = randn(b, sq, hq, d, dtype=dtype, device="cuda")
    k = randn(b, sk, hkv, d, dtype=dtype, device="cuda")
    v = randn(b, sk, hkv, d, dtype=dtype, device="cuda")
    do = randn(b, sq, hq, d, dtype=dtype, device="cuda")
    rng = torch.tensor([0x5EED_2026_1206, 17], dtype=torch.int64, device="cuda")
    out, lse, _ = _fwd(q, k, v, causal, rng, r0, c0, False)  # (the switch's path)
    _, _, mask = _fwd(q, k, v, causal, rng, r0, c0, True)  # a mask output: the sm80 path
    assert 0.2 < 1 - mask.float().mean().item() < 0.4  # the mask drops about p
    ref, ref_lse = attention_ref(q, k, v, _SCALE, causal, False, keep_mask=mask, dropout_p=_P)
    naive, _ = attention_ref(q, k, v, _SCALE, causal, False, keep_mask=mask, dropout_p=_P, upcast=False)
    assert torch.isfinite(out).all()
    check_close_rule(out, ref, naive, 1e-3, "out")
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
    # The backward regenerates the mask from the same key: with this forward's out and LSE it
    # must give the reference gradients.
    grads = _bwd(do, q, k, v, out, lse, causal, rng, r0, c0)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref64, _ = attention_ref(q64, k64, v64, _SCALE, causal, False, keep_mask=mask, dropout_p=_P)
    want = torch.autograd.grad(ref64, (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive_out, _ = attention_ref(qn, kn, vn, _SCALE, causal, False, keep_mask=mask, dropout_p=_P, upcast=False)
    naive_grads = torch.autograd.grad(naive_out, (qn, kn, vn), do)
    for name, g, w, n in zip(("dq", "dk", "dv"), grads, want, naive_grads):
        check_close_rule(g, w, n, 1e-3, name)


def _bucket(d):
    return 64 if d <= 64 else 96 if d <= 96 else 128 if d <= 128 else 192 if d <= 192 else 256


# sm90_dropout_measured_faster (sm90_call_support.h): the buckets taken with the switch unset.
_DEFAULT_FWD = _DEFAULT_BWD = (64, 96, 128, 192, 256)


def _sm90_expected():
    return "90" in str(orchard.build_info().get("cuda_archs")) and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_sm90_dropout_forward_runs_the_kernel_it_should(case, tmp_path, monkeypatch):
    """The debug log names the sm90 forward / backward for the cases they take: with the switch on,
    every case the table marks; unset, those in the buckets measured faster; "0", none."""
    dtype, d, causal, b, sq, sk, hq, hkv, r0, c0, (fwd_sm90, bwd_sm90) = case
    switch = os.environ.get("ORCHARD_SM90_DROPOUT")
    if switch is None:
        fwd_sm90 &= _bucket(d) in _DEFAULT_FWD
        bwd_sm90 &= _bucket(d) in _DEFAULT_BWD
    on = switch != "0" and _sm90_expected()
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    q = randn(b, sq, hq, d, dtype=dtype, device="cuda")
    k = randn(b, sk, hkv, d, dtype=dtype, device="cuda")
    rng = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
    out, lse, _ = _fwd(q, k, k, causal, rng, r0, c0, False)
    _bwd(out, q, k, k, out, lse, causal, rng, r0, c0)
    torch.cuda.synchronize()
    lines = (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["FWD", "BWD"], lines
    for line, sm90 in zip(lines, (fwd_sm90, bwd_sm90)):
        assert ".dropout" in line, line
        assert (".sm90." in line) == (on and sm90), line


def test_sm90_dropout_switch_on_in_a_child():
    """The cases above with ORCHARD_SM90_DROPOUT=1 (read once per process: a child pytest)."""
    if not _sm90_expected():
        pytest.skip("no sm90 kernels on this build / GPU")
    if os.environ.get("ORCHARD_SM90_DROPOUT") == "1":
        pytest.skip("the switch is on in this process already")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", __file__,
                        "-k", "not child"], env=dict(os.environ, ORCHARD_SM90_DROPOUT="1"), capture_output=True,
                       text=True, cwd=os.path.dirname(__file__), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{2 * len(CASES)} passed" in r.stdout, r.stdout[-2000:]
