"""Concurrency: several Python threads calling Orchard at once (the binding
releases the GIL), the debug log under concurrent calls, and (CUDA) several
streams at once. Results are compared bitwise with the same calls made one at
a time (deterministic=True for the backward)."""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import orchard

N_THREADS = 4
CALLS_PER_THREAD = 3

# (b, sq, sk, hq, hkv, d, dtype, causal)
SHAPES = [
    (2, 70, 70, 4, 2, 32, torch.float32, True),
    (1, 33, 90, 2, 1, 64, torch.bfloat16, False),
    (3, 17, 17, 2, 2, 16, torch.float16, True),
    (1, 64, 40, 6, 3, 24, torch.float64, True),
]


def _inputs(i, device="cpu", cuda_ok=False):
    b, sq, sk, hq, hkv, d, dtype, causal = SHAPES[i % len(SHAPES)]
    if cuda_ok:
        dtype = torch.float32 if dtype == torch.float64 else dtype
        d = (d + 7) // 8 * 8
    g = torch.Generator().manual_seed(100 + i)
    mk = (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device))
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, hq, d), causal


def _fwd_bwd(q, k, v, dout, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = orchard.flash_attn_func(q, k, v, causal=causal, deterministic=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), *grads)


def _assert_same(got, want, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), f"{what}: {name} differs from the sequential result"


def test_threads_give_the_sequential_results():
    n = N_THREADS * CALLS_PER_THREAD
    inputs = [_inputs(i) for i in range(n)]
    expected = [_fwd_bwd(*x) for x in inputs]
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        barrier.wait()  # start together
        return [(i, _fwd_bwd(*inputs[i])) for i in range(t, n, N_THREADS)]

    with ThreadPoolExecutor(N_THREADS) as pool:
        results = [r for rs in pool.map(worker, range(N_THREADS)) for r in rs]
    assert len(results) == n
    for i, got in results:
        _assert_same(got, expected[i], f"call {i}")


def test_binding_releases_the_gil():
    """While one thread is inside a long Orchard call, another Python thread
    keeps running (it could not if the GIL were held)."""
    q = torch.randn(1, 1024, 8, 64)
    orchard.flash_attn_func(q[:, :64], q[:, :64], q[:, :64])  # warm up
    t0 = time.perf_counter()
    orchard.flash_attn_func(q, q, q)
    single = time.perf_counter() - t0
    done = threading.Event()
    ticks = 0

    def call():
        orchard.flash_attn_func(q, q, q)
        done.set()

    th = threading.Thread(target=call)
    th.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.0005)
    th.join()
    # ~single/0.5ms ticks if the GIL is released; at most a handful if held.
    assert single < 0.01 or ticks >= 10, f"only {ticks} ticks during a {single * 1e3:.0f} ms call: GIL held?"


LINE = re.compile(r"^(FWD|BWD) #(\d+) .*\bbackend=\S+ .*\bvariant=\S+ .*\belapsed_ms=\S+$")


def test_debug_log_one_well_formed_line_per_kernel_call(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    n = N_THREADS * CALLS_PER_THREAD
    inputs = [_inputs(i) for i in range(n)]
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        barrier.wait()
        for i in range(t, n, N_THREADS):
            _fwd_bwd(*inputs[i])

    with ThreadPoolExecutor(N_THREADS) as pool:
        list(pool.map(worker, range(N_THREADS)))
    log = tmp_path / f"orchard_flash_attn_{os.getpid()}.log"
    assert log.exists(), f"no log at {log}; files: {sorted(p.name for p in tmp_path.iterdir())}"
    assert [p.name for p in tmp_path.iterdir()] == [log.name], "unexpected extra files in ORCHARD_LOG_DIR"
    text = log.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    bad = [ln for ln in lines if not LINE.match(ln) or " backend=" not in ln or " variant=" not in ln
           or " elapsed_ms=" not in ln]
    assert not bad, f"malformed log lines: {bad[:3]}"
    fwd = [ln for ln in lines if ln.startswith("FWD #")]
    bwd = [ln for ln in lines if ln.startswith("BWD #")]
    assert len(fwd) == n and len(bwd) == n and len(lines) == 2 * n, (len(fwd), len(bwd), len(lines))
    numbers = [int(LINE.match(ln).group(2)) for ln in lines]
    assert len(set(numbers)) == len(numbers), "call numbers repeat"
    for ln in lines:
        ms = ln.rsplit("elapsed_ms=", 1)[1]
        assert float(ms) >= 0.0, ln


def test_debug_log_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHARD_DEBUG_FLASH_ATN", raising=False)
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    _fwd_bwd(*_inputs(0))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CUDA streams


@pytest.mark.cuda
def test_cuda_streams_give_the_default_stream_results():
    n = 8
    inputs = [_inputs(i, "cuda", cuda_ok=True) for i in range(n)]
    expected = [_fwd_bwd(*x) for x in inputs]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(4)]
    results = [None] * n
    # inputs are produced ON the side stream right before the call, behind a
    # slow matmul: a kernel launched on any other stream would read garbage.
    big = torch.randn(4096, 4096, device="cuda")
    for i in range(n):
        s = streams[i % len(streams)]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            busy = big @ big
            q, k, v, dout, causal = inputs[i]
            q2 = q + 0 * busy[0, 0].to(q.dtype)  # depends on the slow matmul
            results[i] = _fwd_bwd(q2, k, v, dout, causal)
    torch.cuda.synchronize()
    for i in range(n):
        _assert_same(results[i], expected[i], f"stream call {i}")


@pytest.mark.cuda
def test_cuda_threads_each_with_own_stream():
    n = N_THREADS * CALLS_PER_THREAD
    inputs = [_inputs(i, "cuda", cuda_ok=True) for i in range(n)]
    expected = [_fwd_bwd(*x) for x in inputs]
    torch.cuda.synchronize()
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.default_stream())
        barrier.wait()
        out = []
        with torch.cuda.stream(s):
            for i in range(t, n, N_THREADS):
                out.append((i, _fwd_bwd(*inputs[i])))
        s.synchronize()
        return out

    with ThreadPoolExecutor(N_THREADS) as pool:
        results = [r for rs in pool.map(worker, range(N_THREADS)) for r in rs]
    for i, got in results:
        _assert_same(got, expected[i], f"thread call {i}")


@pytest.mark.parametrize("team", ["", "fit", "whole"])
def test_thread_counts_and_teams_give_the_same_results(monkeypatch, team):
    """More OpenMP threads than a call has tasks (the forward's whole team leaves some idle; a fitted
    team ends threads that the next call creates again), under either team override: the results
    are bitwise those of one thread (deterministic=True)."""
    saved = torch.get_num_threads()
    inputs = [_inputs(i) for i in range(len(SHAPES))]
    try:
        torch.set_num_threads(1)
        expected = [_fwd_bwd(*x) for x in inputs]
        monkeypatch.setenv("ORCHARD_CPU_TEAM", team)
        for threads in (3, 8, 2):
            torch.set_num_threads(threads)
            for i, x in enumerate(inputs):
                _assert_same(_fwd_bwd(*x), expected[i], f"shape {i}, {threads} threads, team '{team}'")
    finally:
        torch.set_num_threads(saved)
