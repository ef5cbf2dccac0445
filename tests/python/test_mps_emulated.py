"""The Python MPS path (python/orchard/_mps.py) end to end on CPU tensors posing as MPS:
a stand-in for torch.mps.compile_shader hands the kernel calls to orchard._metal_emulator,
which runs the same Metal kernels (built from the variant sources the C++ core emits) on
the emulated Metal execution model. Argument order, dtypes, strides, launch geometry,
autograd, the debug/profile logs and the error rules are all exercised; only the Metal
compiler and the GPU are not. The emulator module is built for head dims <= 64."""

import os
import re

import pytest
import torch

import orchard
import orchard_ops
from orchard import _mps

from helpers import attention_ref, check_close_rule, keep_probability, randn

emulator = pytest.importorskip("orchard._metal_emulator",
                               reason="orchard was built without ORCHARD_PY_METAL_EMULATOR")

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


_MSL_TO_TORCH = {"float": torch.float32, "uchar": torch.uint8, "long": torch.int64, "int": torch.int32,
                 "half": torch.float16, "bfloat": torch.bfloat16}


def _kernel_signatures(source):
    """{kernel: [torch dtype of each buffer argument]} parsed from the MSL source, so the
    stand-in rejects what Metal would silently misread (wrong order, dtype or count)."""
    elem = re.search(r"typedef (\w+) elem_t;", source).group(1)
    sigs = {}
    for name, params in re.findall(r"kernel void (\w+)\((.*?)\)\s*\{", source, re.S):
        types = re.findall(r"device (?:const )?(\w+)\*", params)
        sigs[name] = [_MSL_TO_TORCH[elem if t == "elem_t" else t] for t in types]
    return sigs


class EmulatedLibrary:
    """What compile_shader returns: kernels callable as lib.name(*tensors, threads=, group_size=)."""

    def __init__(self, source):
        first = source.splitlines()[0]
        if "variant " not in first:
            raise RuntimeError("program_source:1:1: error: not an Orchard variant source")
        self.variant = first.split("variant ")[1].split()[0]
        if self.variant not in emulator.variants():
            raise RuntimeError(f"{self.variant} is not built into orchard._metal_emulator")
        self.signatures = _kernel_signatures(source)

    def __getattr__(self, kernel):
        if kernel not in self.signatures:
            raise AttributeError(kernel)

        def call(*args, threads, group_size):
            # compile_shader binds tensors (buffer + storage offset) in argument order.
            assert [a.dtype for a in args] == self.signatures[kernel], kernel
            assert all(a.device.type == "cpu" for a in args), kernel
            assert isinstance(threads, int) and isinstance(group_size, int) and threads % group_size == 0
            emulator.run(self.variant, kernel, threads // group_size, group_size, [a.data_ptr() for a in args])
        return call


@pytest.fixture
def emulated():
    """The compiled sources, in order, while the stand-in is active."""
    compiled = []

    def compile_shader(source):
        compiled.append(source)
        return EmulatedLibrary(source)

    with _mps.use_compiler(compile_shader):
        yield compiled


def _grads(fn, *inputs, dout):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_forward_backward(emulated, dtype, causal):
    # GQA, sq != sk (bottom-right causal), tails, head dim below its bucket.
    b, sq, sk, hq, hkv, d = 2, 19, 27, 4, 2, 40
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    dout = randn(b, sq, hq, d, dtype=dtype)
    out, grads = _grads(lambda q, k, v: orchard.flash_attn_func(q, k, v, causal=causal), q, k, v, dout=dout)
    ref, ref_grads = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal)[0], q.double(), k.double(),
                            v.double(), dout=dout.double())
    naive, naive_grads = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=False)[0],
                                q, k, v, dout=dout)
    check_close_rule(out, ref, naive, ATOL[dtype], "out")
    for name, g, r, n in zip("qkv", grads, ref_grads, naive_grads):
        assert g.dtype == dtype and g.shape == r.shape
        check_close_rule(g, r, n, ATOL[dtype], "d" + name)
    assert len(emulated) == 1  # forward and backward share one compiled variant


def test_sdpa_bhsd_strided_views_top_left_causal(emulated):
    # BHSD storage sliced out of larger tensors: read in place through strides.
    big = randn(1, 3, 40, 70)
    q, k, v = big[:, :, 3:20, 5:69], big[:, :, 1:38, 2:66], big[:, :, 0:37, 4:68]
    dout = randn(1, 3, 17, 64)
    f = lambda q, k, v: orchard.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    out, grads = _grads(f, q, k, v, dout=dout)
    ref_f = lambda q, k, v: attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,  # noqa: E731
                                          top_left=True)[0].transpose(1, 2)
    ref, ref_grads = _grads(ref_f, q.double(), k.double(), v.double(), dout=dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0)


def test_dropout_mask_matches_cpu_backend_and_gradients_use_it(emulated):
    b, sq, sk, hq, hkv, d = 1, 23, 29, 2, 1, 32
    q, k, v = randn(b, sq, hq, d), randn(b, sk, hkv, d), randn(b, sk, hkv, d)
    p, seed, offset = 0.3, 0x1234_5678_9ABC_DEF0, 7
    args = (1.0 / d ** 0.5, True, False, p, seed, offset, True)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, _lse, mask = orchard._ops.flash_attn_forward(qg, kg, vg, *args)
    with _mps.use_compiler(None):  # the CPU backend, same key
        _, _, cpu_mask = orchard._ops.flash_attn_forward(q, k, v, *args)
    assert torch.equal(mask, cpu_mask)
    assert abs(mask.float().mean().item() - keep_probability(p)) < 0.05
    dout = randn(b, sq, hq, d)
    out.backward(dout)
    ref, ref_grads = _grads(lambda q, k, v: attention_ref(q, k, v, causal=True, keep_mask=mask, dropout_p=p)[0],
                            q.double(), k.double(), v.double(), dout=dout.double())
    torch.testing.assert_close(out.detach().double(), ref, atol=2e-5, rtol=0)
    for g, r in zip((qg.grad, kg.grad, vg.grad), ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_offsets_match_cpu_backend(emulated, causal):
    # Dropout's global coordinates (context parallelism): the Metal kernels draw the
    # CPU backend's mask for the same offsets (an odd column offset included), and the
    # backward applies it.
    b, sq, sk, hq, hkv, d = 2, 21, 30, 4, 2, 32
    q, k, v = randn(b, sq, hq, d), randn(b, sk, hkv, d), randn(b, sk, hkv, d)
    p = 0.25
    rng = torch.tensor([0x5EED, 3], dtype=torch.int64)
    args = (1.0 / d ** 0.5, causal, True, p, 0, 0, True, False, "orchard.flash_attn", rng,
            -1, -1, 0.0, None, None, None, None, None, 0, 0, 37, 7, 2, 8)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, _lse, mask = orchard._ops.flash_attn_forward(qg, kg, vg, *args)
    with _mps.use_compiler(None):  # the CPU backend, same key and offsets
        _, _, cpu_mask = orchard._ops.flash_attn_forward(q, k, v, *args)
        _, _, plain_mask = orchard._ops.flash_attn_forward(q, k, v, *args[:10])
    assert torch.equal(mask, cpu_mask)
    assert not torch.equal(mask, plain_mask)
    dout = randn(b, sq, hq, d)
    out.backward(dout)
    ref, ref_grads = _grads(lambda q, k, v: attention_ref(q, k, v, 1.0 / d ** 0.5, causal, True, keep_mask=mask,
                                                          dropout_p=p)[0],
                            q.double(), k.double(), v.double(), dout=dout.double())
    torch.testing.assert_close(out.detach().double(), ref, atol=2e-5, rtol=0)
    for g, r in zip((qg.grad, kg.grad, vg.grad), ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0)


def test_smoke_orchard_ops_with_debug_logs(emulated, tmp_path, monkeypatch, capfd):
    # The original module's smoke test: (2, 4, 64) tensors, loss.backward(), both debug switches.
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_TENSOR_PROFILE", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    q, k, v = (randn(2, 4, 64, requires_grad=True) for _ in range(3))
    out, mask = orchard_ops.flash_attn_fwd(q, k, v)
    out.sum().backward()
    err = capfd.readouterr().err
    log = (tmp_path / f"orchard_flash_attn_{os.getpid()}.log").read_text()
    assert "FWD #" in log and "BWD #" in log
    assert "backend=mps variant=metal_fp32_d64 staged=0" in log.splitlines()[0]
    # out.sum().backward() hands over an expanded dout (all strides 0): one staged copy.
    assert "backend=mps variant=metal_fp32_d64 staged=1" in log.splitlines()[1]
    assert "dout: float32[2, 4, 1, 64] strides [0, 0, 0, 0] mps storage=cpu (emulated MPS) -> staged" in err
    assert "op=orchard_ops.flash_attn_fwd b=2 sq=4 sk=4 hq=1 hkv=1 d=64" in log
    for name in ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv"):
        assert f" {name}: float32[" in err, name
    assert "mps storage=" in err and "-> zero-copy" in err
    assert mask.numel() == 0
    with _mps.use_compiler(None):  # the same on the CPU backend
        q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out2, _ = orchard_ops.flash_attn_fwd(q2, k2, v2)
        out2.sum().backward()
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=0)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_compiles_once_per_variant(emulated):
    for dtype in (torch.float16, torch.float16, torch.bfloat16):
        q = randn(1, 9, 2, 16, dtype=dtype)
        orchard.flash_attn_func(q, q, q)
    assert len(emulated) == 2
    assert "typedef half elem_t;" in emulated[0] and "typedef bfloat elem_t;" in emulated[1]


def test_unsupported_dtype_and_head_dim_fail_before_anything_runs(emulated):
    q = randn(1, 4, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^orchard.flash_attn_func: .*float16, bfloat16 and float32"):
        orchard.flash_attn_func(q, q, q)
    q = randn(1, 4, 2, 264)
    with pytest.raises(ValueError, match=r"^orchard.flash_attn_func: .*head dims 1..256, got 264"):
        orchard.flash_attn_func(q, q, q)
    assert emulated == []


def test_features_the_kernels_lack_are_rejected():
    q = randn(1, 4, 2, 16)
    with _mps.use_compiler(lambda src: EmulatedLibrary(src)):
        with pytest.raises(NotImplementedError, match=r"^op: unknown feature arguments for the Metal"):
            _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None, (-1,) * 15)


# Windows (with and without causal, rows left empty, sq != sk), softcap, ALiBi ((h,) and (b, h)
# slopes, causal or not), sinks (with their gradient; rows a window leaves empty) and all of them
# at once, a value head dim of its own (narrower and wider than q / k's), GQA, forward and
# backward, against float64.
SCORE_MOD_CASES = {
    "window": (dict(window_size=(6, 3)), {}),
    "causal_window": (dict(causal=True, window_size=(5, -1)), {}),
    "window_empty_rows": (dict(window_size=(1, 0)), dict(sq=31, sk=12)),
    "softcap": (dict(softcap=1.5), {}),
    "alibi": (dict(alibi=(4,)), {}),
    "alibi_causal_per_batch": (dict(causal=True, alibi=(2, 4)), {}),
    "sink": (dict(sink=True), {}),
    "sink_window_empty_rows": (dict(sink=True, window_size=(1, 0)), dict(sq=31, sk=12)),
    "value_head_dim_narrower": (dict(causal=True), dict(dv=24)),
    "value_head_dim_wider": (dict(window_size=(7, 2)), dict(dv=56)),
    "everything": (dict(causal=True, window_size=(9, -1), softcap=2.0, alibi=(4,), sink=True), dict(dv=32)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SCORE_MOD_CASES))
def test_window_softcap_alibi_forward_backward(emulated, dtype, name):
    from feature_reference import feature_attention_ref
    kw, shape = SCORE_MOD_CASES[name]
    b, hq, hkv, d = 2, 4, 2, 40
    sq, sk, dv = shape.get("sq", 19), shape.get("sk", 37), shape.get("dv", d)
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)
    dout = randn(b, sq, hq, dv, dtype=dtype)
    kw = dict(kw)
    slopes = None
    if "alibi" in kw:
        slopes = torch.rand(*kw.pop("alibi")) * 0.5 + 0.1
    # The sink is an input with a gradient of its own (the last of `inputs`).
    inputs = [q, k, v] + ([randn(hq)] if kw.pop("sink", False) else [])
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0), alibi_slopes=slopes)
    sink_of = lambda t: t[3] if len(t) > 3 else None  # noqa: E731
    out, grads = _grads(lambda *t: orchard.flash_attn_func(*t[:3], alibi_slopes=slopes, sink=sink_of(t), **kw),
                        *inputs, dout=dout)
    ref, ref_grads = _grads(lambda *t: feature_attention_ref(*t[:3], sink=sink_of(t), **ref_kw)[0],
                            *(t.double() for t in inputs), dout=dout.double())
    naive, naive_grads = _grads(lambda *t: feature_attention_ref(*t[:3], sink=sink_of(t), upcast=False, **ref_kw)[0],
                                *inputs, dout=dout)
    check_close_rule(out, ref, naive, ATOL[dtype], "out")
    assert out.shape == (b, sq, hq, dv)
    for g, r, n, what in zip(grads, ref_grads, naive_grads, ("dq", "dk", "dv", "dsink")):
        check_close_rule(g, r, n, ATOL[dtype], what)
    q, k, v, sink = *inputs[:3], sink_of(inputs)
    # The LSE too (flash-attn's convention: -inf for rows that see no key).
    _, lse, _ = orchard._ops.flash_attn_forward(q, k, v, 1.0 / d ** 0.5, kw.get("causal", False), False, 0.0, 0, 0,
                                                False, False, "orchard.flash_attn", None,
                                                *kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), slopes,
                                                sink)
    ref_lse = feature_attention_ref(q.double(), k.double(), v.double(), sink=sink, **ref_kw)[1]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4 if dtype == torch.float32 else 2e-2,
                               rtol=0)
    if name == "window_empty_rows":
        assert torch.isinf(lse).any() and (out[torch.isinf(lse).transpose(1, 2)] == 0).all()
    if name == "sink_window_empty_rows":  # no key: O = 0 and LSE = the sink
        empty = feature_attention_ref(q.double(), k.double(), v.double(), **ref_kw)[1].isinf()
        assert empty.any() and (out[empty.transpose(1, 2)] == 0).all()


# SDPA's attn_mask on the Metal path: a bool mask and float biases (q's dtype and fp32), full
# and broadcast (key padding (B, 1, 1, S), one (L, S) plane), with a sink, the bias's own
# gradient, against float64; the mask is read in place through its strides.
MASK_CASES = {
    "bool_full": ("bool", (2, 4, 21, 33), False),
    "bool_key_padding": ("bool", (2, 1, 1, 33), False),
    "bias_q_dtype_plane": ("q", (21, 33), False),
    "bias_fp32_heads_grad": ("fp32", (1, 4, 21, 33), True),
    "bool_with_sink": ("bool", (2, 4, 21, 33), False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MASK_CASES))
def test_sdpa_attn_mask(emulated, dtype, name):
    from feature_reference import feature_attention_ref
    kind, mshape, bias_grad = MASK_CASES[name]
    b, h, sq, sk, d = 2, 4, 21, 33, 24
    q, k, v = randn(b, h, sq, d, dtype=dtype), randn(b, h, sk, d, dtype=dtype), randn(b, h, sk, d, dtype=dtype)
    dout = randn(b, h, sq, d, dtype=dtype)
    if kind == "bool":
        mask = torch.rand(*mshape) > 0.35
        mask[..., 0] = True  # every row sees a key (SDPA gives NaN otherwise)
    else:
        mask = randn(*mshape, dtype=dtype if kind == "q" else torch.float32)
    inputs = [q, k, v] + ([mask] if bias_grad else []) + ([randn(h)] if name.endswith("sink") else [])
    sink_of = lambda t: t[3] if name.endswith("sink") else None  # noqa: E731
    mask_of = lambda t: t[3] if bias_grad else mask  # noqa: E731

    def run(*t):
        return orchard.scaled_dot_product_attention(*t[:3], attn_mask=mask_of(t), sink=sink_of(t))

    def ref(*t, upcast=True):
        bshd = [x.transpose(1, 2) for x in t[:3]]
        bias = mask_of(t)
        bias = bias if bias.dim() == 4 else bias[None, None]
        out = feature_attention_ref(*bshd, bias=bias, sink=sink_of(t), upcast=upcast)[0]
        return out.transpose(1, 2)

    out, grads = _grads(run, *inputs, dout=dout)
    exact, exact_grads = _grads(ref, *(t.double() for t in inputs), dout=dout.double())
    naive, naive_grads = _grads(lambda *t: ref(*t, upcast=False), *inputs, dout=dout)
    check_close_rule(out, exact, naive, ATOL[dtype], "out")
    for g, r, n, what in zip(grads, exact_grads, naive_grads, ("dq", "dk", "dv", "dbias" if bias_grad else "dsink")):
        check_close_rule(g, r, n, ATOL[dtype] if what != "dbias" else 1e-2, what)
    assert len(emulated) == 1  # the Metal kernels ran (one variant)


# Varlen (packed sequences, flash-attn's varlen API): mixed lengths with an empty sequence,
# sq != sk per sequence, GQA, causal (bottom-right per sequence), a window, ALiBi, a sink,
# dropout (its mask equal to the CPU backend's), against float64 per sequence.
VARLEN_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window_alibi_sink": dict(window_size=(4, 1), alibi=True, sink=True),
    "value_head_dim": dict(causal=True, dv=24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_forward_backward(emulated, dtype, name):
    from feature_reference import feature_attention_ref
    kw = dict(VARLEN_CASES[name])
    hq, hkv, d = 4, 2, 40
    dv = kw.pop("dv", d)
    lens_q, lens_k = [5, 0, 17, 9], [11, 3, 17, 6]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = randn(int(cu_q[-1]), hq, d, dtype=dtype)
    k, v = randn(int(cu_k[-1]), hkv, d, dtype=dtype), randn(int(cu_k[-1]), hkv, dv, dtype=dtype)
    dout = randn(int(cu_q[-1]), hq, dv, dtype=dtype)
    slopes = torch.rand(hq) * 0.5 + 0.1 if kw.pop("alibi", False) else None
    inputs = [q, k, v] + ([randn(hq)] if kw.pop("sink", False) else [])
    sink_of = lambda t: t[3] if len(t) > 3 else None  # noqa: E731
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)), alibi_slopes=slopes)

    def run(*t):
        return orchard.flash_attn_varlen_func(*t[:3], cu_q, cu_k, max(lens_q), max(lens_k), alibi_slopes=slopes,
                                              sink=sink_of(t), **kw)

    def ref(*t, upcast=True):
        outs = []
        for i in range(len(lens_q)):
            sl_q, sl_k = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            outs.append(feature_attention_ref(t[0][None, sl_q], t[1][None, sl_k], t[2][None, sl_k], sink=sink_of(t),
                                              upcast=upcast, **ref_kw)[0][0])
        return torch.cat(outs)

    out, grads = _grads(run, *inputs, dout=dout)
    exact, exact_grads = _grads(ref, *(t.double() for t in inputs), dout=dout.double())
    naive, naive_grads = _grads(lambda *t: ref(*t, upcast=False), *inputs, dout=dout)
    check_close_rule(out, exact, naive, ATOL[dtype], "out")
    for g, r, n, what in zip(grads, exact_grads, naive_grads, ("dq", "dk", "dv", "dsink")):
        check_close_rule(g, r, n, ATOL[dtype], what)
    assert len(emulated) == 1


def test_paged_varlen_forward_backward(emulated):
    """block_table in the varlen API on the Metal path: the gathered call runs the Metal varlen
    kernels (one variant compiled) and matches the same call on the packed keys, gradients
    into the paged caches included."""
    hq, hkv, d, page = 4, 2, 40, 16
    lens_q, lens_k = [5, 0, 9], [40, 7, 20]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    table = torch.tensor([[4, 0, 7], [2, 5, 5], [6, 1, 3]], dtype=torch.int32)
    q, kc, vc = randn(int(cu_q[-1]), hq, d), randn(8, page, hkv, d), randn(8, page, hkv, d)
    dout = randn(int(cu_q[-1]), hq, d)
    ids = torch.tensor([int(table[b, j // page]) for b, n in enumerate(lens_k) for j in range(n)])
    pos = torch.tensor([j % page for n in lens_k for j in range(n)])
    paged = lambda q, kc, vc: orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 9, 40, causal=True,  # noqa: E731
                                                             block_table=table)
    packed = lambda q, kc, vc: orchard.flash_attn_varlen_func(q, kc[ids, pos], vc[ids, pos], cu_q, cu_k, 9,  # noqa: E731
                                                              40, causal=True)
    out, grads = _grads(paged, q, kc, vc, dout=dout)
    ref, ref_grads = _grads(packed, q, kc, vc, dout=dout)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=0, rtol=0)
    assert len(emulated) == 1


def test_varlen_rows_past_the_last_offset(emulated):
    """Packed rows past cu_seqlens[-1]: out and the gradients 0, the LSE -inf; the owned rows as
    without the padding (the same rule as the CPU / CUDA backends, test_features.py)."""
    hq, hkv, d = 2, 1, 32
    cu_q, cu_k = torch.tensor([0, 9, 9, 20], dtype=torch.int32), torch.tensor([0, 12, 15, 15], dtype=torch.int32)
    q, k, v = randn(27, hq, d), randn(19, hkv, d), randn(19, hkv, d)
    dout = randn(27, hq, d)
    run = lambda q, k, v: orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 12, causal=True,  # noqa: E731
                                                          return_softmax_lse=True)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = run(qs, ks, vs)
    dq, dk, dv = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert torch.equal(out[20:], torch.zeros_like(out[20:]))
    assert torch.equal(lse[:, 20:], torch.full_like(lse[:, 20:], float("-inf")))
    assert torch.equal(dq[20:], torch.zeros_like(dq[20:]))
    assert torch.equal(dk[15:], torch.zeros_like(dk[15:])) and torch.equal(dv[15:], torch.zeros_like(dv[15:]))
    q2, k2, v2 = (t[:n].clone().requires_grad_() for t, n in ((q, 20), (k, 15), (v, 15)))
    out2, lse2 = run(q2, k2, v2)
    assert torch.equal(out[:20], out2) and torch.equal(lse[:, :20], lse2)
    for g, g2 in zip((dq[:20], dk[:15], dv[:15]), torch.autograd.grad(out2, (q2, k2, v2), dout[:20])):
        assert torch.equal(g, g2)
    assert len(emulated) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_mask_matches_cpu_backend(emulated, causal):
    hq, hkv, d = 2, 1, 32
    cu_q, cu_k = torch.tensor([0, 7, 7, 20], dtype=torch.int32), torch.tensor([0, 9, 12, 20], dtype=torch.int32)
    q, k, v = randn(20, hq, d), randn(20, hkv, d), randn(20, hkv, d)
    args = (1.0 / d ** 0.5, causal, False, 0.3, 0, 0, True, False, "orchard.flash_attn_varlen_func",
            torch.tensor([0x5EED, 3], dtype=torch.int64), -1, -1, 0.0, None, None, None, cu_q, cu_k, 13, 9)
    out, lse, mask = orchard._ops.flash_attn_forward(q, k, v, *args)
    with _mps.use_compiler(None):  # the CPU backend, same key
        cpu_out, cpu_lse, cpu_mask = orchard._ops.flash_attn_forward(q, k, v, *args)
    assert mask.shape == (3, hq, 13, 9) and torch.equal(mask, cpu_mask)
    torch.testing.assert_close(out, cpu_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, cpu_lse, atol=2e-5, rtol=0)


def test_score_mod_arguments_are_checked_before_anything_runs(emulated):
    q = randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"^op: alibi_slopes must have shape \(2,\) or \(1, 2\)"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None, (-1, -1, 0.0, torch.ones(3)))
    with pytest.raises(ValueError, match=r"^op: alibi_slopes must be float32"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None,
                     (-1, -1, 0.0, torch.ones(2, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"^op: window_size values must be >= -1"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None, (-3, -1))
    with pytest.raises(ValueError, match=r"^op: softcap must be a finite value >= 0"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None, (-1, -1, -1.0))
    with pytest.raises(ValueError, match=r"^op: attn_mask must be bool or float32, got torch.int32"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None,
                     (-1, -1, 0.0, None, None, torch.ones(1, 2, 4, 4, dtype=torch.int32)))
    cu = torch.tensor([0, 3, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^op: cu_seqlens_q must start >= 0 and be non-decreasing"):
        _mps.forward(q[0], q[0], q[0], 0.25, False, False, 0.0, 0, 0, False, "op", None,
                     (-1, -1, 0.0, None, None, None, cu, cu, 4, 4))
    with pytest.raises(NotImplementedError, match=r"^op: attn_mask cannot be combined with varlen"):
        _mps.forward(q[0], q[0], q[0], 0.25, False, False, 0.0, 0, 0, False, "op", None,
                     (-1, -1, 0.0, None, None, torch.ones(1, 2, 4, 4, dtype=torch.bool), cu, cu, 4, 4))
    with pytest.raises(ValueError, match=r"^op: attn_mask of shape \(1, 2, 4, 3\) does not broadcast"):
        _mps.forward(q, q, q, 0.25, False, False, 0.0, 0, 0, False, "op", None,
                     (-1, -1, 0.0, None, None, torch.ones(1, 2, 4, 3, dtype=torch.bool)))
    assert emulated == []


def test_compile_failure_names_variant_and_compiler_message():
    def broken(source):
        raise RuntimeError("program_source:12:3: error: use of undeclared identifier 'x'")

    q = randn(1, 4, 2, 16, dtype=torch.bfloat16)
    with _mps.use_compiler(broken):
        with pytest.raises(RuntimeError, match=r"orchard.flash_attn_func: compiling the Metal kernels of variant "
                                               r"metal_bf16_d32 failed: program_source:12:3: error"):
            orchard.flash_attn_func(q, q, q)


def test_old_torch_is_refused_with_its_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(RuntimeError, match=r"^orchard.flash_attn_func: .*torch >= 2.7.*this is torch 2.6.0"):
        _mps._compile_shader("orchard.flash_attn_func")


def test_stand_in_checks_buffer_dtypes_like_the_kernel_signatures():
    _, source = orchard._C.metal_variant("float16", 64)
    sigs = _kernel_signatures(source)
    h, f, u8, i32, i64 = torch.float16, torch.float32, torch.uint8, torch.int32, torch.int64
    assert sigs == {"orchard_fwd": [h, h, h, h, f, u8, i64, i64, f, f, u8, h, f, i32, i32],
                    "orchard_bwd_dot": [h, h, f, i64, i32, i32],
                    "orchard_bwd_dq": [h, h, h, h, f, f, h, i64, i64, f, u8, h, f, i32, i32],
                    "orchard_bwd_dkdv": [h, h, h, h, f, f, h, h, i64, i64, f, u8, h, f, i32, i32]}
    lib = EmulatedLibrary(source)
    with pytest.raises(AssertionError):  # lse passed where out belongs
        lib.orchard_bwd_dot(torch.zeros(4), torch.zeros(4, dtype=h), torch.zeros(4), torch.zeros(4, dtype=i64),
                            threads=128, group_size=128)
