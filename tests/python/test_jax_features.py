"""orchard.jax's flash-attn features on the CPU handlers: ALiBi, sinks, an additive
bias or boolean mask (broadcast, read in place), dropout from a jax.random key,
packed sequences (flash_attention_varlen) and the deterministic backward, each
forward and gradient against a jnp reference written from the definitions (and
jax.nn.dot_product_attention where it has the feature); the dropout mask against
the torch path's mask for the same seed and offset. A cuda-marked test runs the
same calls through the CUDA handlers against the CPU ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jax_support import CPU, cpu_normal, jax, jnp, ojax, visible  # (skips this module without jax)

_OP = "orchard.jax.flash_attention"


def _qkv(b=2, sq=19, sk=27, h=4, hkv=2, d=16, seed=0):
    return cpu_normal(seed, (b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d))


def _ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None, alibi=None, sink=None,
         bias=None, mask=None, keep=None, dropout_p=0.0):
    """float32 jnp attention from the definitions (bottom-right aligned masks, flash-attn's
    ALiBi -slope * |i + sk - sq - j|, a sink logit in each row's denominator, the bias added
    last, dropout as keep / (1 - p) on the probabilities). Fully masked rows give 0."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    sq, sk = q.shape[1], k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    i = jnp.arange(sq)[:, None] + (sk - sq)
    j = jnp.arange(sk)[None, :]
    if alibi is not None:
        slopes = jnp.reshape(alibi, (-1, alibi.shape[-1]))[:, :, None, None]
        s = s - slopes * jnp.abs(i - j)
    if bias is not None:
        s = s + bias
    ok = jnp.asarray(visible(sq, sk, causal, window))
    ok = ok if mask is None else ok & mask
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sink is not None:
        m = jnp.maximum(m, sink[None, :, None, None])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    den = jnp.sum(e, axis=-1, keepdims=True)
    if sink is not None:
        den = den + jnp.exp(sink[None, :, None, None] - m)
    p = jnp.where(den > 0, e / jnp.where(den > 0, den, 1.0), 0.0)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _close(got, want, atol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0)


def _check_fwd_and_grads(mine, ref, args, argnums, atol=2e-5, gatol=1e-4):
    """mine / ref: functions of args; forward and the gradient of sum(sin(out)) in argnums."""
    _close(mine(*args), ref(*args), atol)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(mine), argnums=argnums))(*args)
    want = jax.grad(loss(ref), argnums=argnums)(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        _close(g, w, gatol)


@pytest.mark.parametrize("slopes_shape", ["h", "bh"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(slopes_shape, causal):
    q, k, v = _qkv()
    shape = (4,) if slopes_shape == "h" else (2, 4)
    alibi = jax.random.uniform(jax.random.PRNGKey(5), shape, minval=0.05, maxval=0.6)
    _check_fwd_and_grads(lambda q, k, v: ojax.flash_attention(q, k, v, causal=causal, alibi_slopes=alibi),
                         lambda q, k, v: _ref(q, k, v, causal=causal, alibi=alibi), (q, k, v), (0, 1, 2))


@pytest.mark.parametrize("causal", [False, True])
def test_sink_and_its_gradient(causal):
    q, k, v = _qkv(h=4, hkv=1)
    sink = jnp.array([0.5, -1.0, 2.5, 0.0], jnp.float32)
    _check_fwd_and_grads(lambda q, k, v, s: ojax.flash_attention(q, k, v, causal=causal, sink=s),
                         lambda q, k, v, s: _ref(q, k, v, causal=causal, sink=s), (q, k, v, sink), (0, 1, 2, 3))


@pytest.mark.parametrize("bias_shape", [(2, 4, 19, 27), (1, 4, 19, 27), (2, 1, 1, 27), (19, 27)])
def test_bias_broadcast_and_its_gradient(bias_shape):
    """jax.nn.dot_product_attention's bias: any broadcastable shape; the gradient comes back
    in the bias's own shape (summed over the broadcast dims)."""
    q, k, v = _qkv()
    (bias,) = cpu_normal(3, bias_shape)
    _close(ojax.flash_attention(q, k, v, bias=bias), jax.nn.dot_product_attention(q, k, v, bias=bias), 2e-5)
    _check_fwd_and_grads(lambda q, k, v, b: ojax.flash_attention(q, k, v, bias=b),
                         lambda q, k, v, b: _ref(q, k, v, bias=jnp.reshape(b, (1,) * (4 - b.ndim) + b.shape)),
                         (q, k, v, bias), (0, 1, 2, 3))


def test_bias_gradient_through_softcap_alibi_window_and_causal():
    """The bias's gradient recomputes P with every score modifier the kernel applied."""
    q, k, v = _qkv(sq=23, sk=23)
    (bias,) = cpu_normal(4, (1, 4, 23, 23))
    alibi = jnp.linspace(0.1, 0.4, 4)
    kw = dict(softcap=3.0, window=(7, 0), scale=0.4, alibi=alibi)
    _check_fwd_and_grads(
        lambda q, k, v, b: ojax.flash_attention(q, k, v, bias=b, softcap=3.0, window_size=(7, 0), causal=True,
                                                softmax_scale=0.4, alibi_slopes=alibi),
        lambda q, k, v, b: _ref(q, k, v, bias=b, causal=True, **kw), (q, k, v, bias), (0, 1, 2, 3))


def test_bool_mask_with_fully_masked_rows():
    q, k, v = _qkv(b=2, sq=6, sk=9, h=2, hkv=2)
    mask = np.array(jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (2, 1, 6, 9)))
    mask[0, 0, 3] = False  # a row that sees nothing: 0 out, 0 gradient
    mask = jnp.asarray(mask)
    out = ojax.flash_attention(q, k, v, mask=mask)
    assert float(jnp.max(jnp.abs(out[0, 3]))) == 0.0
    _check_fwd_and_grads(lambda q, k, v: ojax.flash_attention(q, k, v, mask=mask),
                         lambda q, k, v: _ref(q, k, v, mask=mask), (q, k, v), (0, 1, 2))
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)  # NaN-free where some key is visible
    _close(out[1], want[1], 2e-5)


def test_mask_and_bias_together():
    q, k, v = _qkv()
    (bias,) = cpu_normal(6, (1, 4, 19, 27))
    mask = jax.random.bernoulli(jax.random.PRNGKey(7), 0.8, (2, 1, 19, 27)).at[:, :, :, 0].set(True)
    _close(ojax.flash_attention(q, k, v, bias=bias, mask=mask),
           jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask), 2e-5)
    _check_fwd_and_grads(lambda q, k, v, b: ojax.flash_attention(q, k, v, bias=b, mask=mask),
                         lambda q, k, v, b: _ref(q, k, v, bias=b, mask=mask), (q, k, v, bias), (0, 1, 2, 3))


def _dropout_keep(q, k, v, key, dropout_p, causal):
    """The torch path's keep-mask (b, h, sq, sk) for the seed / offset orchard.jax draws from key."""
    torch = pytest.importorskip("torch")
    from orchard import _ops
    bits = np.asarray(jax.random.bits(key, (4,), jnp.uint32))
    rng_state = torch.from_numpy(bits.view(np.int64).copy())
    t = [torch.from_numpy(np.asarray(x)) for x in (q, k, v)]
    _, _, mask = _ops.flash_attn_forward(*t, 1 / math.sqrt(q.shape[-1]), causal, False, dropout_p, 0, 0, True,
                                         False, "test", rng_state)
    return jnp.asarray(mask.numpy().astype(np.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_follows_the_key(causal):
    q, k, v = _qkv()
    key = jax.random.PRNGKey(11)
    p = 0.25
    keep = _dropout_keep(q, k, v, key, p, causal)
    assert 0.6 < float(jnp.mean(keep)) < 0.9
    _check_fwd_and_grads(
        lambda q, k, v: ojax.flash_attention(q, k, v, causal=causal, dropout_p=p, dropout_rng=key),
        lambda q, k, v: _ref(q, k, v, causal=causal, keep=keep, dropout_p=p), (q, k, v), (0, 1, 2))
    same = ojax.flash_attention(q, k, v, dropout_p=p, dropout_rng=key)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(ojax.flash_attention(q, k, v, dropout_p=p,
                                                                                    dropout_rng=key)))
    other = ojax.flash_attention(q, k, v, dropout_p=p, dropout_rng=jax.random.PRNGKey(12))
    assert float(jnp.max(jnp.abs(other - same))) > 0.1
    # Under jit the key is a traced value: each key its own mask, without recompiling.
    f = jax.jit(lambda q, key: ojax.flash_attention(q, k, v, dropout_p=p, dropout_rng=key))
    np.testing.assert_array_equal(np.asarray(f(q, key)), np.asarray(same))
    assert float(jnp.max(jnp.abs(f(q, jax.random.PRNGKey(12)) - other))) == 0.0


def _pack(x, lens, maxlen):
    return jnp.concatenate([x[i, :n] for i, n in enumerate(lens)], axis=0) if lens else x[:0, 0]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_each_sequence_alone(causal):
    """Packed sequences (one empty) give each sequence's own attention, forward and grads."""
    lq, lk = [5, 0, 11, 3], [7, 4, 9, 3]
    b, h, hkv, d = 4, 4, 2, 16
    q, k, v = cpu_normal(8, (b, 11, h, d), (b, 9, hkv, d), (b, 9, hkv, d))
    qp, kp, vp = _pack(q, lq, 11), _pack(k, lk, 9), _pack(v, lk, 9)
    cu_q = jnp.asarray(np.concatenate([[0], np.cumsum(lq)]), jnp.int32)
    cu_k = jnp.asarray(np.concatenate([[0], np.cumsum(lk)]), jnp.int32)
    alibi = jnp.linspace(0.1, 0.5, h)
    sink = jnp.array([0.3, -0.2, 1.0, 0.0])

    def mine(qp, kp, vp):
        return ojax.flash_attention_varlen(qp, kp, vp, cu_q, cu_k, 11, 9, causal=causal, alibi_slopes=alibi,
                                           sink=sink, softcap=5.0)

    def ref(qp, kp, vp):
        outs = []
        for i in range(b):
            qs = qp[int(cu_q[i]):int(cu_q[i + 1])][None]
            ks, vs = (t[int(cu_k[i]):int(cu_k[i + 1])][None] for t in (kp, vp))
            if qs.shape[1]:
                outs.append(_ref(qs, ks, vs, causal=causal, alibi=alibi, sink=sink, softcap=5.0)[0])
        return jnp.concatenate(outs, axis=0)

    _check_fwd_and_grads(mine, ref, (qp, kp, vp), (0, 1, 2))


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v = _qkv(b=1, sq=130, sk=130, h=2, hkv=2, d=32)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ojax.flash_attention(q, k, v, causal=True, deterministic=True)
                                                 ** 2), argnums=(0, 1, 2)))
    for a, b in zip(g(q, k, v), g(q, k, v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_with_bias_and_sink():
    q, k, v = (jnp.stack([x, 0.5 * x]) for x in _qkv(b=1, sq=8, sk=8))
    (bias,) = cpu_normal(9, (1, 4, 8, 8))
    sink = jnp.array([0.1, 0.2, -0.3, 0.4])
    out = jax.vmap(lambda q, k, v: ojax.flash_attention(q, k, v, bias=bias, sink=sink, causal=True))(q, k, v)
    for i in range(2):
        _close(out[i], _ref(q[i], k[i], v[i], bias=bias, sink=sink, causal=True), 2e-5)


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_any_finite_scale_is_honoured(scale):
    """A zero or negative softmax_scale is the scale (the torch path's and SDPA's rule), not the
    default: the forward and the bias's gradient (which recomputes P with it) both use it."""
    q, k, v = _qkv()
    (bias,) = cpu_normal(2, (1, 4, 19, 27))
    _check_fwd_and_grads(lambda q, k, v, b: ojax.flash_attention(q, k, v, bias=b, softmax_scale=scale),
                         lambda q, k, v, b: _ref(q, k, v, bias=b, scale=scale), (q, k, v, bias), (0, 1, 2, 3))


def test_bad_feature_input_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{_OP}: dropout_p > 0 needs dropout_rng"):
        ojax.flash_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        ojax.flash_attention(q, k, v, bias=jnp.zeros((3, 4, 19, 27)))
    with pytest.raises(ValueError, match="mask must be boolean"):  # a 0/1 int mask is not a bias
        ojax.flash_attention(q, k, v, mask=jnp.ones((19, 27), jnp.int32))
    with pytest.raises(ValueError, match="at most 4 dims"):
        ojax.flash_attention(q, k, v, bias=jnp.zeros((1, 1, 4, 19, 27)))
    with pytest.raises(ValueError, match="dropout with a float bias"):
        ojax.flash_attention(q, k, v, bias=jnp.zeros((19, 27)), dropout_p=0.1, dropout_rng=jax.random.PRNGKey(0))
    with pytest.raises(Exception, match=_OP):  # the core's check, where the call runs
        jax.block_until_ready(ojax.flash_attention(q, k, v, alibi_slopes=jnp.ones((3,))))
    with pytest.raises(Exception, match=_OP):
        jax.block_until_ready(ojax.flash_attention(q, k, v, sink=jnp.ones((2,))))
    cu = jnp.array([0, 10, 19], jnp.int32)
    with pytest.raises(ValueError, match="1-D int32"):
        ojax.flash_attention_varlen(q[0], k[0], v[0], cu.astype(jnp.float32), cu, 10, 10)
    with pytest.raises(ValueError, match="one length"):
        ojax.flash_attention_varlen(q[0], k[0], v[0], cu, cu[:2], 10, 10)
    with pytest.raises(Exception, match=_OP):  # a total past the packed rows: the core's value check
        jax.block_until_ready(ojax.flash_attention_varlen(q[0], k[0], v[0], jnp.array([0, 10, 40], jnp.int32),
                                                          cu, 30, 10))


# ---------------------------------------------------------------------------------------
# CUDA: the same feature calls through the CUDA handlers, against the CPU handlers.

@pytest.mark.cuda
def test_cuda_features_match_cpu_handlers():
    try:
        gpu = jax.devices("cuda")[0]
    except RuntimeError:
        pytest.skip("no CUDA device for jax")
    if not ojax.cuda_compiled():
        pytest.skip("this orchard build has no CUDA backend")
    q, k, v = _qkv(b=2, sq=70, sk=90, h=4, hkv=2, d=64)
    (bias,) = cpu_normal(3, (1, 4, 70, 90))
    alibi, sink = jnp.linspace(0.1, 0.4, 4), jnp.array([0.5, -1.0, 2.0, 0.0])
    key = jax.random.PRNGKey(1)
    # Each call's arrays go to the device of the run (q, k, v, then its extras): jax refuses a
    # call that mixes arrays committed to different devices.
    calls = {
        "alibi+sink": (lambda q, k, v, a, s: ojax.flash_attention(q, k, v, causal=True, alibi_slopes=a, sink=s),
                       (alibi, sink)),
        "bias": (lambda q, k, v, bias: ojax.flash_attention(q, k, v, bias=bias), (bias,)),
        "dropout": (lambda q, k, v, key: ojax.flash_attention(q, k, v, dropout_p=0.2, dropout_rng=key), (key,)),
    }
    for name, (f, extras) in calls.items():
        loss = jax.grad(lambda q, k, v, *ex: jnp.sum(jnp.sin(f(q, k, v, *ex))), argnums=(0, 1, 2))
        on_cpu = [jax.device_put(x, CPU) for x in (q, k, v, *extras)]
        cpu = (f(*on_cpu), *loss(*on_cpu))
        on_gpu = [jax.device_put(x, gpu) for x in (q, k, v, *extras)]
        cuda = (f(*on_gpu), *loss(*on_gpu))
        for a, b in zip(cuda, cpu):
            _close(jax.device_get(a), b, 2e-3 if name != "dropout" else 3e-3)
