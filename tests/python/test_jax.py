"""orchard.jax.flash_attention (XLA FFI custom call + custom_vjp) on the CPU
against jax.nn.dot_product_attention and a jnp reference: forward, grad, jit,
vmap, GQA, windows, softcap, bf16."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

try:
    import orchard.jax as ojax  # noqa: E402
except ImportError as e:  # orchard built before jax was installed
    pytest.skip(f"orchard.jax unavailable: {e}", allow_module_level=True)


def _qkv(b=2, sq=33, sk=33, h=4, hkv=2, d=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, sq, h, d), dtype)
    k = jax.random.normal(ks[1], (b, sk, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, sk, hkv, d), dtype)
    return q, k, v


def _ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """float32 jnp reference, bottom-right aligned masks (flash-attn)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    sq, sk = s.shape[-2:]
    i = jnp.arange(sq)[:, None] + (sk - sq)
    j = jnp.arange(sk)[None, :]
    ok = jnp.ones((sq, sk), bool)
    if causal:
        ok &= j <= i
    if window[0] >= 0:
        ok &= j >= i - window[0]
    if window[1] >= 0:
        ok &= j <= i + window[1]
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
