"""Determinism: with deterministic=True the backward is bitwise reproducible
run after run; the forward always is (with a fixed dropout seed).

ORCHARD_DETERMINISM_RUNS sets the number of reruns (default: 1000 on CUDA,
20 on the CPU, which runs in CI)."""

from __future__ import annotations

import os

import pytest
import torch

import orchard


def _runs(default: int) -> int:
    return int(os.environ.get("ORCHARD_DETERMINISM_RUNS", default))


def _problem(device, dtype, b, s, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = (lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).to(dtype).to(device))
    return mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, d), mk(b, s, hq, d)


def _check_reruns(q, k, v, dout, runs, causal, dropout_p, deterministic=True, use_global_flag=False):
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def once():
        torch.manual_seed(1234)  # the dropout seed is drawn from torch's generator
        out = orchard.flash_attn_func(q, k, v, causal=causal, dropout_p=dropout_p,
                                      deterministic=deterministic)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

    if use_global_flag:
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
    try:
        first = once()
        for r in range(1, runs):
            got = once()
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, first):
                assert torch.equal(a, b), f"run {r}: {name} differs bitwise from run 0"
    finally:
        if use_global_flag:
            torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpu_reruns_bitwise_equal(dtype, dropout_p):
    q, k, v, dout = _problem("cpu", dtype, b=2, s=150, hq=4, hkv=2, d=40)
    _check_reruns(q, k, v, dout, _runs(20), causal=True, dropout_p=dropout_p)


def test_cpu_global_deterministic_flag():
    """torch.use_deterministic_algorithms(True) turns deterministic mode on."""
    q, k, v, dout = _problem("cpu", torch.float32, b=1, s=100, hq=2, hkv=1, d=32)
    _check_reruns(q, k, v, dout, 5, causal=False, dropout_p=0.0, deterministic=False, use_global_flag=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal,dropout_p", [(True, 0.0), (False, 0.1)])
def test_cuda_reruns_bitwise_equal(dtype, causal, dropout_p):
    # several KV blocks and many query blocks, GQA: the layout where
    # dq accumulation order varies if anything does
    q, k, v, dout = _problem("cuda", dtype, b=2, s=1000, hq=8, hkv=2, d=128)
    _check_reruns(q, k, v, dout, _runs(1000), causal=causal, dropout_p=dropout_p)


@pytest.mark.cuda
def test_cuda_global_deterministic_flag():
    q, k, v, dout = _problem("cuda", torch.bfloat16, b=1, s=777, hq=4, hkv=4, d=64)
    _check_reruns(q, k, v, dout, min(_runs(1000), 100), causal=True, dropout_p=0.0, deterministic=False,
                  use_global_flag=True)


@pytest.mark.cuda
def test_cuda_forward_bitwise_equal_without_deterministic_flag():
    q, k, v, _ = _problem("cuda", torch.bfloat16, b=2, s=1000, hq=8, hkv=2, d=128)
    first = orchard.flash_attn_func(q, k, v, causal=True)
    for r in range(1, _runs(1000)):
        assert torch.equal(orchard.flash_attn_func(q, k, v, causal=True), first), f"forward run {r} differs"
