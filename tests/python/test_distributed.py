"""orchard.distributed on the CPU over gloo: every mode (ring, Ulysses,
all-gather, hybrid), causal and not, GQA, zigzag and contiguous layouts, odd
local lengths, forward and backward against single-process Orchard on the
gathered sequence (fp32, 1e-5), the number of exchanges, and errors raised on
every rank for bad input.

One torch.multiprocessing spawn per world size (2, 3 and 4 ranks) runs all of its
cases in one process group (tests/python/distributed_worker.py); each case is
reported here as its own test."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

import distributed_worker
import orchard
import orchard.distributed as od
from orchard.distributed._merge import merge_attention

WORLD_SIZES = (2, 3, 4)
_RESULTS: dict = {}


def _run_suite(w, backend="gloo"):
    if (w, backend) in _RESULTS:
        return _RESULTS[w, backend]
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.spawn(distributed_worker.worker, args=(w, init_file, tmp, backend), nprocs=w,
                     join=True)
            err = None
        except Exception as e:  # noqa: BLE001 - a crashed rank: report with the cases
            err = f"spawn failed: {e}"
        per_rank = []
        for r in range(w):
            path = os.path.join(tmp, f"rank{r}.json")
            per_rank.append(json.load(open(path)) if os.path.exists(path) else {})
    _RESULTS[w, backend] = (per_rank, err)
    return _RESULTS[w, backend]


def _case_names(w):
    return list(distributed_worker.suite(w))


@pytest.mark.parametrize("w,case", [(w, c) for w in WORLD_SIZES for c in _case_names(w)],
                         ids=lambda x: str(x))
def test_distributed_case(w, case):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    per_rank, err = _run_suite(w)
    problems = []
    for r, res in enumerate(per_rank):
        got = res.get(case)
        if got != "ok":
            problems.append(f"rank {r}: {got if got is not None else 'did not run'}")
    assert not problems, (err or "") + "\n" + "\n".join(problems)


@pytest.mark.cuda
def test_distributed_nccl_two_gpus():
    """The mode cases on 2 GPUs over NCCL (fp32 within 5e-5, bf16/fp16 as on the CPU),
    which exercises the CUDA communication stream of the ring."""
    if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
        pytest.skip("needs 2 CUDA devices and NCCL")
    per_rank, err = _run_suite(2, "nccl")
    problems = [f"rank {r} {name}: {res}" for r, results in enumerate(per_rank)
                for name, res in results.items() if name != "_seconds" and res != "ok"]
    expected = set(distributed_worker.cuda_suite(2))
    missing = [f"rank {r}: {sorted(expected - set(res))}" for r, res in enumerate(per_rank)
               if expected - set(res)]
    assert not problems and not missing, (err or "") + "\n" + "\n".join(problems + missing)


def test_uninitialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("another test initialized a process group in this process")
    q = torch.randn(1, 4, 2, 8)
    for fn in (od.ring_flash_attn_func, od.ulysses_flash_attn_func, od.allgather_flash_attn_func):
        with pytest.raises(RuntimeError, match=r"^orchard\.distributed\.\w+: .*not initialized"):
            fn(q, q, q)
    with pytest.raises(RuntimeError, match="not initialized"):
        od.hybrid_flash_attn_func(q, q, q, None, None)


def test_shard_layout_matches_torch_head_tail():
    """Zigzag shards are torch context parallelism's head-tail shards."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _HeadTailLoadBalancer)
    except ImportError:
        pytest.skip("this torch has no _HeadTailLoadBalancer")
    for w, s in ((2, 8), (4, 24), (3, 18)):
        idx = _HeadTailLoadBalancer(s, w, "cpu")._generate_indices()[0]
        for r in range(w):
            mine = od.shard_positions(s, w, r, "zigzag")
            assert torch.equal(mine, idx[r * (s // w):(r + 1) * (s // w)]), (w, s, r)
            x = torch.arange(s).view(1, s)
            assert torch.equal(od.shard_sequence(x, world_size=w, rank=r)[0], mine)


def test_shard_errors():
    x = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match=r"^orchard\.distributed\.shard_sequence: .*divisible"):
        od.shard_sequence(x, world_size=3, rank=0, layout="zigzag")
    with pytest.raises(ValueError, match="layout"):
        od.shard_sequence(x, world_size=2, rank=0, layout="ring")


def test_merge_handles_minus_inf():
    """Blocks in which a row sees no key (LSE -inf, out 0) merge without NaN."""
    b, s, h, d = 1, 4, 2, 3
    o1, o2 = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    l1, l2 = torch.randn(b, h, s), torch.randn(b, h, s)
    l1[:, :, 0] = float("-inf")  # row 0: only the second block
    o1[:, 0] = 0
    l1[:, :, 1] = l2[:, :, 1] = float("-inf")  # row 1: no key at all
    o1[:, 1] = o2[:, 1] = 0
    out, lse = merge_attention([o1, o2], [l1, l2])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[:, 0], o2[:, 0])
    assert torch.all(out[:, 1] == 0) and torch.all(lse[:, :, 1] == float("-inf"))
    ref_lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - ref_lse).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(l2 - ref_lse).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out[:, 2:], (w1 * o1 + w2 * o2)[:, 2:])


def test_merge_equals_full_attention():
    """Attention over two key halves merged with the LSE == attention over all keys."""
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    full = orchard.flash_attn_func(q, k, v)
    parts = [orchard.flash_attn_func(q, k[:, sl], v[:, sl], return_attn_probs=True)
             for sl in (slice(0, 3), slice(3, None))]
    out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)


def _bench_module(name):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cp_bench_timeline_summary():
    """The profile's breakdown (bench/cp_bench.py --profile) on a made-up timeline:
    kernel sums per category, NCCL overlapped with compute vs alone, idle gaps."""
    cp_bench = _bench_module("cp_bench")
    k = [(0, 10, "void orchard::cuda::flash_fwd_kernel<x>"), (5, 12, "ncclDevKernel_SendRecv"),
         (12, 20, "at::native::vectorized_elementwise_kernel"),
         (25, 30, "void orchard::cuda::flash_bwd_kernel<y>"), (26, 40, "ncclKernel_AllReduce")]
    got = cp_bench.timeline_summary(k)
    exp = dict(window=0.040, attention=0.015, other=0.008, nccl=0.021, overlap=0.009,
               nccl_alone=0.012, idle=0.005, n_attention=2, n_other=1, n_nccl=2)
    assert got == pytest.approx(exp)
    assert cp_bench.timeline_summary([])["window"] == 0.0


def test_cp_longest_arguments_and_fit():
    """bench/cp_longest.py parses its arguments (defaults, the dry run's tiny shapes) and
    its memory model is the line through two (tokens, bytes) points."""
    cp_longest = _bench_module("cp_longest")
    a = cp_longest.parse_args([])
    assert (a.cap_gib, a.heads, a.kv_heads, a.dim) == (8.0, 32, 8, 128)
    assert a.modes == ["ring-zigzag", "ulysses"]
    d = cp_longest.parse_args(["--dry-run", "--modes", "allgather"])
    assert d.dry_run and d.heads == 4 and d.granule == 16 and d.modes == ["allgather"]
    fixed, per = cp_longest.fit_line([(1000, 5000 + 1000 * 56), (2000, 5000 + 2000 * 56)])
    assert fixed == pytest.approx(5000) and per == pytest.approx(56)


@pytest.mark.parametrize("curve", [0.0, 0.002, -0.0005])
def test_cp_longest_search_finds_boundary(curve):
    """The search (calibrate, probe the prediction, widen, narrow) ends on the longest
    multiple of the granule whose peak fits, even when memory is not quite linear in S
    (a made-up trial stands in for the GPU)."""
    cp_longest = _bench_module("cp_longest")
    a = cp_longest.parse_args(["--dry-run"])
    a.granule, a.calib_tokens, a.budget_s = 16, 64, 1e9
    s = object.__new__(cp_longest.Search)
    s.args, s.cuda, s.rank, s.world, s.cap = a, False, 0, 1, 200_000
    mem = lambda n: int(3000 + 90 * n + curve * n * n)  # noqa: E731
    s.reduced_trial = lambda mode, n, capped=False: {"ok": True, "reserved": mem(n),
                                                       "allocated": mem(n), "seconds": 0.0}
    res = s.search("1 GPU", budget_s=1e9)
    best = max(n for n in range(16, 10_000, 16) if mem(n) <= s.cap)
    assert res["longest_tokens"] == best and res["first_failing_tokens"] == best + 16
    assert len(res["trials"]) <= 12, len(res["trials"])


# ---- the backward op's caller-owned fp32 dQ accumulator (BackwardArgs::dq_accum) ----

def _block_backward(dtype, causal, seed=0, device="cpu", d=24):
    from orchard import _ops
    g = torch.Generator().manual_seed(seed)
    b, s, h, hkv = 2, 64, 4, 2
    q, k, v, do = (torch.randn(b, s, n, d, generator=g).to(device=device, dtype=dtype)
                   for n in (h, hkv, hkv, h))
    scale = d ** -0.5
    out, lse, _ = _ops._FWD(q, k, v, scale, causal, True, 0.0, 0, 0, False)
    return q, k, v, out, lse, do, scale


_ACCUM_CASES = [("cpu", torch.float32, 24), ("cpu", torch.bfloat16, 24),
                pytest.param("cuda", torch.bfloat16, 64, marks=pytest.mark.cuda),
                pytest.param("cuda", torch.float16, 128, marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device,dtype,d", _ACCUM_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_dq_accum_adds_the_backward_dq(device, dtype, d, causal):
    """Two calls into one accumulator (all rows, then rows 32.. through a view) give the
    sum of the two calls' dQ; dK/dV equal the plain op's; the accumulator is not cleared
    by a call and rows outside a call's view are untouched. On CUDA this is the dK/dV
    kernels' reductions into the caller's buffer and to_dq's reading of the tile order."""
    from orchard import _ops
    from orchard.distributed import _dq_accum
    q, k, v, out, lse, do, scale = _block_backward(dtype, causal, device=device, d=d)
    dq, dk, dv = _ops._BWD(do, q, k, v, out, lse, scale, causal, True, 0.0, 0, 0, False)
    acc = _dq_accum.zeros(q)
    assert acc.shape == (2, 4, 64, d) and acc.dtype == torch.float32
    acc.fill_(float("nan"))  # poisoned: the caller zeroes it, the op must not clear it
    assert acc.isnan().all()
    acc.zero_()
    dk1, dv1 = _dq_accum.backward_into(acc, do, q, k, v, out, lse, scale, causal, 0.0, None, (),
                                       False, "test")
    exact = dict(atol=0, rtol=0) if device == "cpu" else {}  # CUDA: fp32 atomics' order
    torch.testing.assert_close(dk1, dk, **exact)
    torch.testing.assert_close(dv1, dv, **exact)
    one = _dq_accum.to_dq(acc.clone(), 64, d, scale, torch.float32)
    torch.testing.assert_close(one.to(dtype), dq, **exact)
    rows = slice(32, None)
    lse2 = lse[:, :, rows].contiguous()
    dq2, _, _ = _ops._BWD(do[:, rows], q[:, rows], k, v, out[:, rows], lse2, scale, False, True,
                          0.0, 0, 0, False)
    before = acc[:, :, :32].clone()
    _dq_accum.backward_into(_dq_accum.rows_view(acc, rows), do[:, rows], q[:, rows], k, v,
                            out[:, rows], lse2, scale, False, 0.0, None, (), False, "test")
    assert torch.equal(acc[:, :, :32], before)
    got = _dq_accum.to_dq(acc, 64, d, scale, torch.float32)
    expect = one.clone()
    expect[:, rows] += dq2.float()  # 16-bit: dq2 was rounded once more than the accumulator's sum
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expect, atol=tol, rtol=tol)


def test_dq_accum_mma_tile_order():
    """to_dq's CUDA branch reads the layout of backends/cuda/launch.h (dq_accum_tile_offset:
    tile-major, lane g * 4 + t, values (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)), built
    here element by element from that formula."""
    from orchard.distributed import _dq_accum
    b, h, s, d = 1, 2, 32, 16
    plain = torch.randn(b, h, s, d)
    tiled = torch.zeros(b, h, s * d)
    for r in range(s):
        for c in range(d):
            lane = (r % 8) * 4 + (c % 8) // 2
            value = ((r % 16) // 8) * 2 + c % 2
            slot = (((r // 16) * (d // 8) + c // 8) * 32 + lane) * 4 + value
            tiled[:, :, slot] = plain[:, :, r, c]
    dst = torch.empty(b, s, h, d)
    _dq_accum.copy_logical(dst, tiled.view(b, h, s, d), mma_tiles=True)
    assert torch.equal(dst, plain.permute(0, 2, 1, 3))


def test_dq_accum_errors():
    from orchard.distributed import _dq_accum
    q, k, v, out, lse, do, scale = _block_backward(torch.float32, True)
    args = (do, q, k, v, out, lse, scale, True, 0.0, None, (), False, "test.op")
    with pytest.raises(ValueError,
                       match=r"^test.op: dq_accum has shape .* expected \(2, 4, >= 64, 24\)"):
        _dq_accum.backward_into(torch.zeros(2, 4, 48, 24), *args)
    with pytest.raises(ValueError, match="dq_accum must be float32"):
        _dq_accum.backward_into(torch.zeros(2, 4, 64, 24, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="contiguous"):
        _dq_accum.backward_into(torch.zeros(2, 4, 64, 48)[..., :24], *args)
    with pytest.raises(NotImplementedError, match="deterministic"):
        _dq_accum.backward_into(_dq_accum.zeros(q), *args[:-2], True, "test.op")
    q64, k64, v64, out64, lse64, do64, _ = _block_backward(torch.float64, True)
    with pytest.raises(NotImplementedError, match="float64"):
        _dq_accum.backward_into(_dq_accum.zeros(q64), do64, q64, k64, v64, out64, lse64, scale,
                                True, 0.0, None, (), False, "test.op")
    assert not _dq_accum.usable(q64, False, {0})
    assert not _dq_accum.usable(q, True, {0}) and not _dq_accum.usable(q, False, {0, 8})
    assert _dq_accum.usable(q, False, {0, 32})
