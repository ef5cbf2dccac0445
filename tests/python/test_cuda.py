"""CUDA-only behaviour: kernels run on the caller's current stream, are
CUDA-graph capturable, and a realistic bf16/fp16 training shape meets the
tolerance rule. Skipped without a CUDA device / CUDA build."""

import re

import pytest
import torch

import orchard
from helpers import attention_ref, check_close_rule, eager_and_graph_replay, randn

pytestmark = pytest.mark.cuda


def _qkv(dtype=torch.bfloat16, b=2, s=256, h=8, hkv=8, d=64, requires_grad=True):
    mk = lambda hh: randn(b, s, hh, d, dtype=dtype, device="cuda", requires_grad=requires_grad)
    return mk(h), mk(hkv), mk(hkv)


def test_first_call_on_a_fresh_thread_runs_its_kernel(capfd):
    """A thread whose first CUDA work is an Orchard call (torch's autograd engine runs every
    backward on such a worker thread) has no current driver context yet: the sm90 kernels'
    TMA descriptors must still encode there (they once failed with CUDA_ERROR_INVALID_CONTEXT
    and the call fell back to the sm80 kernels, printing 'tma_host: ... failed')."""
    import threading
    q, k, v = _qkv(requires_grad=False)
    ref = orchard.flash_attn_func(q, k, v, causal=True)
    torch.cuda.synchronize()
    capfd.readouterr()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", orchard.flash_attn_func(q, k, v, causal=True)))
    worker.start()
    worker.join()
    torch.cuda.synchronize()
    assert "tma_host" not in capfd.readouterr().err
    torch.testing.assert_close(result["out"], ref, atol=0, rtol=0)


def test_runs_on_current_stream():
    q, k, v = _qkv(requires_grad=False)
    ref = orchard.flash_attn_func(q, k, v, causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy: wrong-stream launches would race
        out = orchard.flash_attn_func(q, k, v, causal=True)
        out2 = out * 1  # consumer on the same stream
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out2, ref, atol=0, rtol=0)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic-dq"])
def test_cuda_graph_capture_fwd_bwd(deterministic):
    # A replay of the captured fwd+bwd gives what eager calls give: bit for bit with
    # deterministic=True (ordered dQ adds); with the default fp32 dQ atomics (sm80 and the
    # sm90 backward's bulk adds) the add order varies between runs, so a rounding step of
    # the output dtype (bf16: 2^-8 relative) may differ.
    q, k, v = _qkv()
    do = torch.randn_like(q)

    def step():
        out = orchard.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        return torch.autograd.grad(out, (q, k, v), do)

    eager, static = eager_and_graph_replay(step)
    for a, b in zip(static, eager):
        if deterministic:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=2.0**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replays_draw_fresh_dropout_masks(dtype):
    # Dropout under CUDA-graph capture: each replay draws a new key on the device
    # (as torch's own dropout does), and within a replay the backward uses the
    # forward's mask. Checked against a float64 reference that applies the mask
    # the replay returned.
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in _qkv(b=1, s=64, h=2, hkv=2, d=32))
    do = torch.randn_like(q)

    def step():
        out, _, mask = orchard.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
        return (out, mask, *torch.autograd.grad(out, (q, k, v), do))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    masks = []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        out, mask, *grads = (t.clone() for t in static)
        masks.append(mask)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attention_ref(q64, k64, v64, None, False, keep_mask=mask.to(torch.uint8), dropout_p=0.3)
        rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(out.double(), ref, **tol)
        for a, r in zip(grads, rgrads):
            torch.testing.assert_close(a.double(), r, **tol)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_mask_matches_cpu_backend(dtype, causal):
    # A varlen call returns its keep-mask on CUDA too (since session 46): (sequences, hq, max sq,
    # max sk) with rows and columns local to each sequence, 0 past a sequence's lengths, equal to
    # the CPU backend's for the same (seed, offset); out and LSE then match the CPU's.
    torch.manual_seed(3)
    hq, hkv, d = 2, 1, 64
    cu_q = torch.tensor([0, 7, 7, 20, 95], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 20, 150], dtype=torch.int32)
    q, k, v = randn(95, hq, d, dtype=dtype), randn(150, hkv, d, dtype=dtype), randn(150, hkv, d, dtype=dtype)
    rng = torch.tensor([0x5EED, 3], dtype=torch.int64)
    args = (1.0 / d ** 0.5, causal, False, 0.3, 0, 0, True, False, "orchard.flash_attn_varlen_func")
    feats = (-1, -1, 0.0, None, None, None)
    cpu = orchard._ops.flash_attn_forward(q, k, v, *args, rng, *feats, cu_q, cu_k, 75, 130)
    cuda = orchard._ops.flash_attn_forward(*(t.cuda() for t in (q, k, v)), *args, rng.cuda(), *feats,
                                           cu_q.cuda(), cu_k.cuda(), 75, 130)
    out, lse, mask = (t.cpu() for t in cuda)
    assert mask.shape == (4, hq, 75, 130) and torch.equal(mask, cpu[2])
    tol = dict(atol=2e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), cpu[0].float(), **tol)
    torch.testing.assert_close(lse, cpu[1], **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_training_shape_tolerance(dtype, d, causal):
    _check_fwd_bwd_against_references(*_qkv(dtype=dtype, b=2, s=512, h=8, hkv=2, d=d), causal)


def _references(q, k, v, do, causal):
    """(out, grads) of float64 math and of the same math in the inputs' dtype (the yardstick)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(q64, k64, v64, None, causal)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive, _ = attention_ref(qn, kn, vn, None, causal, upcast=False)
    ngrads = torch.autograd.grad(naive, (qn, kn, vn), do)
    return ref, rgrads, naive, ngrads


def _check_fwd_bwd_against_references(q, k, v, causal):
    """Out and dq / dk / dv by the tolerance rule: against float64 math, with the same math in
    the inputs' dtype as the yardstick."""
    do = torch.randn_like(q)
    out = orchard.flash_attn_func(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, rgrads, naive, ngrads = _references(q, k, v, do, causal)
    check_close_rule(out, ref, naive, 1e-3, "out")
    for name, a, r, n in zip(("dq", "dk", "dv"), grads, rgrads, ngrads):
        check_close_rule(a, r, n, 4e-3, name)


# More key tiles than an H100 / H200 has SMs (3 x 8 heads x 8 tiles of 128 keys = 192 > 132): the
# sm90 backward's persistent launch (non-causal) runs several tiles per CTA, and the d64 kernel,
# whose dQ GEMM alternates between its warpgroups by a step count that runs on across a CTA's
# tiles, sees that count odd at a tile's end (15 query tiles of 64 rows per key tile); d96 runs the
# same alternation on its own bucket.
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_more_key_tiles_than_sms(d, causal):
    _check_fwd_bwd_against_references(*_qkv(dtype=torch.bfloat16, b=3, s=960, h=8, hkv=8, d=d), causal)


def test_sdpa_bhsd_on_cuda_matches_torch():
    q = randn(2, 8, 300, 64, dtype=torch.bfloat16, device="cuda")
    out = orchard.scaled_dot_product_attention(q, q, q, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
    qt = q.transpose(1, 2)
    naive = attention_ref(qt, qt, qt, None, causal=True, top_left=True, upcast=False)[0].transpose(1, 2)
    check_close_rule(out, ref, naive, 1e-3, "sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_nan_query_row_gives_nan_out_and_lse(dtype, d):
    """A NaN in one query row: that row's output and LSE are NaN on the tiled forward (the sm90
    kernels where they run; test_nan_query_row_on_the_sm80_kernels runs the sm80 ones), as on the
    CPU and the decode kernels, never a silent LSE -inf; every other row is bit-identical."""
    torch.manual_seed(11)
    q, k, v = (randn(2, 300, 4, d, dtype=dtype, device="cuda") for _ in range(3))
    clean, clean_lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    q[1, 77, 2, 5] = float("nan")
    out, lse = orchard.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True)
    bad = torch.zeros(2, 300, 4, dtype=torch.bool, device="cuda")
    bad[1, 77, 2] = True
    assert torch.equal(out.isnan().all(-1), bad) and torch.equal(out.isnan().any(-1), bad)
    assert torch.equal(lse.isnan(), bad.transpose(1, 2))
    torch.testing.assert_close(out[~bad], clean[~bad], atol=0, rtol=0)
    torch.testing.assert_close(lse[~bad.transpose(1, 2)], clean_lse[~bad.transpose(1, 2)], atol=0, rtol=0)


def test_nan_query_row_on_the_sm80_kernels():
    """The NaN-row test again with ORCHARD_SM90=0 (read once per process, so in a child pytest): the
    sm80 forward's epilogue, which Hopper otherwise never runs for these shapes."""
    if not _sm90_expected():
        pytest.skip("the sm80 kernels already ran test_nan_query_row_gives_nan_out_and_lse")
    out = _child_pytest("nan_query_row_gives", ORCHARD_SM90="0")
    assert "4 passed" in out, out[-2000:]


def _child_pytest(k_expr, timeout=600, **env_vars):
    """This file's cuda tests matching -k k_expr in a child pytest with env_vars set (for switches
    read once per process); asserts that it passed and returns its stdout."""
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", __file__,
                        "-k", k_expr], env=dict(os.environ, **env_vars), capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
    return r.stdout


def test_debug_log_on_cuda_names_the_kernel(tmp_path, monkeypatch):
    """ORCHARD_DEBUG_FLASH_ATN on the CUDA path: one FWD and one BWD line with the
    CUDA variant (sm90 forward on compute capability 9.0 when compiled in), and the
    results unchanged by the synchronisation the timing adds."""
    q, k, v = _qkv(d=128)
    ref = orchard.flash_attn_func(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    out = orchard.flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    torch.cuda.synchronize()
    lines = _debug_log(tmp_path)
    assert [line.split()[0] for line in lines] == ["FWD", "BWD"], lines
    assert "backend=cuda" in lines[0] and "variant=cuda.fwd." in lines[0], lines[0]
    assert "elapsed_ms=" in lines[0] and "n/a" not in lines[0], lines[0]
    assert (".sm90." in lines[0]) == _sm90_expected(), lines[0]
    # Causal alone is no window (it reaches the kernels as window_right = 0): named as the CPU does.
    assert ".causal" in lines[0] and ".window" not in lines[0], lines[0]
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


# Window / softcap / ALiBi at the shapes the sm90 (Hopper) kernels take: bf16/fp16, d 64/128/256
# and head dims run in a wider bucket (80 -> 96, 160 -> 192: zero-filled columns),
# contiguous BSHD (16-byte rows), several 128-row query tiles and key tiles, windows that skip
# key tiles and leave rows empty. Checked against the float64 reference on any GPU; on compute
# capability 9.0 with 90 in the build's archs, the debug log must also name the sm90 forward
# and the sm90 backward (flash_bwd_sm90.cuh at d <= 128, flash_bwd_sm90_wide.cuh above), so a
# dispatch that silently falls back fails here.
def _sm90_expected():
    """Whether this build and GPU run the sm90 kernels (90 in the archs, compute capability 9.0)."""
    return "90" in str(orchard.build_info().get("cuda_archs")) and torch.cuda.get_device_capability() == (9, 0)


def _logged_inputs(b, sq, sk, hq, hkv, d, dtype, tmp_path, monkeypatch):
    """BSHD q, k, v (requiring grad) and dO, with the per-call debug log switched on into tmp_path."""
    q = randn(b, sq, hq, d, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(b, sk, hkv, d, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(b, sk, hkv, d, dtype=dtype, device="cuda", requires_grad=True)
    do = randn(b, sq, hq, d, dtype=dtype, device="cuda")
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    return q, k, v, do


def _debug_log(tmp_path):
    import os
    return (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text().splitlines()


def _first_fwd_bwd_lines(tmp_path):
    """The debug log's first forward and first backward line (after the GPU has finished)."""
    torch.cuda.synchronize()
    lines = _debug_log(tmp_path)
    fwd = [ln for ln in lines if ln.startswith("FWD")]
    bwd = [ln for ln in lines if ln.startswith("BWD")]
    assert fwd and bwd, lines
    return fwd[0], bwd[0]


SM90_FEATURES = {
    "no_mods": dict(),
    "no_mods_causal": dict(causal=True),
    "window": dict(window_size=(96, 32)),
    "window_causal": dict(causal=True, window_size=(160, 0)),
    "window_empty_rows": dict(window_size=(8, 4)),  # sq > sk, bottom-right: the first ~sq - sk rows see nothing
    "softcap_causal": dict(causal=True, softcap=5.0),
    "alibi": dict(alibi=True),
    "all": dict(causal=True, window_size=(100, 0), softcap=4.0, alibi=True),
    "sink": dict(sink=True),
    "sink_window_causal": dict(causal=True, window_size=(128, 0), sink=True),  # gpt-oss's sliding layers
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("name", list(SM90_FEATURES))
def test_sm90_shape_features_vs_reference(name, d, dtype, tmp_path, monkeypatch):
    sq, sk = (520, 300) if name == "window_empty_rows" else (330, 460)
    _check_sm90_features(name, d, dtype, 2, sq, sk, tmp_path, monkeypatch)


# The same from 2048 keys on, where the forward switches to wider key tiles (d128: 192 keys, d256:
# 80 keys; run_flash_fwd_sm90).
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("name", ["no_mods", "no_mods_causal", "window", "all"])
def test_sm90_features_wide_key_tiles(name, d, tmp_path, monkeypatch):
    _check_sm90_features(name, d, torch.bfloat16, 1, 2100, 2200, tmp_path, monkeypatch)


# Causal 192-row tiles (d64 from 2048 keys, d96) whose last m block holds warpgroups of rows past
# sq (2200 = 11 * 192 + 88: one WG partly real, two wholly past sq) or, with sq == sk, two real WGs
# and one past sq (4160): with ORCHARD_SM90_FWD_PHANTOM_WG_SKIP those WGs skip their key tiles and
# a partly real WG's diagonal counts its real rows only.  Not yet passed on a GPU (session 52's run
# hung on a producer bug of that session's tree, fixed in 5ba0578: bench/NOTES.md).
@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("name,sq,sk", [("no_mods_causal", 2200, 2300), ("window_causal", 2200, 2300),
                                        ("all", 2200, 2300), ("no_mods_causal", 4160, 4160)])
def test_sm90_causal_phantom_warpgroups(name, sq, sk, d, tmp_path, monkeypatch):
    _check_sm90_features(name, d, torch.bfloat16, 1, sq, sk, tmp_path, monkeypatch)


def _check_sm90_features(name, d, dtype, b, sq, sk, tmp_path, monkeypatch):
    """One SM90_FEATURES case (hq 4, hkv 2) against the float64 reference and the naive 16-bit
    one; on an sm90 build and GPU the debug log must name the sm90 forward and backward."""
    from feature_reference import feature_attention_ref
    kw = dict(SM90_FEATURES[name])
    hq, hkv = 4, 2
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = (torch.rand(b, hq, dtype=torch.float64) * 0.3).float().cuda()
    if kw.pop("sink", False):  # attention sinks: the forward's epilogue; dsink by the front end
        kw["sink"] = randn(hq, dtype=torch.float32, device="cuda", requires_grad=True)
    q, k, v, do = _logged_inputs(b, sq, sk, hq, hkv, d, dtype, tmp_path, monkeypatch)
    out, lse = orchard.flash_attn_func(q, k, v, return_softmax_lse=True, **kw)
    leaves = (q, k, v) + ((kw["sink"],) if "sink" in kw else ())
    grads = torch.autograd.grad(out, leaves, do)
    fwd0, bwd0 = _first_fwd_bwd_lines(tmp_path)
    sm90 = _sm90_expected()
    assert (".sm90." in fwd0) == sm90, fwd0
    assert (".sm90." in bwd0) == sm90, bwd0
    for line in (fwd0, bwd0):  # the variant names a window only where one was asked for
        assert (".window" in line) == ("window_size" in kw), (name, line)
    if sm90:  # the head-dim bucket the dispatch picked (cuda_backend.cu sm90_head_dim_bucket)
        bucket = next(x for x in (64, 96, 128, 192, 256) if d <= x)
        for line in (fwd0, bwd0):
            assert re.search(rf"\.sm90\.(bf16|fp16)\.d{bucket}\b", line), (bucket, line)

    rkw = dict(causal=kw.get("causal", False), window=tuple(kw.get("window_size", (-1, -1))),
               softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = kw["sink"].detach().double().requires_grad_() if "sink" in kw else None
    ref, ref_lse = feature_attention_ref(q64, k64, v64, sink=s64, **rkw)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64) + ((s64,) if s64 is not None else ()), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sn = kw["sink"].detach().clone().requires_grad_() if "sink" in kw else None
    naive, _ = feature_attention_ref(qn, kn, vn, sink=sn, upcast=False, **rkw)
    ngrads = torch.autograd.grad(naive, (qn, kn, vn) + ((sn,) if sn is not None else ()), do)
    atol = 2e-3 if dtype == torch.bfloat16 else 2e-4
    check_close_rule(out, ref, naive, atol, f"out {name}")
    for gname, g, r, n in zip(("dq", "dk", "dv", "dsink"), grads, rgrads, ngrads):
        assert torch.isfinite(g).all(), gname
        check_close_rule(g, r, n, 4 * atol, f"{gname} {name}")
    lse64, ref_lse = lse.detach().cpu().double(), ref_lse.detach().cpu()
    assert torch.equal(torch.isfinite(lse64), torch.isfinite(ref_lse)), "LSE -inf pattern"
    fin = torch.isfinite(ref_lse)
    assert (lse64[fin] - ref_lse[fin]).abs().max() <= 1e-3 + 1e-4 * ref_lse[fin].abs().max()
    if name == "window_empty_rows":  # rows that see no key: out 0, LSE -inf, dq 0
        dead = ~fin[0, 0]
        assert dead.any()
        assert (out.detach()[:, dead] == 0).all() and (grads[0][:, dead] == 0).all()


# attn_mask / attn_bias at the shapes the sm90 kernels take. They run row-broadcast biases (row
# stride 0: a key-padding mask (B, 1, 1, S), a per-head key bias (1, H, 1, S); each thread reads
# its fragment's columns in place, sm90/attn_bias_fragment.cuh), alone and with causal, a window
# and ALiBi on top; key tiles a boolean one hides from every row are not run (at either end of the
# forward's range, anywhere in the backward's), down to batch entries with no key at all; the
# rest runs the sm80 kernels: biases with rows of their own (a full boolean
# mask with a row it hides entirely, a per-head (1, H, S, S) bias), a key stride other than 1,
# and the backward of softcap with a bias. Ragged sq / sk (the reads stop or clamp at the ends).
# Against the float64 reference through the torch op (the SDPA drop-in refuses causal with a
# mask, as torch does); on an sm90 build and GPU the log must name the path each case takes.
def _sm90_mask(name, b, hq, sq, sk, dtype):
    if name in ("key_padding", "causal_key_padding"):
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool, device="cuda")
        mask[-1, ..., sk * 2 // 3:] = False
        return mask
    if name in ("left_padding_empty_entry", "causal_left_padding"):
        # Hidden key tiles at the low end (the forward drops them, the backward's CTAs skip them),
        # and a batch entry with no key at all (no key tile: out 0, LSE -inf, grads 0).
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool, device="cuda")
        mask[0, ..., :sk // 2] = False
        mask[-1] = False
        return mask
    if name == "hidden_middle":  # a hidden tile between visible ones: the backward skips it
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool, device="cuda")
        mask[..., 100:300] = False
        return mask
    if name == "per_head_padding":  # (B, H, 1, S): each head's own hidden tiles (GQA groups of 2)
        mask = torch.ones(b, hq, 1, sk, dtype=torch.bool, device="cuda")
        mask[:, 0, ..., 250:] = False
        mask[1, 1, ..., :200] = False
        mask[0, 3] = False
        return mask
    if name == "fp32_key_bias_padded":  # (B, 1, 1, S) float32, batch stride sk + 24
        return randn(b, 1, 1, sk + 24, dtype=torch.float32, device="cuda")[..., :sk]
    if name == "full_bool":
        mask = torch.rand(b, hq, sq, sk, device="cuda") > 0.3
        mask[:, :, 5] = False  # a row the mask hides entirely: out 0, LSE -inf
        return mask
    if name == "head_bias":
        return randn(1, hq, sq, sk, dtype=dtype, device="cuda")
    # Dense ones the sm90 kernels stage by TMA (sm90_dense_bias_stageable): rows padded to whole
    # 16-byte chunks, sliced to the ragged sk (views into the padded buffer: an operator applied
    # after the slice would return a packed tensor, 460-element rows that TMA cannot stage).
    pad = (sk + 15) // 16 * 16
    if name in ("dense_bool", "causal_dense_bool"):
        mask = (torch.rand(b, hq, sq, pad, device="cuda") > 0.3)[..., :sk]
        mask[:, :, 5] = False  # a row the mask hides entirely: out 0, LSE -inf
        mask[0, 1, :, 200:] = False  # whole key tiles hidden for one head
        return mask
    if name == "dense_bool_batch":  # (B, 1, S, S): heads broadcast (stride 0)
        return (torch.rand(b, 1, sq, pad, device="cuda") > 0.5)[..., :sk]
    if name == "dense_broadcast":  # (1, 1, S, S): batch and heads broadcast
        return randn(1, 1, sq, pad, dtype=dtype, device="cuda")[..., :sk]
    if name == "dense_fp32":
        return randn(1, hq, sq, pad, dtype=torch.float32, device="cuda")[..., :sk]
    if name.startswith("dense") or name.startswith("causal_dense"):  # dense_bias, causal_dense_window_alibi, ...
        return (randn(1, hq, sq, pad, dtype=dtype, device="cuda") * 2)[..., :sk]
    return randn(1, hq, 1, sk, dtype=dtype, device="cuda")  # key_bias, window_alibi_key_bias, softcap_key_bias


SM90_MASKS = {
    "key_padding": dict(),
    "causal_key_padding": dict(causal=True),
    "left_padding_empty_entry": dict(),
    "causal_left_padding": dict(causal=True),
    "hidden_middle": dict(),
    "per_head_padding": dict(),
    "key_bias": dict(),
    "fp32_key_bias_padded": dict(),
    "window_alibi_key_bias": dict(window=(96, 32), alibi=True),
    "softcap_key_bias": dict(causal=True, softcap=5.0, sm90_bwd=False),
    "full_bool": dict(sm90_fwd=False, sm90_bwd=False),  # rows of 460 bytes: not TMA-stageable
    "head_bias": dict(sm90_fwd=False, sm90_bwd=False),  # likewise (920 bytes)
    "dense_bool": dict(dense=True),
    "causal_dense_bool": dict(causal=True, dense=True),
    "dense_bool_batch": dict(dense=True),
    "dense_bias": dict(dense=True),
    "causal_dense_window_alibi": dict(causal=True, window=(96, 32), alibi=True, dense=True),
    "dense_broadcast": dict(dense=True),
    "dense_softcap": dict(softcap=5.0, sm90_fwd=False, sm90_bwd=False),  # added before softcap: sm80
    "dense_fp32": dict(sm90_fwd=False, sm90_bwd=False),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 160, 256])
@pytest.mark.parametrize("name", list(SM90_MASKS))
def test_sm90_attn_mask_vs_reference(name, d, dtype, tmp_path, monkeypatch):
    from feature_reference import feature_attention_ref
    b, hq, hkv, sq, sk, scale = 2, 4, 2, 330, 460, d ** -0.5
    kw = SM90_MASKS[name]
    causal, (wl, wr), softcap = kw.get("causal", False), kw.get("window", (-1, -1)), kw.get("softcap", 0.0)
    slopes = (torch.rand(b, hq, dtype=torch.float64) * 0.3).float().cuda() if kw.get("alibi") else None
    mask = _sm90_mask(name, b, hq, sq, sk, dtype)
    if kw.get("dense"):  # rows of whole 16-byte chunks, or the case would not test the staged tiles
        assert mask.stride(-2) * mask.element_size() % 16 == 0 and mask.stride(-1) == 1, mask.stride()
    q, k, v, do = _logged_inputs(b, sq, sk, hq, hkv, d, dtype, tmp_path, monkeypatch)
    q, k, v = (t.detach() for t in (q, k, v))
    features = (wl, wr, softcap, slopes, None, mask)
    out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, False, 0.0, 0, 0, False, False,
                                                       "orchard.flash_attn", None, *features)
    grads = torch.ops.orchard.flash_attn_backward(do, q, k, v, out, lse, scale, causal, False, 0.0, 0, 0, False,
                                                  "orchard.flash_attn", None, *features)
    fwd0, bwd0 = _first_fwd_bwd_lines(tmp_path)
    sm90 = _sm90_expected()
    # Dense masks: the sm90 forward in every bucket, the sm90 backward up to d128 (sm90_call_support.h).
    dense_bwd_ok = not kw.get("dense") or d <= 128
    assert (".sm90." in fwd0) == (sm90 and kw.get("sm90_fwd", True)), fwd0
    assert (".sm90." in bwd0) == (sm90 and kw.get("sm90_bwd", True) and dense_bwd_ok), bwd0

    ref_kw = dict(scale=scale, causal=causal, window=(wl, wr), softcap=softcap, alibi_slopes=slopes, bias=mask)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = feature_attention_ref(*leaves, **ref_kw)
    naive, _ = feature_attention_ref(*low, upcast=False, **ref_kw)
    rgrads = torch.autograd.grad(ref, leaves, do.double())
    ngrads = torch.autograd.grad(naive, low, do)
    atol = 2e-3 if dtype == torch.bfloat16 else 2e-4
    check_close_rule(out, ref, naive, atol, f"out {name}")
    for gname, g, r, n in zip(("dq", "dk", "dv"), grads, rgrads, ngrads):
        assert torch.isfinite(g).all(), gname
        check_close_rule(g, r, n, 4 * atol, f"{gname} {name}")
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible), "rows that see no key: LSE -inf"
    assert (lse.double()[visible] - ref_lse[visible]).abs().max() <= 1e-3 + 1e-4 * ref_lse[visible].abs().max()
    if name in ("full_bool", "dense_bool", "causal_dense_bool"):
        assert (out[:, 5] == 0).all() and (grads[0][:, 5] == 0).all()


# Dense masks on the sm90 kernels with several tiles per CTA: the persistent stride carries the
# forward's bias ring stage / phase across tiles, and d128's non-causal kernel issues the next tile's
# first QK^T (on its bias) with this tile's last PV (kFwdSm90CrossTile); the persistent backward
# (non-causal) carries its Q / dO ring, which the bias tiles ride, across key tiles.  The small
# shapes above run one tile per CTA.  Through the SDPA drop-in, against float64 math.
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("kind", ["bf16_bias", "bool_mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_sm90_dense_mask_many_tiles(d, kind, causal, tmp_path, monkeypatch):
    b, h, s = 4, 16, 1000  # 8 m blocks of 128 rows (6 of 192) x 64 heads: ~4 tiles per CTA
    q, k, v = (randn(b, h, s, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    # Rows of 1008 elements sliced to 1000 keys (16-byte rows); the drop-in refuses is_causal with a
    # mask (as torch does), so causal is folded into the mask, in place in the padded buffer.
    keep = torch.ones(s, s, dtype=torch.bool, device="cuda").tril() if causal else None
    if kind == "bool_mask":  # (B, 1, S, S)
        full = torch.rand(b, 1, s, 1008, device="cuda") > 0.2
        if causal:
            full[..., :s] &= keep
        # Each row sees its own key (a row that sees none has NaN float64 gradients to compare to).
        full[..., :s] |= torch.eye(s, dtype=torch.bool, device="cuda")
        mask = full[..., :s]
        bias = torch.zeros(mask.shape, dtype=torch.float64, device="cuda").masked_fill(~mask, float("-inf"))
    else:  # (1, H, S, S)
        full = randn(1, h, s, 1008, dtype=torch.bfloat16, device="cuda")
        if causal:
            full[..., :s].masked_fill_(~keep, float("-inf"))
        mask = full[..., :s]
        bias = mask.double()
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    do = randn(*out.shape, dtype=out.dtype, device="cuda")
    grads = torch.autograd.grad(out, (q, k, v), do)
    fwd0, bwd0 = _first_fwd_bwd_lines(tmp_path)
    assert (".sm90." in fwd0) == _sm90_expected(), fwd0
    assert (".sm90." in bwd0) == (_sm90_expected() and d <= 128), bwd0  # the wide backward: sm80 kernels
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = leaves[0] @ leaves[1].transpose(-1, -2) * d ** -0.5 + bias
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ leaves[2]
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-2, err
    for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, do.double())):
        gerr = (g.double() - r).abs().max().item()
        assert gerr < 4e-2 * max(1.0, r.abs().max().item()), (name, gerr)


# Varlen on the sm90 kernels (their segment form, sm90_call_support.h): a call whose q and k share
# one cu_seqlens tensor runs as one sequence of the packed rows, each row seeing its own
# segment's keys. Segment boundaries inside query and key tiles, empty and one-token sequences,
# packed rows past cu_seqlens[-1], GQA, and the score modifiers on top; against the float64
# reference per sequence. On an sm90 build and GPU the debug log must name the sm90 backward
# (d <= 128; the wide backward keeps varlen on the sm80 kernels) and the sm90 forward where the
# dispatch takes it (sm90_segment_forward_pays: >= 1024 rows per sequence on average, or always /
# never under ORCHARD_SM90_VARLEN_FWD=1 / 0, which test_sm90_varlen_forward_forced sets).
SM90_VARLEN = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window_causal": dict(causal=True, window_size=(90, 0)),
    "window": dict(window_size=(40, 70)),
    "softcap_alibi_causal": dict(causal=True, softcap=5.0, alibi=True),
    "sink_causal": dict(causal=True, sink=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("name", list(SM90_VARLEN))
def test_sm90_varlen_segments_vs_reference(name, d, dtype, tmp_path, monkeypatch):
    if dtype == torch.float16 and name not in ("plain", "causal"):
        pytest.skip("fp16: the plain and causal cases")
    _check_sm90_varlen(name, [300, 1, 0, 129, 500, 64, 37], 13, d, dtype, tmp_path, monkeypatch)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("name", ["causal", "window_causal", "softcap_alibi_causal", "sink_causal"])
def test_sm90_varlen_long_segments(name, d, tmp_path, monkeypatch):
    """Sequences of >= 1024 rows on average: the dispatch's own choice runs the sm90 forward."""
    _check_sm90_varlen(name, [2600, 1, 2500, 3100], 7, d, torch.bfloat16, tmp_path, monkeypatch)


def test_sm90_varlen_forward_forced():
    """The short-segment cases again with ORCHARD_SM90_VARLEN_FWD=1 (read once per process, so in
    a child pytest): the segment form's forward at every head dim, whatever the dispatch's rule."""
    if not _sm90_expected():
        pytest.skip("needs an sm90 build on compute capability 9.0")
    _child_pytest("sm90_varlen_segments or sm90_varlen_many", ORCHARD_SM90_VARLEN_FWD="1")


@pytest.mark.parametrize("name", ["causal", "window"])
def test_sm90_varlen_many_short_segments(name, tmp_path, monkeypatch):
    """150 sequences of 0-40 rows: most tiles hold several segments (the per-element masks and the
    deeper lookups)."""
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(0, 41, (150,), generator=g).tolist()
    _check_sm90_varlen(name, lens, 0, 128, torch.bfloat16, tmp_path, monkeypatch)


def _check_sm90_varlen(name, lens, pad, d, dtype, tmp_path, monkeypatch):
    import os
    from feature_reference import varlen_attention_ref
    kw = dict(SM90_VARLEN[name])
    hq, hkv = 4, 2
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = (torch.rand(hq, dtype=torch.float64) * 0.3).float().cuda()
    if kw.pop("sink", False):
        kw["sink"] = randn(hq, dtype=torch.float32, device="cuda", requires_grad=True)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.cuda()
    n = sum(lens)
    total = n + pad  # rows past cu[-1]: no sequence's
    q, k, v = (randn(total, h, d, dtype=dtype, device="cuda", requires_grad=True) for h in (hq, hkv, hkv))
    do = randn(total, hq, d, dtype=dtype, device="cuda")
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    out, lse = orchard.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), return_softmax_lse=True, **kw)
    leaves = (q, k, v) + ((kw["sink"],) if "sink" in kw else ())
    grads = torch.autograd.grad(out, leaves, do)
    fwd0, bwd0 = _first_fwd_bwd_lines(tmp_path)
    sm90 = _sm90_expected()
    forced = os.environ.get("ORCHARD_SM90_VARLEN_FWD")
    fwd_form = forced != "0" if forced is not None else total // len(lens) >= 1024
    assert (".sm90." in fwd0) == (sm90 and fwd_form) and ".varlen" in fwd0, fwd0
    assert (".sm90." in bwd0) == (sm90 and d <= 128), bwd0

    rkw = dict(causal=kw.get("causal", False), window=tuple(kw.get("window_size", (-1, -1))),
               softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"))
    own = slice(0, n)
    q64, k64, v64 = (t.detach()[own].double().requires_grad_() for t in (q, k, v))
    s64 = kw["sink"].detach().double().requires_grad_() if "sink" in kw else None
    ref, ref_lse = varlen_attention_ref(q64, k64, v64, cu.cpu(), cu.cpu(), sink=s64, **rkw)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64) + ((s64,) if s64 is not None else ()), do[own].double())
    qn, kn, vn = (t.detach()[own].clone().requires_grad_() for t in (q, k, v))
    sn = kw["sink"].detach().clone().requires_grad_() if "sink" in kw else None
    naive, _ = varlen_attention_ref(qn, kn, vn, cu.cpu(), cu.cpu(), sink=sn, upcast=False, **rkw)
    ngrads = torch.autograd.grad(naive, (qn, kn, vn) + ((sn,) if sn is not None else ()), do[own])
    atol = 2e-3 if dtype == torch.bfloat16 else 2e-4
    check_close_rule(out[own], ref, naive, atol, f"out {name}")
    for gname, g, r, nv in zip(("dq", "dk", "dv", "dsink"), grads, rgrads, ngrads):
        assert torch.isfinite(g).all(), gname
        g = g if gname == "dsink" else g[own]
        check_close_rule(g, r, nv, 4 * atol * (n if gname == "dsink" else 1), f"{gname} {name}")
    if pad:  # rows past cu[-1]: out and grads 0, LSE -inf
        assert (out.detach()[n:] == 0).all() and (grads[0][n:] == 0).all()
        assert (grads[1][n:] == 0).all() and (grads[2][n:] == 0).all()
        assert torch.isneginf(lse.detach()[:, n:]).all()
    lse64, ref_lse = lse.detach()[:, own].cpu().double(), ref_lse.detach().cpu()
    assert torch.equal(torch.isfinite(lse64), torch.isfinite(ref_lse)), "LSE -inf pattern"
    fin = torch.isfinite(ref_lse)
    assert (lse64[fin] - ref_lse[fin]).abs().max() <= 1e-3 + 1e-4 * ref_lse[fin].abs().max()


# deterministic=True at the shapes the sm90 backward's ordered-dQ kernels take (d 64 / 128, bf16 /
# fp16, GQA, ragged sq / sk, both causal alignments, several key blocks adding to each query
# block): the float64 reference rule, three runs bit for bit equal (the grads' memory is
# poisoned with NaN in between, so a run that leaves an element unwritten fails), and on
# compute capability 9.0 with 90 in the build the debug log must name the sm90 backward.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,sq,sk", [(False, 330, 1000), (True, 700, 460), (True, 300, 900)],
                         ids=["full", "causal_sq_gt_sk", "causal_sk_gt_sq"])
def test_sm90_shape_deterministic_backward(causal, sq, sk, d, dtype, tmp_path, monkeypatch):
    q, k, v, do = _logged_inputs(2, sq, sk, 4, 2, d, dtype, tmp_path, monkeypatch)
    runs = []
    for _ in range(3):
        for t in (q, k, v):  # blocks of the grads' sizes, freed: the allocator hands them out next
            torch.full_like(t, float("nan"))
        out = orchard.flash_attn_func(q, k, v, causal=causal, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    torch.cuda.synchronize()
    lines = _debug_log(tmp_path)
    bwd = [ln for ln in lines if ln.startswith("BWD")]
    assert len(bwd) == 3, lines
    assert (".sm90." in bwd[0]) == _sm90_expected() and ".deterministic" in bwd[0], bwd[0]
    for again in runs[1:]:
        for name, a, g in zip(("dq", "dk", "dv"), runs[0], again):
            assert torch.equal(a, g), f"{name}: reruns differ"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal=causal)[0]
    naive = attention_ref(qn, kn, vn, causal=causal, upcast=False)[0]
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    ngrads = torch.autograd.grad(naive, (qn, kn, vn), do)
    atol = 2e-3 if dtype == torch.bfloat16 else 2e-4
    for name, g, r, n in zip(("dq", "dk", "dv"), runs[0], rgrads, ngrads):
        assert torch.isfinite(g).all(), name
        check_close_rule(g, r, n, 4 * atol, f"{name} deterministic")


@pytest.mark.parametrize("lens, total, d", [([256], 1024, 128), ([100, 100], 300, 64)], ids=["256_of_1024", "2x100_of_300"])
def test_varlen_backward_with_unowned_rows(lens, total, d):
    """One cu_seqlens tensor for q and k with packed rows no sequence owns (a static buffer):
    on Hopper the backward runs the segment form, whose D / dQ accumulator span every packed row.
    Before session 41 its workspace was sized for the call's own layout (3.2 MB short for the
    first case): checked against the float64 reference on the owned rows, zeros elsewhere, and
    worth a compute-sanitizer memcheck run."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(total, 8, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = orchard.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    n = cu[-1].item()
    for grad in (dq, dk, dv):
        assert grad[n:].abs().max() == 0
    start = 0
    for length in lens:
        sl = slice(start, start + length)
        qs, ks, vs = (t.detach()[sl].double().unsqueeze(0).requires_grad_() for t in (q, k, v))
        ref, _ = attention_ref(qs, ks, vs, causal=True)
        rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), dout[sl].double().unsqueeze(0))
        for got, want in ((dq, rq), (dk, rk), (dv, rv)):
            torch.testing.assert_close(got[sl].double(), want[0], atol=5e-2, rtol=5e-2)
        start += length


# ---- GPUs that give a block less shared memory than an H100 ---------------------------------------
# ORCHARD_CUDA_SMEM_OPTIN lowers the shared-memory opt-in the kernel choices see (read once per
# process), so these cases run in a child pytest on the sm80 kernels (ORCHARD_SM90=0), as an A100
# (163 KB) or an sm_86 / sm_89 GPU (99 KB) would run them. None of them has run on such a GPU.
SMEM_A100, SMEM_SM86 = 166912, 101376


def _smem_cap_is(cap):
    import os
    if os.environ.get("ORCHARD_CUDA_SMEM_OPTIN") != str(cap) or os.environ.get("ORCHARD_SM90") != "0":
        pytest.skip("runs in a child pytest (test_sm80_kernels_with_less_shared_memory)")


@pytest.mark.parametrize("cap", [SMEM_A100, SMEM_SM86], ids=["a100", "sm86"])
def test_sm80_kernels_with_less_shared_memory(cap):
    """Before session 54 an A100 could not run the backward at d64 / d128 (174 / 173 KB of shared
    memory with two Q / dO stages) and an sm_86 / sm_89 GPU no backward and no d160 / d192 forward:
    a bare CUDA launch error. Now the one-stage backward, its compact tiles (session 66: every head
    dim up to 128 on sm_86 / sm_89, attn_bias at d64 on an A100), the d256 forward kernel for
    d160 / d192, and NotImplementedError naming the sizes where nothing fits."""
    if torch.cuda.get_device_properties(0).shared_memory_per_block_optin < cap:
        pytest.skip("this GPU allows less than the cap")
    out = _child_pytest("smem_a100_" if cap == SMEM_A100 else "smem_sm86_",
                        ORCHARD_CUDA_SMEM_OPTIN=str(cap), ORCHARD_SM90="0")
    assert re.search(r"\b%d passed" % (11 if cap == SMEM_A100 else 19), out), out[-2000:]


def _variant_lines(tmp_path, monkeypatch, fn):
    """fn() run with the debug log on: its FWD and BWD lines' variant names."""
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    fn()
    torch.cuda.synchronize()
    return [re.search(r"variant=(\S+)", ln).group(1) for ln in _debug_log(tmp_path)]


@pytest.mark.parametrize("d", [64, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_smem_a100_fwd_bwd(d, causal, tmp_path, monkeypatch):
    """d64 / d128: the one-pass backward on one Q / dO stage; d192 / d256 likewise (before, the
    two-pass kernels: their two stages need 173 / 222 KB)."""
    _smem_cap_is(SMEM_A100)
    variants = _variant_lines(tmp_path, monkeypatch, lambda: _check_fwd_bwd_against_references(
        *_qkv(dtype=torch.bfloat16, b=2, s=333, h=4, hkv=2, d=d), causal))
    assert len(variants) == 2 and not any(".sm90." in v for v in variants), variants


def _check_deterministic_backward(q, k, v):
    """A causal deterministic backward: bitwise the same twice, and within the tolerance rule."""
    do = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = orchard.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, rgrads, _, ngrads = _references(q, k, v, do, True)
    for name, g, r, n in zip(("dq", "dk", "dv"), runs[0], rgrads, ngrads):
        check_close_rule(g, r, n, 4e-3, name)


def test_smem_a100_deterministic_backward():
    """The deterministic backward (its dQ kernel fits 163 KB) on the one-stage key pass."""
    _smem_cap_is(SMEM_A100)
    _check_deterministic_backward(*_qkv(dtype=torch.bfloat16, b=2, s=400, h=4, hkv=4, d=128))


def _masked_sdpa_vs_float64(d, dtype=torch.bfloat16):
    """A float attn_mask (1, H, S, S), with its gradient, through the SDPA drop-in vs float64 SDPA."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 200, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 200, 200, device="cuda", dtype=dtype, requires_grad=True)
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), do)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = torch.nn.functional.scaled_dot_product_attention(*xs[:3], attn_mask=xs[3])
    rgrads = torch.autograd.grad(ref, xs, do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), r, atol=3e-2, rtol=3e-2)


def test_smem_a100_attn_bias_d128():
    """attn_bias at d128: 155 KB with one stage (188 KB with two)."""
    _smem_cap_is(SMEM_A100)
    _masked_sdpa_vs_float64(128)


def test_smem_a100_attn_bias_d64():
    """attn_bias at d64: the one-pass backward's tiles need 174 KB even on one stage, so it runs
    their compact form (81 KB; before session 66, NotImplementedError). The forward: 121 KB."""
    _smem_cap_is(SMEM_A100)
    _masked_sdpa_vs_float64(64)


@pytest.mark.parametrize("d", [144, 192])
def test_smem_sm86_forward_on_the_d256_kernel(d, tmp_path, monkeypatch):
    """d160 / d192 forwards need 105 / 150 KB: they run the d256 kernel (99 KB), named so in the log."""
    _smem_cap_is(SMEM_SM86)
    q, k, v = _qkv(dtype=torch.float16, b=2, s=300, h=4, hkv=2, d=d, requires_grad=False)

    def run():
        out = orchard.flash_attn_func(q, k, v, causal=True)
        ref, _ = attention_ref(q.double(), k.double(), v.double(), None, True)
        naive, _ = attention_ref(q, k, v, None, True, upcast=False)
        check_close_rule(out, ref, naive, 1e-3, "out")
    variants = _variant_lines(tmp_path, monkeypatch, run)
    assert variants == ["cuda.fwd.fp16.d256.causal"], variants


@pytest.mark.parametrize("d", [160, 192])
def test_smem_sm86_backward_two_pass(d):
    """d160 / d192 train there on the two-pass kernels: d160 on two Q / dO stages (90 KB), d192 on
    one (81 KB; before session 66, NotImplementedError: 106 KB with two)."""
    _smem_cap_is(SMEM_SM86)
    _check_fwd_bwd_against_references(*_qkv(dtype=torch.bfloat16, b=1, s=257, h=4, hkv=4, d=d), True)


@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_smem_sm86_fwd_bwd(d, causal, tmp_path, monkeypatch):
    """Every head dim up to 128 trains in 99 KB: the one-pass backward's compact 64 x 64 tiles
    (session 66; before, NotImplementedError: the smallest kernel needed 110-138 KB), the only
    backward kernel there that fits, so these cases run it."""
    _smem_cap_is(SMEM_SM86)
    variants = _variant_lines(tmp_path, monkeypatch, lambda: _check_fwd_bwd_against_references(
        *_qkv(dtype=torch.bfloat16, b=2, s=333, h=4, hkv=2, d=d), causal))
    assert len(variants) == 2 and not any(".sm90." in v for v in variants), variants


@pytest.mark.parametrize("d, causal", [(59, True), (128, False)])
def test_smem_sm86_dropout_backward(d, causal):
    """Dropout on the compact backward tiles (their Philox draws per 16-key block): the gradients
    of the function the returned mask defines, against float64 math (d59: the element-wise loads)."""
    _smem_cap_is(SMEM_SM86)
    q, k, v = _qkv(dtype=torch.float16, b=2, s=200, h=4, hkv=2, d=d)
    out, _, mask = torch.ops.orchard.flash_attn_forward(q, k, v, d ** -0.5, causal, False, 0.2, 1234, 8, True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_ref(q64, k64, v64, d ** -0.5, causal, keep_mask=mask, dropout_p=0.2)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), r, atol=2e-2, rtol=2e-2)


def test_smem_sm86_deterministic_backward():
    """d128 deterministic: the dQ kernel's two K / V stages need 102 KB, so it runs one (and the
    key pass its compact tiles)."""
    _smem_cap_is(SMEM_SM86)
    _check_deterministic_backward(*_qkv(dtype=torch.bfloat16, b=2, s=300, h=4, hkv=2, d=128))


def test_smem_sm86_backward_has_no_kernel():
    """d256 still has no backward kernel that fits 99 KB (its two-pass kernels need 107008 bytes even
    on one Q / dO stage): NotImplementedError with the sizes."""
    _smem_cap_is(SMEM_SM86)
    q, k, v = _qkv(dtype=torch.bfloat16, b=1, s=128, h=2, hkv=2, d=256)
    out = orchard.flash_attn_func(q, k, v)
    with pytest.raises(NotImplementedError, match=r"needs 107008 bytes of shared memory per block; this GPU allows 101376"):
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


@pytest.mark.parametrize("d", [64, 128])
def test_smem_sm86_masked_fwd_bwd(d):
    """A float attn_mask with its gradient at d64 / d128: the forward's two bias tile stages need
    118 / 102 KB, so it stages one (84 KB); the backward runs the compact tiles (81 / 93 KB).
    Before session 66 the forward raised NotImplementedError."""
    _smem_cap_is(SMEM_SM86)
    _masked_sdpa_vs_float64(d)


def test_smem_sm86_masked_forward_has_no_kernel():
    """A float attn_mask at d96 needs 112 KB in the forward even with one bias stage:
    NotImplementedError with the sizes."""
    _smem_cap_is(SMEM_SM86)
    q, k, v = (torch.randn(1, 2, 128, 96, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"needs 114688 bytes of shared memory per block; this GPU allows 101376"):
        orchard.scaled_dot_product_attention(q, k, v, attn_mask=bias)
