"""orchard.jax.flash_attention (XLA FFI custom call + custom_vjp) on the CPU
against jax.nn.dot_product_attention and a jnp reference: forward, grad, jit,
vmap, GQA, windows, softcap, bf16. The tests marked `cuda` run the CUDA
handlers on a GPU (jax with its CUDA plugin and an orchard build with the CUDA
backend) against a float64 NumPy reference, jax.nn.dot_product_attention and the
CPU handlers; they skip without a GPU, a CUDA jaxlib or orchard's CUDA backend
(dev/jax_cuda_check.sh runs them on the GPU machine)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from jax_support import jax, jnp, ojax, cpu_normal, visible as _visible  # (skips this module without jax)


def _qkv(b=2, sq=33, sk=33, h=4, hkv=2, d=16, dtype=jnp.float32, seed=0):
    return cpu_normal(seed, (b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d), dtype=dtype)


def _ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """float32 jnp reference, bottom-right aligned masks (flash-attn)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    ok = jnp.asarray(_visible(*s.shape[-2:], causal, window))
    s = jnp.where(ok, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_jax_dot_product_attention(causal):
    q, k, v = _qkv()
    out = ojax.flash_attention(q, k, v, causal=causal)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


def test_grad_jit_matches_reference():
    q, k, v = _qkv(sq=20, sk=29)  # seqlen_q != seqlen_k: bottom-right causal

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

    mine = jax.jit(jax.grad(loss(lambda q, k, v: ojax.flash_attention(q, k, v, causal=True)),
                            argnums=(0, 1, 2)))
    want = jax.grad(loss(lambda q, k, v: _ref(q, k, v, causal=True)), argnums=(0, 1, 2))
    for got, ref in zip(mine(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-5)


def test_window_softcap_scale_forward_and_grad():
    q, k, v = _qkv(h=4, hkv=4)
    kw = dict(window_size=(5, 2), softcap=2.0, softmax_scale=0.3)
    f = lambda q, k, v: ojax.flash_attention(q, k, v, **kw)  # noqa: E731
    r = lambda q, k, v: _ref(q, k, v, window=(5, 2), softcap=2.0, scale=0.3)  # noqa: E731
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(r(q, k, v)), atol=2e-5)
    g1 = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: jnp.sum(r(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_vmap_over_an_extra_axis():
    q, k, v = (jnp.stack([x, x * 0.5]) for x in _qkv(b=1, sq=9, sk=9))  # (2, 1, 9, h, d)
    out = jax.vmap(lambda q, k, v: ojax.flash_attention(q, k, v, causal=True))(q, k, v)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(out[i]),
                                   np.asarray(_ref(q[i], k[i], v[i], causal=True)), atol=2e-5)


def test_bfloat16_within_flash_attn_rule():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out = ojax.flash_attention(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16
    exact = _ref(q, k, v, causal=True)
    naive = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # bf16 XLA attention
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
    naive_err = float(jnp.max(jnp.abs(naive.astype(jnp.float32) - exact)))
    assert err <= 2 * naive_err + 1e-2, (err, naive_err)


def test_bad_input_raises():
    q, k, v = _qkv(h=3, hkv=2)
    with pytest.raises(Exception, match="orchard.jax.flash_attention"):
        jax.block_until_ready(ojax.flash_attention(q, k, v))
    with pytest.raises(ValueError, match="4-D"):
        ojax.flash_attention(q[0], k[0], v[0])


def test_log_shows_cpu_backend_and_no_staged_copies(tmp_path, monkeypatch):
    """XLA's buffers are read in place: the kernel log says staged=0 (fwd and bwd)."""
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    q, k, v = _qkv(sq=16, sk=16)
    jax.block_until_ready(jax.grad(lambda q: jnp.sum(ojax.flash_attention(q, k, v, causal=True)))(q))
    lines = _log_lines(tmp_path)
    assert any(ln.startswith("FWD") for ln in lines) and any(ln.startswith("BWD") for ln in lines), lines
    for ln in lines:
        assert "op=orchard.jax.flash_attention" in ln and "backend=cpu" in ln and " staged=0 " in ln, ln


def _log_lines(log_dir):
    lines = []
    for f in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, f)) as fh:
            lines += [ln.strip() for ln in fh if ln.strip()]
    return lines


# ---------------------------------------------------------------------------------------
# CUDA: the same custom calls compiled for the GPU (XLA picks the CUDA handlers).

def _cuda_plugin():
    import importlib.util
    for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            pass
    return None


@pytest.fixture
def gpu():
    try:
        devs = jax.devices("gpu")
        why = "no GPU devices"
    except RuntimeError as e:
        devs, why = [], str(e)
    if not devs:
        import torch
        plugin = _cuda_plugin()
        if plugin and torch.cuda.is_available():  # should work: say why it did not
            pytest.fail(f"jax's CUDA plugin ({plugin}) is installed and torch sees a GPU, but jax "
                        f"has no GPU backend: {why}")
        pytest.skip(f"jax has no GPU backend (install jax[cuda13] or jax[cuda12]): {why}")
    if not ojax.cuda_compiled():
        pytest.skip("this orchard build has no CUDA backend (ORCHARD_CUDA=OFF)")
    return devs[0]


def _np_qkv(b=2, sq=128, sk=160, h=8, hkv=2, d=64, seed=0):
    """float64 NumPy inputs, rounded through bfloat16 so every dtype sees the same values."""
    rng = np.random.default_rng(seed)
    arrs = [rng.standard_normal(shape) for shape in ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d))]
    return [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64) for a in arrs]


def _np_attention(q, k, v, dout=None, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """float64 NumPy attention on BSHD arrays (bottom-right masks, GQA); returns out,
    and with dout also (dq, dk, dv) by the analytic softmax-attention gradients."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rep = h // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    t = None
    if softcap > 0:
        t = np.tanh(s / softcap)
        s = softcap * t
    ok = _visible(sq, sk, causal, window)
    assert ok.any(axis=1).all(), "reference: a fully masked row (pick other shapes)"
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    if dout is None:
        return out
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if t is not None:
        ds = ds * (1 - t * t)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale

    def fold(x):  # sum the gradients of the query heads that share a kv head
        return x.reshape(b, sk, hkv, rep, -1).sum(3)

    return out, dq, fold(dk), fold(dv)


def _naive(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """The same attention in the inputs' dtype with plain jnp (true fp32 matmuls for
    float32): the low-precision baseline of flash-attn's tolerance rule."""
    dt = q.dtype
    hp = jax.lax.Precision.HIGHEST
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hp) * jnp.asarray(scale, dt)).astype(dt)
    if softcap > 0:
        s = (softcap * jnp.tanh(s / softcap)).astype(dt)
    ok = jnp.asarray(_visible(*s.shape[-2:], causal, window))
    p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1).astype(dt)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=hp).astype(dt)


_GPU_DTYPES = {"bfloat16": (jnp.bfloat16, 2e-3), "float16": (jnp.float16, 2e-4), "float32": (jnp.float32, 2e-5)}


def _check_rule(got, ref, naive, atol, what):
    """flash-attn's rule: max|got - ref| <= 2 * max|naive - ref| + atol."""
    got, naive = np.asarray(got, np.float64), np.asarray(naive, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err, base = np.abs(got - ref).max(), np.abs(naive - ref).max()
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 * naive error {base:.3e} + {atol:.1e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(_GPU_DTYPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_forward_matches_float64_reference(gpu, dtype, causal, d):
    jdt, atol = _GPU_DTYPES[dtype]
    qn, kn, vn = _np_qkv(d=d)  # GQA 8/2, seqlen_q 128 != seqlen_k 160 (bottom-right causal)
    q, k, v = (jax.device_put(jnp.asarray(a, jdt), gpu) for a in (qn, kn, vn))
    out = ojax.flash_attention(q, k, v, causal=causal)
    assert out.dtype == jdt and out.devices() == {gpu}
    ref = _np_attention(qn, kn, vn, causal=causal)
    _check_rule(out, ref, _naive(q, k, v, causal=causal), atol, f"{dtype} out")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(_GPU_DTYPES))
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_fwd_bwd_vs_jax_dot_product_attention(gpu, dtype, causal):
    """Orchard's forward and gradients on the GPU are at least as close to the float64
    truth as jax.nn.dot_product_attention in the same dtype (flash-attn's rule), GQA 8/2,
    under jit; seqlen_q == seqlen_k, where both libraries' causal masks agree."""
    jdt, atol = _GPU_DTYPES[dtype]
    qn, kn, vn = _np_qkv(b=2, sq=192, sk=192, h=8, hkv=2, d=64, seed=8)
    dn = np.random.default_rng(9).standard_normal(qn.shape)
    q, k, v, w = (jax.device_put(jnp.asarray(a, jdt), gpu) for a in (qn, kn, vn, dn))
    dn = np.asarray(w, np.float64)

    def fwd_and_grads(f):
        def loss(q, k, v):
            return jnp.sum((f(q, k, v) * w).astype(jnp.float32))
        return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    out, grads = fwd_and_grads(lambda q, k, v: ojax.flash_attention(q, k, v, causal=causal))
    dpa_out, dpa_grads = fwd_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))
    ref_out, *ref = _np_attention(qn, kn, vn, dn, causal=causal)
    assert out.dtype == jdt and out.devices() == {gpu}
    _check_rule(out, ref_out, dpa_out, atol, f"{dtype} out")
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref, dpa_grads):
        _check_rule(g, r, n, 4 * atol, f"{dtype} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(_GPU_DTYPES))
def test_cuda_grad_jit_matches_float64_reference(gpu, dtype):
    jdt, atol = _GPU_DTYPES[dtype]
    qn, kn, vn = _np_qkv(b=2, sq=96, sk=130, h=4, hkv=2, d=64, seed=1)
    dn = np.random.default_rng(2).standard_normal(qn.shape)
    q, k, v, w = (jax.device_put(jnp.asarray(a, jdt), gpu) for a in (qn, kn, vn, dn))
    dn = np.asarray(w, np.float64)  # the cotangent as the GPU sees it

    def loss(f):  # d loss / d out = w
        return lambda q, k, v: jnp.sum((f(q, k, v) * w).astype(jnp.float32))

    got = jax.jit(jax.grad(loss(lambda q, k, v: ojax.flash_attention(q, k, v, causal=True)),
                           argnums=(0, 1, 2)))(q, k, v)
    naive = jax.jit(jax.grad(loss(lambda q, k, v: _naive(q, k, v, causal=True)), argnums=(0, 1, 2)))(q, k, v)
    _, *ref = _np_attention(qn, kn, vn, dn, causal=True)
    for name, g, r, n in zip(("dq", "dk", "dv"), got, ref, naive):
        assert g.dtype == jdt and g.devices() == {gpu}
        _check_rule(g, r, n, 4 * atol, f"{dtype} {name}")


@pytest.mark.cuda
def test_cuda_window_softcap_scale_match_float64_reference(gpu):
    jdt, atol = _GPU_DTYPES["bfloat16"]
    qn, kn, vn = _np_qkv(b=1, sq=200, sk=200, h=4, hkv=4, d=64, seed=3)
    dn = np.random.default_rng(4).standard_normal(qn.shape)
    q, k, v, w = (jax.device_put(jnp.asarray(a, jdt), gpu) for a in (qn, kn, vn, dn))
    dn = np.asarray(w, np.float64)
    kw = dict(window=(37, 5), softcap=3.0, scale=0.2)
    f = lambda q, k, v: ojax.flash_attention(q, k, v, window_size=kw["window"],  # noqa: E731
                                             softcap=kw["softcap"], softmax_scale=kw["scale"])
    out, vjp = jax.vjp(f, q, k, v)
    naive_out, naive_vjp = jax.vjp(lambda q, k, v: _naive(q, k, v, **kw), q, k, v)
    ref_out, *ref = _np_attention(qn, kn, vn, dn, **kw)
    _check_rule(out, ref_out, naive_out, atol, "out")
    for name, g, r, n in zip(("dq", "dk", "dv"), vjp(w), ref, naive_vjp(w)):
        _check_rule(g, r, n, 4 * atol, name)


@pytest.mark.cuda
def test_cuda_matches_cpu_handler(gpu):
    """float32: the CUDA handlers and the CPU handlers agree (forward and grad)."""
    cpu = jax.devices("cpu")[0]
    qn, kn, vn = _np_qkv(b=2, sq=64, sk=80, h=4, hkv=1, d=32, seed=5)

    def run(dev):
        q, k, v = (jax.device_put(jnp.asarray(a, jnp.float32), dev) for a in (qn, kn, vn))
        f = lambda q, k, v: ojax.flash_attention(q, k, v, causal=True, window_size=(20, 0))  # noqa: E731
        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
        assert out.devices() == {dev}
        return [np.asarray(x, np.float64) for x in (out, *grads)]

    for name, a, b in zip(("out", "dq", "dk", "dv"), run(gpu), run(cpu)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.cuda
def test_cuda_chained_calls_on_xla_stream_and_vmap(gpu):
    """Calls that consume each other's outputs inside one jit (and under vmap) see
    finished inputs: the kernels run on XLA's stream, in XLA's order."""
    qn, kn, vn = _np_qkv(b=1, sq=256, sk=256, h=4, hkv=4, d=64, seed=6)
    q, k, v = (jax.device_put(jnp.asarray(a, jnp.float32), gpu) for a in (qn, kn, vn))

    @jax.jit
    def chain(q, k, v):
        x = q
        for _ in range(4):
            x = ojax.flash_attention(x * 2.0 + 1.0, k, v, causal=True) + q
        return x

    x = qn
    for _ in range(4):
        x = _np_attention(x * 2.0 + 1.0, kn, vn, causal=True) + qn
    np.testing.assert_allclose(np.asarray(chain(q, k, v), np.float64), x, atol=1e-4, rtol=0)

    stacked = [jnp.stack([a, a * 0.5]) for a in (q, k, v)]
    out = jax.vmap(lambda q, k, v: ojax.flash_attention(q, k, v, causal=True))(*stacked)
    for i, s in enumerate((1.0, 0.5)):
        ref = _np_attention(qn * s, kn * s, vn * s, causal=True)
        np.testing.assert_allclose(np.asarray(out[i], np.float64), ref, atol=1e-4, rtol=0)


@pytest.mark.cuda
def test_cuda_debug_log_names_the_cuda_kernels(gpu, tmp_path, monkeypatch):
    """ORCHARD_DEBUG_FLASH_ATN on the JAX CUDA path: FWD and BWD lines from the CUDA
    backend with nothing staged, results as with the log off. (It once crashed the
    process: the core's log lines were built with iostreams, see core/logging.h.)"""
    qn, kn, vn = _np_qkv(b=1, sq=64, sk=64, h=4, hkv=2, d=64, seed=7)
    q, k, v = (jax.device_put(jnp.asarray(a, jnp.bfloat16), gpu) for a in (qn, kn, vn))
    loss = lambda q: jnp.sum(ojax.flash_attention(q, k, v, causal=True).astype(jnp.float32))
    ref_out, ref_grad = jax.block_until_ready(ojax.flash_attention(q, k, v, causal=True)), jax.grad(loss)(q)
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    out = jax.block_until_ready(ojax.flash_attention(q, k, v, causal=True))
    grad = jax.block_until_ready(jax.grad(loss)(q))
    lines = _log_lines(tmp_path)
    assert any(ln.startswith("FWD") for ln in lines) and any(ln.startswith("BWD") for ln in lines), lines
    for ln in lines:
        assert "op=orchard.jax.flash_attention" in ln and "backend=cuda" in ln and " staged=0 " in ln, ln
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32))
