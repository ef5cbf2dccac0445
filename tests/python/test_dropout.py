"""Dropout: the returned keep-mask is Orchard's documented Philox mask, the
output equals a reference that applies it, the dropped fraction is round(256 p) / 256
(8-bit draws), and the same (seed, offset) gives the same mask in forward and backward."""

import numpy as np
import pytest
import torch

import orchard
import orchard_ops
from conftest import DEVICES
from helpers import attention_ref, keep_probability, philox_keep_mask, randn


# scale and p are exact in float32 (the params carry them as float32), so a
# float64 run can be held to ~1e-12 against the float64 reference.
def _fwd(q, k, v, p, seed, offset, causal=False, scale=0.25):
    return torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, False, p, seed, offset, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_output_matches_reference_applying_returned_mask(device, causal):
    b, sq, sk, hq, hkv, d, p = 2, 37, 53, 4, 2, 16, 0.25
    q = randn(b, sq, hq, d, dtype=torch.float64, device=device, requires_grad=True)
    k = randn(b, sk, hkv, d, dtype=torch.float64, device=device, requires_grad=True)
    v = randn(b, sk, hkv, d, dtype=torch.float64, device=device, requires_grad=True)
    out, lse, mask = _fwd(q, k, v, p, seed=2024, offset=3, causal=causal)
    assert mask.dtype == torch.uint8 and mask.shape == (b, hq, sq, sk)
    assert set(mask.unique().tolist()) <= {0, 1}
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_ref(q64, k64, v64, 0.25, causal, keep_mask=mask, dropout_p=p)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    # lse is the softmax normaliser, independent of dropout.
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-12, rtol=1e-10)
    # The backward regenerates the same mask from (seed, offset).
    do = randn(b, sq, hq, d, dtype=torch.float64, device=device)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q64, k64, v64), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_documented_philox(device):
    b, sq, sk, h, d = 2, 19, 70, 3, 8
    q = randn(b, sq, h, d, device=device)
    k = randn(b, sk, h, d, device=device)
    for p, seed, offset in [(0.1, 1, 0), (0.5, 0x7FFF_FFFF_FFFF_FFF1, 5), (0.9, 12345, 2**40 + 9)]:
        _, _, mask = _fwd(q, k, k, p, seed, offset)
        want = philox_keep_mask(b, h, sq, sk, p, seed, offset)
        assert np.array_equal(mask.cpu().numpy().astype(bool), want), (p, seed, offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropped_fraction(device, p):
    q = randn(2, 256, 4, 16, device=device)
    k = randn(2, 256, 4, 16, device=device)
    _, _, mask = _fwd(q, k, k, p, seed=77, offset=0)
    dropped = 1.0 - mask.double().mean().item()
    assert abs(dropped - (1.0 - keep_probability(p))) < 0.005, dropped


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_offset_select_the_mask(device):
    q = randn(1, 32, 2, 16, device=device)
    m1 = _fwd(q, q, q, 0.3, 5, 0)[2]
    assert torch.equal(m1, _fwd(q, q, q, 0.3, 5, 0)[2])
    assert not torch.equal(m1, _fwd(q, q, q, 0.3, 6, 0)[2])
    assert not torch.equal(m1, _fwd(q, q, q, 0.3, 5, 1)[2])
    # The mask does not depend on the data.
    assert torch.equal(m1, _fwd(randn(1, 32, 2, 16, device=device), q, q, 0.3, 5, 0)[2])


@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproduces_drop_ins(device):
    q = randn(2, 40, 4, 16, device=device)
    runs = []
    for s in (11, 11, 12):
        torch.manual_seed(s)
        out, _, mask = orchard.flash_attn_func(q, q, q, dropout_p=0.2, return_attn_probs=True)
        runs.append((out, mask))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert runs[0][1].dtype == torch.bool
    # Consecutive calls draw fresh masks.
    torch.manual_seed(11)
    a = orchard_ops.flash_attn_fwd(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), None, 0.2, False)[1]
    b = orchard_ops.flash_attn_fwd(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), None, 0.2, False)[1]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_dropout_backward_consistent(device):
    # SDPA drop-in with dropout: gradients must be those of the function that
    # the forward computed (same mask). Checked by re-running the forward with
    # the same torch seed and comparing against a reference using its mask.
    q = randn(1, 2, 24, 16, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(3)
    out = orchard.scaled_dot_product_attention(q, q, q, dropout_p=0.25, is_causal=True)
    (g,) = torch.autograd.grad(out.sum(), (q,))
    torch.manual_seed(3)
    out2, mask = orchard_ops.flash_attn_fwd(q, q, q, None, 0.25, True)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    q64 = q.detach().clone().requires_grad_()
    ref, _ = attention_ref(q64.transpose(1, 2), q64.transpose(1, 2), q64.transpose(1, 2), None, True,
                           True, keep_mask=mask, dropout_p=0.25)
    (gr,) = torch.autograd.grad(ref.transpose(1, 2).sum(), (q64,))
    torch.testing.assert_close(g, gr, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_rng_state_tensor_is_the_same_key_as_ints(device, causal):
    # rng_state (read when the kernels run) selects exactly the mask that the
    # same (seed, offset) passed as ints selects, forward and backward.
    seed, offset = 0x1234_5678_9ABC_DEF1, 6
    q = randn(2, 29, 4, 16, device=device, requires_grad=True)
    k = randn(2, 41, 2, 16, device=device, requires_grad=True)
    v = randn(2, 41, 2, 16, device=device, requires_grad=True)
    do = randn(2, 29, 4, 16, device=device)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    ints = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, causal, False, 0.3, seed, offset, True)
    tens = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, causal, False, 0.3, 0, 0, True, False,
                                                "orchard.flash_attn", rng)
    for a, b in zip(ints, tens):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(ints[0], (q, k, v), do), torch.autograd.grad(tens[0], (q, k, v), do)):
        assert torch.equal(a, b)
    # The ints are ignored when rng_state is given.
    other = torch.ops.orchard.flash_attn_forward(q, k, v, 0.25, causal, False, 0.3, 99, 1, True, False,
                                                 "orchard.flash_attn", rng)
    assert torch.equal(other[2], ints[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["three", "float", "strided", "2d"])
def test_rng_state_validation(device, bad):
    q = randn(1, 8, 2, 8, device=device)
    rng = {"three": torch.zeros(3, dtype=torch.int64, device=device),
           "float": torch.zeros(2, device=device),
           "strided": torch.zeros(4, dtype=torch.int64, device=device)[::2],
           "2d": torch.zeros(1, 2, dtype=torch.int64, device=device)}[bad]
    with pytest.raises(ValueError, match=r"^orchard.flash_attn_func: rng_state must be"):
        torch.ops.orchard.flash_attn_forward(q, q, q, 0.3, False, False, 0.2, 0, 0, False, False,
                                             "orchard.flash_attn_func", rng)


@pytest.mark.cuda
def test_rng_state_on_another_device_is_refused():
    q = randn(1, 8, 2, 8, device="cuda")
    with pytest.raises(ValueError, match=r"^orchard.flash_attn: rng_state must be on q's device"):
        torch.ops.orchard.flash_attn_forward(q, q, q, 0.3, False, False, 0.2, 0, 0, False, False,
                                             "orchard.flash_attn", torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_drop_ins_draw_the_key_on_the_device(device):
    # The drop-ins key dropout by a draw of the device's generator: the same torch
    # seed reproduces it, and rng_state with that draw reproduces the output.
    q = randn(2, 33, 2, 16, device=device)
    torch.manual_seed(21)
    out, _, mask = orchard.flash_attn_func(q, q, q, dropout_p=0.4, return_attn_probs=True)
    torch.manual_seed(21)
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    want, _, want_mask = torch.ops.orchard.flash_attn_forward(
        q, q, q, 0.25, False, False, 0.4, 0, 0, True, False, "orchard.flash_attn", rng)
    assert torch.equal(out, want) and torch.equal(mask, want_mask.bool())


# ---- dropout's global coordinates (context parallelism) --------------------
# The ops' trailing feature arguments dropout_row_offset, dropout_col_offset,
# dropout_head_offset, dropout_heads: a call on a block of rows / keys / heads of a
# larger problem draws that block of the larger call's mask. All 0 is today's mask.

_PLAIN = (-1, -1, 0.0, None, None, None, None, None, 0, 0)


def _fwd_at(q, k, v, p, rng, causal, row0, col0, head0, heads, top_left=True, scale=0.25):
    return torch.ops.orchard.flash_attn_forward(
        q, k, v, scale, causal, top_left, p, 0, 0, True, False, "orchard.flash_attn", rng,
        *_PLAIN, row0, col0, head0, heads)


def _bwd_at(do, q, k, v, out, lse, p, rng, causal, row0, col0, head0, heads, top_left=True,
            scale=0.25):
    return torch.ops.orchard.flash_attn_backward(
        do, q, k, v, out, lse, scale, causal, top_left, p, 0, 0, False, "orchard.flash_attn", rng,
        *_PLAIN, row0, col0, head0, heads)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_dropout_offsets_are_the_plain_mask_bitwise(device):
    q = randn(2, 37, 4, 16, device=device)
    k = randn(2, 45, 2, 16, device=device)
    rng = torch.tensor([2024, 3], dtype=torch.int64, device=device)
    plain = torch.ops.orchard.flash_attn_forward(q, k, k, 0.25, True, False, 0.3, 0, 0, True, False,
                                                 "orchard.flash_attn", rng)
    for heads in (0, 4):  # heads = hq says the same as 0
        at = _fwd_at(q, k, k, 0.3, rng, True, 0, 0, 0, heads, top_left=False)
        for a, b in zip(plain, at):
            assert torch.equal(a, b)
    want = philox_keep_mask(2, 4, 37, 45, 0.3, 2024, 3)
    assert np.array_equal(plain[2].cpu().numpy().astype(bool), want)


# (first row, rows, first key, keys, first head, heads) of blocks of a (2, 41, 6 heads, 150
# keys) problem: column offsets that split a Philox call's 8 columns (mod 8) and 32-column
# block (8, 24, 40), row offsets that split its two rows (mod 16), GQA head groups, single rows/keys;
# (16, .., 32, ..): both on the 16 grid, where the CUDA kernels keep their one-call-per-fragment path.
_BLOCKS = [(0, 41, 0, 150, 0, 6), (5, 17, 1, 133, 0, 6), (0, 9, 2, 70, 2, 4), (13, 28, 3, 147, 0, 2),
           (1, 1, 5, 1, 4, 2), (40, 1, 7, 143, 2, 2), (7, 20, 64, 86, 0, 6), (3, 30, 97, 35, 2, 2),
           (8, 24, 8, 100, 0, 6), (16, 25, 40, 110, 2, 4), (24, 9, 24, 126, 0, 2), (16, 25, 32, 118, 0, 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_offsets_draw_the_block_of_the_full_mask(device, dtype):
    b, s, sk, h, hkv, d, p = 2, 41, 150, 6, 3, 32, 0.4
    q = randn(b, s, h, d, dtype=dtype, device=device)
    k = randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = randn(b, sk, hkv, d, dtype=dtype, device=device)
    rng = torch.tensor([0x5EED_0123_4567, 9], dtype=torch.int64, device=device)
    full_mask = _fwd_at(q, k, v, p, rng, False, 0, 0, 0, 0)[2]
    g = h // hkv
    for r0, n, c0, m, h0, nh in _BLOCKS:
        qb = q[:, r0:r0 + n, h0:h0 + nh]
        kb, vb = (t[:, c0:c0 + m, h0 // g:(h0 + nh) // g] for t in (k, v))
        for causal in (False, True):
            out, _, mask = _fwd_at(qb, kb, vb, p, rng, causal, r0, c0, h0, h)
            block = full_mask[:, h0:h0 + nh, r0:r0 + n, c0:c0 + m]
            assert torch.equal(mask, block), (r0, n, c0, m, h0, nh)
            # The kernels apply that mask (the output of a reference that applies it).
            ref, _ = attention_ref(qb, kb, vb, 0.25, causal, True, keep_mask=mask, dropout_p=p)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dropout_offset_blocks_compose_the_full_call(device, dtype):
    """What context parallelism does: key blocks (an odd split) and query blocks
    with their offsets, merged through the LSE, give the single call's output; the
    blocks' backwards (with the global out and LSE) add up to its gradients."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    from orchard.distributed._merge import merge_attention
    b, s, h, hkv, d, p = 2, 45, 4, 2, 32, 0.3
    q = randn(b, s, h, d, dtype=dtype, device=device)
    k = randn(b, s, hkv, d, dtype=dtype, device=device)
    v = randn(b, s, hkv, d, dtype=dtype, device=device)
    do = randn(b, s, h, d, dtype=dtype, device=device)
    rng = torch.tensor([77, 5], dtype=torch.int64, device=device)
    for causal in (False, True):
        out, lse, _ = _fwd_at(q, k, v, p, rng, causal, 0, 0, 0, 0)
        dq, dk, dv = _bwd_at(do, q, k, v, out, lse, p, rng, causal, 0, 0, 0, 0)
        cuts = [0, 13, 30, s]  # rows / keys [0, 13), [13, 30), [30, 45): offsets 13 and 30
        got_out = torch.zeros_like(out, dtype=torch.float64)
        got_dq = torch.zeros_like(dq, dtype=torch.float64)
        got_dk = torch.zeros_like(dk, dtype=torch.float64)
        got_dv = torch.zeros_like(dv, dtype=torch.float64)
        for i in range(3):
            rs = slice(cuts[i], cuts[i + 1])
            outs, lses, blocks = [], [], []
            for j in range(3):
                ks = slice(cuts[j], cuts[j + 1])
                if causal and j > i:
                    continue
                o, l, _ = _fwd_at(q[:, rs], k[:, ks], v[:, ks], p, rng, causal and i == j,
                                  cuts[i], cuts[j], 0, 0)
                outs.append(o)
                lses.append(l)
                blocks.append(ks)
            o, l = merge_attention(outs, lses)
            got_out[:, rs] = o.double()
            for ks in blocks:
                gq, gk, gv = _bwd_at(do[:, rs], q[:, rs], k[:, ks], v[:, ks], out[:, rs],
                                     lse[:, :, rs].contiguous(), p, rng,
                                     causal and ks == rs, cuts[i], ks.start, 0, 0)
                got_dq[:, rs] += gq.double()
                got_dk[:, ks] += gk.double()
                got_dv[:, ks] += gv.double()
        tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
        for name, got, want in (("out", got_out, out), ("dq", got_dq, dq), ("dk", got_dk, dk),
                                ("dv", got_dv, dv)):
            torch.testing.assert_close(got, want.double(), atol=tol, rtol=tol,
                                       msg=lambda m, name=name: f"{name} causal={causal}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_offsets_validation(device):
    q = randn(1, 8, 4, 16, device=device)
    rng = torch.tensor([1, 2], dtype=torch.int64, device=device)
    for row0, col0, head0, heads in ((-1, 0, 0, 0), (0, -3, 0, 0), (0, 0, 1, 4), (0, 0, 0, 3),
                                     (2**32, 0, 0, 0)):
        with pytest.raises(ValueError, match="dropout offsets"):
            _fwd_at(q, q, q, 0.1, rng, False, row0, col0, head0, heads)
