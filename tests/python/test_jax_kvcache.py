"""orchard.jax.flash_attn_with_kvcache on the CPU handler against the torch entry
(orchard.flash_attn_with_kvcache, itself tested against a float64 reference in
test_kvcache.py) on the same data: the output, the LSE and both caches after the
append, for contiguous and paged caches, rotary, cache_batch_idx, cache_leftpad, GQA,
windows, softcap, ALiBi and split-KV; a jitted decode loop with the caches donated;
bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jax_support import CPU as _CPU, jax, jnp, ojax  # (skips this module without jax)

import orchard



def _case(paged, b=3, sq=2, hq=4, hkv=2, d=32, capacity=96, s_new=2, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    page = 16 if paged else None
    if paged:
        blocks = b * capacity // page
        kc, vc = f(blocks + 2, page, hkv, d), f(blocks + 2, page, hkv, d)
        table = rng.permutation(blocks + 2)[:blocks].astype(np.int32).reshape(b, -1)
    else:
        kc, vc, table = f(b, capacity, hkv, d), f(b, capacity, hkv, d), None
    seqlens = rng.integers(10, capacity - s_new, size=b).astype(np.int32)
    rot = rng.uniform(0, 6.3, size=(capacity + 8, 8)).astype(np.float32)
    return dict(q=f(b, sq, hq, d), k_cache=kc, v_cache=vc, k=f(b, s_new, hkv, d), v=f(b, s_new, hkv, d),
                cache_seqlens=seqlens, block_table=table, rotary_cos=np.cos(rot), rotary_sin=np.sin(rot))


def _run_both(arrays, **kw):
    """(torch results, jax results): out, lse, k_cache, v_cache as NumPy arrays. NumPy arrays among
    arrays and kw go to each entry as its own arrays (fresh copies of the caches for each)."""
    to_torch = lambda a: torch.from_numpy(a.copy()) if isinstance(a, np.ndarray) else a  # noqa: E731
    to_jax = lambda a: jax.device_put(jnp.asarray(a), _CPU) if isinstance(a, np.ndarray) else a  # noqa: E731
    t = {n: to_torch(a) for n, a in {**arrays, **kw}.items()}
    with torch.no_grad():
        out, lse = orchard.flash_attn_with_kvcache(**t, return_softmax_lse=True)
    want = [x.numpy() for x in (out, lse, t["k_cache"], t["v_cache"])]
    got = ojax.flash_attn_with_kvcache(**{n: to_jax(a) for n, a in {**arrays, **kw}.items()}, return_softmax_lse=True)
    return want, [np.asarray(x) for x in got]


OPTIONS = {
    "causal": dict(causal=True),
    "rotary_window_softcap": dict(causal=True, window_size=(20, 0), softcap=5.0, rotary_interleaved=False),
    "alibi_splits": dict(alibi_slopes=np.linspace(0.05, 0.3, 4).astype(np.float32), num_splits=3),
    "negative_scale": dict(softmax_scale=-0.3),  # any finite scale is the scale, not the default
}


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
def test_matches_the_torch_entry(paged, opts):
    arrays = _case(paged)
    if opts != "rotary_window_softcap":
        arrays.pop("rotary_cos"), arrays.pop("rotary_sin")
    want, got = _run_both(arrays, **OPTIONS[opts])
    for name, w, g in zip(("out", "lse", "k_cache", "v_cache"), want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_batch_idx_and_leftpad():
    arrays = _case(False, b=2, capacity=64)
    arrays.pop("block_table"), arrays.pop("rotary_cos"), arrays.pop("rotary_sin")
    # Two cache entries more than the batch: rows 3 and 0 of the cache serve it.
    arrays["k_cache"] = np.concatenate([arrays["k_cache"]] * 2)
    arrays["v_cache"] = np.concatenate([arrays["v_cache"]] * 2)
    arrays["cache_batch_idx"] = np.array([3, 0], np.int32)
    arrays["cache_leftpad"] = np.array([4, 0], np.int32)
    want, got = _run_both(arrays, causal=True)
    for name, w, g in zip(("out", "lse", "k_cache", "v_cache"), want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_jitted_decode_loop_with_donated_caches():
    """Four steps of one new token each, the caches donated to a jitted step: each step's output
    and the final caches equal the torch entry's loop over the same tokens."""
    a = _case(True, sq=1, s_new=1)
    rng = np.random.default_rng(5)
    steps = [(rng.standard_normal(a["q"].shape).astype(np.float32),
              rng.standard_normal(a["k"].shape).astype(np.float32),
              rng.standard_normal(a["v"].shape).astype(np.float32)) for _ in range(4)]
    tk, tv = torch.from_numpy(a["k_cache"].copy()), torch.from_numpy(a["v_cache"].copy())
    table, seq0 = a["block_table"], a["cache_seqlens"]

    @jax.jit
    def step(kc, vc, q, k, v, seqlens):
        out, kc, vc = ojax.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens,
                                                   block_table=jnp.asarray(table), causal=True)
        return out, kc, vc

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    jk, jv = jnp.asarray(a["k_cache"]), jnp.asarray(a["v_cache"])
    for i, (q, k, v) in enumerate(steps):
        seqlens = seq0 + i
        with torch.no_grad():
            want = orchard.flash_attn_with_kvcache(torch.from_numpy(q), tk, tv, k=torch.from_numpy(k),
                                                   v=torch.from_numpy(v), cache_seqlens=torch.from_numpy(seqlens),
                                                   block_table=torch.from_numpy(table), causal=True)
        out, jk, jv = step(jk, jv, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seqlens))
        np.testing.assert_allclose(np.asarray(out), want.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(jk), tk.numpy())
    np.testing.assert_array_equal(np.asarray(jv), tv.numpy())


def test_bad_input():
    a = _case(False)
    q, kc, vc = (jnp.asarray(a[n]) for n in ("q", "k_cache", "v_cache"))
    with pytest.raises(ValueError, match="orchard.jax.flash_attn_with_kvcache: q must be"):
        ojax.flash_attn_with_kvcache(q[0], kc, vc)
    with pytest.raises(ValueError, match="given together"):
        ojax.flash_attn_with_kvcache(q, kc, vc, k=jnp.asarray(a["k"]))
    with pytest.raises(Exception, match="orchard.jax.flash_attn_with_kvcache"):  # the core's checks
        jax.block_until_ready(ojax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=jnp.full((3,), 500, jnp.int32)))
    with pytest.raises(Exception, match="orchard.jax.flash_attn_with_kvcache"):
        jax.block_until_ready(ojax.flash_attn_with_kvcache(q, kc[:, :, :1], vc, cache_seqlens=4))
    with pytest.raises(ValueError, match="orchard.jax.flash_attn_with_kvcache: softmax_scale must be finite"):
        ojax.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, softmax_scale=float("nan"))
    # A block table with no pages is given, not absent: the core refuses it as the torch entry does.
    with pytest.raises(Exception, match="orchard.jax.flash_attn_with_kvcache"):
        jax.block_until_ready(ojax.flash_attn_with_kvcache(q, kc[:, :16], vc[:, :16], cache_seqlens=4,
                                                           block_table=jnp.zeros((3, 0), jnp.int32)))


def test_numpy_inputs_and_no_new_rows():
    """NumPy arrays (float64 and int64 where x64 is off: JAX makes them float32 / int32) and k / v
    with no new rows, which are given (rotary then applies to q) rather than absent."""
    a = _case(False, s_new=0)
    a.pop("block_table")
    want, got = _run_both(a, causal=True)
    for name, w, g in zip(("out", "lse", "k_cache", "v_cache"), want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    f64 = {n: (v.astype(np.float64) if v.dtype == np.float32 else v.astype(np.int64)) for n, v in a.items()}
    out, kc, vc = ojax.flash_attn_with_kvcache(**f64, causal=True)
    np.testing.assert_allclose(np.asarray(out), want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_handler_matches_cpu():
    try:
        gpu = jax.devices("cuda")[0]
    except RuntimeError:
        pytest.skip("no CUDA device for jax")
    if not ojax.cuda_compiled():
        pytest.skip("this orchard build has no CUDA backend")
    a = _case(True, d=64, capacity=512)
    a.pop("rotary_cos"), a.pop("rotary_sin")
    cpu = [np.asarray(x) for x in ojax.flash_attn_with_kvcache(
        **{n: jax.device_put(jnp.asarray(v), _CPU) for n, v in a.items()}, causal=True, return_softmax_lse=True)]
    cuda = [np.asarray(jax.device_get(x)) for x in ojax.flash_attn_with_kvcache(
        **{n: jax.device_put(jnp.asarray(v), gpu) for n, v in a.items()}, causal=True, return_softmax_lse=True)]
    for name, c, g in zip(("out", "lse", "k_cache", "v_cache"), cpu, cuda):
        np.testing.assert_allclose(g, c, atol=2e-3, rtol=2e-3, err_msg=name)


def test_gradient_is_refused_by_name():
    arrays = _case(False)

    def loss(q):
        out, _, _ = ojax.flash_attn_with_kvcache(q, arrays["k_cache"], arrays["v_cache"],
                                                 cache_seqlens=arrays["cache_seqlens"])
        return out.sum()

    with pytest.raises(NotImplementedError, match="orchard.jax.flash_attn_with_kvcache is forward only"):
        jax.grad(loss)(jnp.asarray(arrays["q"]))
