"""Worker side of tests/python/test_distributed.py: the cases that run inside
each spawned rank (gloo on the CPU). One process group per spawn serves every
case of a suite; each case's outcome ("ok" or the traceback) is written to
<result_dir>/rank<r>.json for the parent to assert on."""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import orchard
import orchard.distributed as od
from orchard.distributed import _comm, _dq_accum

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
DEVICE = torch.device("cpu")  # cuda:<rank> in the NCCL suite


def _fp32_tol():
    # fp32 on CUDA runs a SIMT kernel whose sums are ordered by tile: a block of the
    # ring and the whole-sequence reference round differently by a few ulps more.
    return FP32_TOL if DEVICE.type == "cpu" else dict(atol=5e-5, rtol=5e-5)

MODES = {
    "ring": od.ring_flash_attn_func,
    "ulysses": od.ulysses_flash_attn_func,
    "allgather": od.allgather_flash_attn_func,
}


def _full_inputs(b, s, h, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def _reference(q, k, v, do, causal, scale=None, dropout_p=0.0, rng_seed=None):
    """Single-process Orchard on the gathered sequence: out, dq, dk, dv. With
    dropout, torch's generator is seeded with rng_seed first (the distributed call
    then reseeds it the same way on every rank)."""
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out = orchard.flash_attn_func(qr, kr, vr, causal=causal, softmax_scale=scale,
                                  dropout_p=dropout_p)
    out.backward(do)
    return out.detach(), qr.grad, kr.grad, vr.grad


def _expected_counts(mode, w, phase, u=1):
    """Exchanges made after the forward ("fwd") or forward + backward ("bwd")."""
    if w == 1:
        return {}
    if mode == "ring":
        fwd = {"kv": w - 1}
        # W = 2: the backward reuses the forward's last K/V (ring.py, _keep_kv)
        bwd_kv = 0 if w == 2 and os.environ.get("ORCHARD_CP_KEEP_KV", "1") != "0" else w - 1
        return fwd if phase == "fwd" else {"kv": w - 1 + bwd_kv, "dkv": w - 1}
    if mode == "ulysses":
        return {"all_to_all": 2 if phase == "fwd" else 4}
    if mode == "allgather":
        return {"all_gather": 1} if phase == "fwd" else {"all_gather": 1, "reduce_scatter": 1}
    raise AssertionError(mode)


def _expected_ring_kernels(rank, w, causal, layout, dropout_p):
    """Attention kernel calls of the ring on this rank, per phase (forward, and
    again backward): one per step that has work, without dropout; with dropout one
    per visible (query chunk, key chunk) pair, since a call must cover rows and
    keys contiguous in global position."""
    if layout == "contiguous":
        return rank + 1 if causal else w
    if dropout_p == 0.0:
        return w  # zigzag: every step one call, causal or not
    # zigzag with dropout: chunks r and 2W-1-r of this rank against every chunk
    return 2 * w + 1 if causal else 4 * w


def run_mode_case(rank, w, mode, b, s, h, hkv, d, causal, layout, dtype=torch.float32,
                  group=None, seed=0, tol=None, strided=False, check_counts=True, dropout_p=0.0,
                  expect_accum=None):
    """expect_accum: True / False asserts that the ring's backward did / did not add dQ
    into its fp32 accumulator (orchard/distributed/_dq_accum.py); None: either."""
    tol = tol or _fp32_tol()
    q, k, v, do = _full_inputs(b, s, h, hkv, d, dtype, seed)
    rng_seed = 1000 + seed if dropout_p > 0 else None
    ref_out, ref_dq, ref_dk, ref_dv = _reference(*(t.float() if dtype != torch.float32 else t
                                                    for t in (q, k, v, do)), causal,
                                                 dropout_p=dropout_p, rng_seed=rng_seed)
    shard = lambda t: od.shard_sequence(t, group, layout=layout)  # noqa: E731
    ql, kl, vl, dol = (shard(t) for t in (q, k, v, do))
    if strided:  # BHSD storage handed over as BSHD views
        ql = ql.transpose(1, 2).contiguous().transpose(1, 2)
        kl = kl.transpose(1, 2).contiguous().transpose(1, 2)
    ql, kl, vl = (t.detach().requires_grad_(True) for t in (ql, kl, vl))
    od.reset_comm_stats()
    _dq_accum.stats["calls"] = 0
    if rng_seed is not None:
        torch.manual_seed(rng_seed)  # the reference's generator state, on every rank
    out = MODES[mode](ql, kl, vl, group=group, causal=causal, layout=layout, dropout_p=dropout_p)
    fwd_counts, fwd_kernels = dict(_comm.comm_stats), dict(_comm.kernel_stats)
    out.backward(dol)
    all_counts, all_kernels = dict(_comm.comm_stats), dict(_comm.kernel_stats)
    if expect_accum is not None:
        used = _dq_accum.stats["calls"] > 0
        assert used == expect_accum, f"dQ accumulator used: {used}, expected {expect_accum}"
    assert out.dtype == dtype and out.shape == ql.shape, (out.dtype, out.shape)
    for name, got, ref in (("out", out, ref_out), ("dq", ql.grad, ref_dq), ("dk", kl.grad, ref_dk),
                           ("dv", vl.grad, ref_dv)):
        torch.testing.assert_close(got.float(), shard(ref).float(), **tol,
                                   msg=lambda m, name=name: f"{mode} {name}: {m}")
    if check_counts:
        gw = _comm.group_info(group, "test").size  # the group's size, not the world's
        exp_f = _expected_counts(mode, gw, "fwd")
        exp_b = _expected_counts(mode, gw, "bwd")
        exp_f["validate"] = exp_b["validate"] = 1
        assert fwd_counts == exp_f, f"forward exchanges {fwd_counts}, expected {exp_f}"
        assert all_counts == exp_b, f"fwd+bwd exchanges {all_counts}, expected {exp_b}"
        if mode == "ring":
            n = _expected_ring_kernels(_comm.group_info(group, "test").rank, gw, causal, layout,
                                       dropout_p)
            exp_k = {"fwd": n, "bwd": n}
            assert fwd_kernels == {"fwd": n}, f"forward kernel calls {fwd_kernels}, expected {n}"
            assert all_kernels == exp_k, f"fwd+bwd kernel calls {all_kernels}, expected {exp_k}"


def _mode_cases(w):
    cases = {}
    h, hkv, d, b = 2 * w, w, 16, 2  # GQA 2:1, heads divisible by w for Ulysses
    for mode in MODES:
        for layout in ("zigzag", "contiguous"):
            for causal in (False, True):
                # zigzag: odd chunks (3 rows); contiguous: odd local length (5)
                s = 2 * w * 3 if layout == "zigzag" else w * 5
                kv = hkv if causal else h  # GQA with causal, MHA without
                name = f"{mode}-{layout}-{'causal' if causal else 'full'}"
                cases[name] = (lambda rank, mode=mode, s=s, kv=kv, causal=causal, layout=layout:
                               run_mode_case(rank, w, mode, b, s, h, kv, d, causal, layout,
                                             seed=len(cases)))
        # GQA without causal and a longer sequence (several kernel tiles per block)
        cases[f"{mode}-zigzag-full-gqa-long"] = (
            lambda rank, mode=mode: run_mode_case(rank, w, mode, 1, 2 * w * 40, h, hkv, 32, False,
                                                  "zigzag", seed=101))
        cases[f"{mode}-zigzag-causal-long"] = (
            lambda rank, mode=mode: run_mode_case(rank, w, mode, 1, 2 * w * 40, h, hkv, 32, True,
                                                  "zigzag", seed=102))
        # Dropout: exactly the single-device mask (same generator state), every layout,
        # causal and not, odd chunk lengths (a column offset that is not a multiple of 4).
        for layout in ("zigzag", "contiguous"):
            for causal in (False, True):
                s = 2 * w * 3 if layout == "zigzag" else w * 5
                cases[f"{mode}-{layout}-{'causal' if causal else 'full'}-dropout"] = (
                    lambda rank, mode=mode, s=s, causal=causal, layout=layout:
                    run_mode_case(rank, w, mode, 2, s, h, hkv if causal else h, d, causal, layout,
                                  seed=200 + len(cases), dropout_p=0.3))
        cases[f"{mode}-zigzag-causal-long-dropout"] = (
            lambda rank, mode=mode: run_mode_case(rank, w, mode, 1, 2 * w * 37, h, hkv, 32, True,
                                                  "zigzag", seed=103, dropout_p=0.2))
    # The ring's fp32 dQ accumulator (every block starts on a 16-row tile: chunks of 32
    # rows) in each layout, causal and not, with dropout. fp32 on CUDA has no
    # accumulator (its kernels write dQ per row): there these cases check the fallback.
    accum = DEVICE.type == "cpu"
    for layout in ("zigzag", "contiguous"):
        for causal in (False, True):
            for p in (0.0, 0.2):
                s = 2 * w * 32 if layout == "zigzag" else w * 64
                name = (f"ring-{layout}-{'causal' if causal else 'full'}-accum"
                        f"{'-dropout' if p else ''}")
                cases[name] = (lambda rank, s=s, causal=causal, layout=layout, p=p:
                               run_mode_case(rank, w, "ring", 1, s, h, hkv, 32, causal, layout,
                                             seed=300 + len(cases), dropout_p=p,
                                             expect_accum=accum))
    # chunks of 40 rows: a rank whose queries meet a later rank's keys (only its second
    # chunk does, from row 40) takes the per-call path; the last rank never does, so it
    # keeps the accumulator (the choice is each rank's own: dQ stays local).
    cases["ring-zigzag-causal-long-mixed-accum"] = (
        lambda rank: run_mode_case(rank, w, "ring", 1, 2 * w * 40, h, hkv, 32, True, "zigzag",
                                   seed=102, expect_accum=accum and rank == w - 1))
    return cases


# ---- cases only run at one world size --------------------------------------

def case_bf16_ring(rank, w):
    run_mode_case(rank, w, "ring", 1, 2 * w * 16, 4, 2, 32, True, "zigzag", dtype=torch.bfloat16,
                  seed=7, tol=dict(atol=3e-2, rtol=3e-2))


def case_bf16_ring_accum(rank, w):
    """16-bit ring through the fp32 dQ accumulator (CPU and CUDA), causal and not, with
    dropout; one case with it switched off (ORCHARD_CP_DQ_ACCUM=0) for comparison."""
    tol = dict(atol=3e-2, rtol=3e-2)
    for causal, p in ((True, 0.0), (False, 0.0), (True, 0.2)):
        run_mode_case(rank, w, "ring", 1, 2 * w * 64, 4, 2, 64, causal, "zigzag",
                      dtype=torch.bfloat16, seed=23, tol=tol, dropout_p=p, expect_accum=True)
    run_mode_case(rank, w, "ring", 1, 2 * w * 64, 4, 2, 64, True, "zigzag", dtype=torch.float16,
                  seed=24, tol=dict(atol=1e-2, rtol=1e-2), expect_accum=True)
    os.environ["ORCHARD_CP_DQ_ACCUM"] = "0"
    try:
        run_mode_case(rank, w, "ring", 1, 2 * w * 64, 4, 2, 64, True, "zigzag",
                      dtype=torch.bfloat16, seed=23, tol=tol, expect_accum=False)
    finally:
        del os.environ["ORCHARD_CP_DQ_ACCUM"]


def case_ring_kept_kv(rank, w):
    """W = 2: the backward runs on the forward's last K/V (no K/V exchange, own block
    last); with ORCHARD_CP_KEEP_KV=0 the plain order (counts checked by run_mode_case).
    A second backward through a retained graph exchanges K/V again (the kept buffers
    were taken, and received dK/dV, in the first) and gives the same gradients."""
    for causal, layout in ((True, "zigzag"), (True, "contiguous"), (False, "zigzag")):
        run_mode_case(rank, w, "ring", 1, 2 * w * 32, 4, 2, 32, causal, layout, seed=25)
    os.environ["ORCHARD_CP_KEEP_KV"] = "0"
    try:
        run_mode_case(rank, w, "ring", 1, 2 * w * 32, 4, 2, 32, True, "zigzag", seed=25)
    finally:
        del os.environ["ORCHARD_CP_KEEP_KV"]
    q, k, v, do = _full_inputs(1, 2 * w * 32, 4, 2, 32, torch.float32, 26)
    ql, kl, vl = (od.shard_sequence(t).requires_grad_(True) for t in (q, k, v))
    dol = od.shard_sequence(do)
    out = od.ring_flash_attn_func(ql, kl, vl, causal=True)
    od.reset_comm_stats()
    first = torch.autograd.grad(out, (ql, kl, vl), dol, retain_graph=True)
    assert _comm.comm_stats == {"dkv": 1}, _comm.comm_stats
    od.reset_comm_stats()
    second = torch.autograd.grad(out, (ql, kl, vl), dol)
    assert _comm.comm_stats == {"kv": 1, "dkv": 1}, _comm.comm_stats
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, **_fp32_tol())


def case_bf16_dropout(rank, w):
    """bf16 kernels with dropout: odd chunks (17 rows), so odd row and column offsets (on
    CUDA the kernels' per-element draws, philox.h); against the fp32 single-device run
    with the same mask."""
    for mode in ("ring", "allgather"):
        run_mode_case(rank, w, mode, 1, 2 * w * 17, 4, 2, 32, True, "zigzag",
                      dtype=torch.bfloat16, seed=21, tol=dict(atol=3e-2, rtol=3e-2), dropout_p=0.2)
    run_mode_case(rank, w, "ulysses", 1, 2 * w * 17, 2 * w, w, 32, False, "zigzag",
                  dtype=torch.bfloat16, seed=22, tol=dict(atol=3e-2, rtol=3e-2), dropout_p=0.2)


def case_fp16_ulysses(rank, w):
    run_mode_case(rank, w, "ulysses", 1, 2 * w * 16, 4, 2, 32, True, "zigzag",
                  dtype=torch.float16, seed=8, tol=dict(atol=1e-2, rtol=1e-2))


def case_bf16_allgather(rank, w):
    run_mode_case(rank, w, "allgather", 1, 2 * w * 16, 4, 2, 32, True, "contiguous",
                  dtype=torch.bfloat16, seed=9, tol=dict(atol=3e-2, rtol=3e-2))


def case_strided_inputs(rank, w):
    run_mode_case(rank, w, "ring", 2, 2 * w * 4, 4, 2, 16, True, "zigzag", strided=True, seed=10)
    run_mode_case(rank, w, "allgather", 2, 2 * w * 4, 4, 2, 16, True, "zigzag", strided=True,
                  seed=11)


def case_device_mesh(rank, w):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (w,), mesh_dim_names=("cp",))
    for mode in MODES:
        run_mode_case(rank, w, mode, 1, 2 * w * 3, 2 * w, w, 16, True, "zigzag", group=mesh["cp"],
                      seed=12)


def case_return_lse(rank, w):
    q, k, v, _ = _full_inputs(1, 2 * w * 5, 4, 2, 16, torch.float32, 13)
    _, ref_lse, _ = orchard.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out, lse = od.ring_flash_attn_func(*(od.shard_sequence(t) for t in (q, k, v)), causal=True,
                                       return_lse=True)
    torch.testing.assert_close(lse, od.shard_sequence(ref_lse, dim=2), **FP32_TOL)


def case_scale_and_deterministic(rank, w):
    q, k, v, do = _full_inputs(1, 2 * w * 4, 2 * w, w, 16, torch.float32, 14)
    ref = _reference(q, k, v, do, True, scale=0.3)
    for fn in MODES.values():
        ql, kl, vl = (od.shard_sequence(t).requires_grad_(True) for t in (q, k, v))
        out = fn(ql, kl, vl, causal=True, softmax_scale=0.3, deterministic=True)
        out.backward(od.shard_sequence(do))
        for got, r in zip((out, ql.grad, kl.grad, vl.grad), ref):
            torch.testing.assert_close(got, od.shard_sequence(r), **FP32_TOL)


def case_unshard_roundtrip(rank, w):
    x = torch.arange(2 * w * 3 * 2, dtype=torch.float32).view(2, 2 * w * 3)
    for layout in ("zigzag", "contiguous"):
        loc = od.shard_sequence(x, layout=layout)
        torch.testing.assert_close(loc[0], od.shard_positions(x.shape[1], w, rank, layout).float())
        torch.testing.assert_close(od.unshard_sequence(loc, layout=layout), x)


def case_torch_compile(rank, w):
    """Inside a compiled function the ops run eagerly (a graph break), with autograd."""
    q, k, v, do = _full_inputs(1, 2 * w * 4, 4, 2, 16, torch.float32, 17)
    ref = _reference(q, k, v, do, True)

    def f(q, k, v):
        return od.ring_flash_attn_func(q * 1.0, k, v, causal=True) * 2.0
    cf = torch.compile(f, backend="eager")
    ql, kl, vl = (od.shard_sequence(t).requires_grad_(True) for t in (q, k, v))
    out = cf(ql, kl, vl)
    out.backward(od.shard_sequence(do))
    for got, r, factor in zip((out, ql.grad, kl.grad, vl.grad), ref, (2, 2, 2, 2)):
        torch.testing.assert_close(got, factor * od.shard_sequence(r), **FP32_TOL)


def _expect_error(fn, exc, *needles):
    try:
        fn()
    except exc as e:
        msg = str(e)
        assert msg.startswith("orchard.distributed."), msg
        for n in needles:
            assert n in msg, f"{n!r} not in {msg!r}"
        return
    raise AssertionError(f"expected {exc.__name__}")


def case_errors(rank, w):
    def t(s, h=2 * w, hkv=w, d=16, dtype=torch.float32):
        return (torch.randn(1, s, h, d, dtype=dtype), torch.randn(1, s, hkv, d, dtype=dtype),
                torch.randn(1, s, hkv, d, dtype=dtype))
    ring = od.ring_flash_attn_func
    # local lengths differ across ranks
    _expect_error(lambda: ring(*t(6 if rank == 0 else 8)), ValueError, "disagree", "q shape")
    # dtypes differ across ranks
    _expect_error(lambda: ring(*t(6, dtype=torch.float32 if rank == 0 else torch.float64)),
                  ValueError, "disagree", "dtype")
    # odd local length with zigzag: every rank
    _expect_error(lambda: ring(*t(5)), ValueError, "even")
    # one rank's input is malformed: it raises its own error, the others a pointer to it
    bad = 1 % w

    def one_bad():
        q, k, v = t(6)
        if rank == bad:
            q = q[0]
        ring(q, k, v)
    _expect_error(one_bad, ValueError, "4-D" if rank == bad else f"rank(s) [{bad}]")
    # Ulysses: heads not divisible by the group size
    _expect_error(lambda: od.ulysses_flash_attn_func(*t(6, h=w + 1, hkv=1)), ValueError,
                  "divisible by the group size")
    # dropout: the ranks' generators disagree, so their keys would draw different masks
    for fn in MODES.values():
        torch.manual_seed(77 + rank)
        _expect_error(lambda fn=fn: fn(*t(6), dropout_p=0.1), ValueError, "dropout keys",
                      "manual_seed")
    _expect_error(lambda: ring(*t(6), dropout_p=1.0), ValueError, "dropout_p")
    # GQA heads that do not divide
    _expect_error(lambda: od.allgather_flash_attn_func(*t(6, h=3, hkv=2)), ValueError, "multiple")
    # the group still works afterwards
    run_mode_case(rank, w, "ring", 1, 2 * w * 2, 4, 2, 16, True, "zigzag", seed=15)


def case_hybrid(rank, w):
    """Hybrid over a (ring, ulysses) grid; on 2 ranks the two degenerate splits."""
    splits = [(w // 2, 2)] if w >= 4 else [(1, w), (w, 1)]
    for ring_n, uly_n in splits:
        # new_group must be called by every rank for every group, in the same order
        uly_groups = [dist.new_group(list(range(i * uly_n, (i + 1) * uly_n)))
                      for i in range(ring_n)]
        ring_groups = [dist.new_group(list(range(j, w, uly_n))) for j in range(uly_n)]
        ug = uly_groups[rank // uly_n]
        rg = ring_groups[rank % uly_n]
        for causal, layout, p in ((True, "zigzag", 0.0), (False, "zigzag", 0.0),
                                  (True, "contiguous", 0.0), (True, "zigzag", 0.25),
                                  (False, "zigzag", 0.25), (True, "contiguous", 0.25)):
            s = 2 * w * 3
            q, k, v, do = _full_inputs(2, s, 2 * uly_n, uly_n, 16, torch.float32, 16)
            ref = _reference(q, k, v, do, causal, dropout_p=p, rng_seed=31 if p else None)
            shard = lambda x: od.hybrid_shard_sequence(x, ug, rg, layout=layout)  # noqa: E731
            ql, kl, vl = (shard(x).requires_grad_(True) for x in (q, k, v))
            od.reset_comm_stats()
            if p:
                torch.manual_seed(31)
            out = od.hybrid_flash_attn_func(ql, kl, vl, ug, rg, causal=causal, layout=layout,
                                            dropout_p=p)
            out.backward(shard(do))
            for name, got, r in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                                    ref):
                torch.testing.assert_close(got, shard(r), **FP32_TOL,
                                           msg=lambda m, name=name: f"hybrid {name}: {m}")
            torch.testing.assert_close(od.hybrid_unshard_sequence(out.detach(), ug, rg, layout),
                                       ref[0], **FP32_TOL)
            counts = dict(_comm.comm_stats)
            exp = {"validate": int(uly_n > 1) + int(ring_n > 1)}
            if uly_n > 1:
                exp["all_to_all"] = 4
            if ring_n > 1:  # a ring of 2 reuses the forward's K/V in the backward
                exp.update(kv=1 if ring_n == 2 else 2 * (ring_n - 1), dkv=ring_n - 1)
            exp["all_gather"] = int(uly_n > 1) + int(ring_n > 1)  # the unshard check
            counts = {k_: n for k_, n in counts.items() if n}
            exp = {k_: n for k_, n in exp.items() if n}
            assert counts == exp, f"hybrid exchanges {counts}, expected {exp}"
        if ring_n > 1 and uly_n > 1:
            # one rank's bad shard: every rank of the grid raises (two rounds of checks)
            q, k, v, _ = _full_inputs(1, 2 * w * 2, 2 * uly_n, uly_n, 16, torch.float32, 18)
            ql, kl, vl = (od.hybrid_shard_sequence(x, ug, rg) for x in (q, k, v))
            if rank == w - 1:
                ql = ql[0]
            _expect_error(lambda: od.hybrid_flash_attn_func(ql, kl, vl, ug, rg, causal=True),
                          ValueError, "4-D" if rank == w - 1 else "rejected their input")
            # heads not divisible by the ulysses group on every rank
            q3 = torch.randn(1, 4, uly_n + 1, 16)
            k3 = torch.randn(1, 4, 1, 16)
            _expect_error(lambda: od.hybrid_flash_attn_func(q3, k3, k3, ug, rg), ValueError,
                          "divisible by the group size")
            # a 2-D DeviceMesh where a 1-D one is needed
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (ring_n, uly_n), mesh_dim_names=("ring", "ulysses"))
            _expect_error(lambda: od.ring_flash_attn_func(ql, kl, vl, group=mesh), ValueError,
                          "1-D")
            run_mode_case(rank, w, "ring", 1, 2 * ring_n * 3, 4, 2, 16, True, "zigzag",
                          group=mesh["ring"], seed=19)


def suite(w):
    """name -> callable(rank)."""
    cases = dict(_mode_cases(w))
    extra = {
        "hybrid": case_hybrid,
        "errors": case_errors,
        "unshard-roundtrip": case_unshard_roundtrip,
        "return-lse": case_return_lse,
        "scale-deterministic": case_scale_and_deterministic,
    }
    if w == 2:
        extra.update({
            "bf16-ring": case_bf16_ring,
            "bf16-ring-accum": case_bf16_ring_accum,
            "ring-kept-kv": case_ring_kept_kv,
            "fp16-ulysses": case_fp16_ulysses,
            "bf16-allgather": case_bf16_allgather,
            "bf16-dropout": case_bf16_dropout,
            "strided-inputs": case_strided_inputs,
            "device-mesh": case_device_mesh,
            "torch-compile": case_torch_compile,
        })
    for name, fn in extra.items():
        cases[name] = lambda rank, fn=fn: fn(rank, w)
    return cases


def cuda_suite(w):
    """The NCCL suite (one GPU per rank): every mode/layout/causal case and bf16."""
    cases = dict(_mode_cases(w))
    cases["bf16-ring"] = lambda rank: case_bf16_ring(rank, w)
    cases["bf16-ring-accum"] = lambda rank: case_bf16_ring_accum(rank, w)
    cases["ring-kept-kv"] = lambda rank: case_ring_kept_kv(rank, w)
    cases["bf16-allgather"] = lambda rank: case_bf16_allgather(rank, w)
    cases["fp16-ulysses"] = lambda rank: case_fp16_ulysses(rank, w)
    cases["bf16-dropout"] = lambda rank: case_bf16_dropout(rank, w)
    return cases


def worker(rank, w, init_file, result_dir, backend="gloo"):
    global DEVICE
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kw = {}
    if backend == "nccl":
        for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                         ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ[var] = val  # no multicast objects on shared machines
        torch.cuda.set_device(rank)
        DEVICE = torch.device("cuda", rank)
        kw["device_id"] = DEVICE
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=w,
                            timeout=timedelta(seconds=120), **kw)
    results = {}
    times = results["_seconds"] = {}
    try:
        for name, fn in (cuda_suite(w) if backend == "nccl" else suite(w)).items():
            t0 = time.perf_counter()
            try:
                fn(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the parent
                results[name] = traceback.format_exc()
            times[name] = round(time.perf_counter() - t0, 3)
            with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
