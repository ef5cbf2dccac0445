"""flash_attn_varlen_func with block_table (python/orchard/paged_varlen.py): packed queries
over a paged KV cache, against the float64 reference on the keys each sequence's table names,
with features, odd page sizes, empty sequences, shuffled pools; gradients into the caches; and
every bad table or cache caught with an op-prefixed error before anything runs."""

import pytest
import torch

import orchard
from conftest import DEVICES
from feature_reference import varlen_attention_ref
from helpers import check_close_rule, eager_and_graph_replay

OP = "orchard.flash_attn_varlen_func"
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _paged_case(lens_q, lens_k, page, hq=4, hkv=2, d=32, dv=32, dtype=torch.float32, device="cpu",
                spare_blocks=3, requires_grad=False, seed=0):
    """q (packed), k_cache / v_cache (a shuffled pool with spare blocks), block_table, and the
    packed k / v the table names (the reference's input)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = max(1, max((n + page - 1) // page for n in lens_k))
    num_blocks = len(lens_k) * per_seq + spare_blocks
    table = torch.randperm(num_blocks, generator=g)[:len(lens_k) * per_seq].view(len(lens_k), per_seq)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(dtype)
    kc = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, page, hkv, dv, generator=g).to(dtype)
    rows = [(table[b, j // page], j % page) for b, n in enumerate(lens_k) for j in range(n)]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    pos = torch.tensor([r[1] for r in rows], dtype=torch.long)
    q, kc, vc = (t.to(device).requires_grad_(requires_grad) for t in (q, kc, vc))
    return q, kc, vc, table.int().to(device), ids.to(device), pos.to(device)


CASES = {
    "causal_page16": ([5, 0, 9], [40, 7, 33], 16, dict(causal=True)),
    "page1": ([3, 4], [9, 4], 1, dict()),
    "page7_window": ([6, 11], [30, 11], 7, dict(window_size=(5, 2))),
    "empty_keys": ([4, 2, 3], [0, 20, 3], 16, dict(causal=True)),
    "page256_softcap_alibi": ([17, 30], [300, 30], 256, dict(softcap=6.0, alibi=True)),
    "sink_causal": ([8, 8], [20, 8], 16, dict(causal=True, sink=True)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_varlen_vs_reference(case, dtype, device):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 runs on the CPU only")
    lens_q, lens_k, page, feats = CASES[case]
    q, kc, vc, table, ids, pos = _paged_case(lens_q, lens_k, page, dtype=dtype, device=device)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    kw = {k: v for k, v in feats.items() if k not in ("alibi", "sink")}
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0))
    if feats.get("alibi"):
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(len(lens_q), 4, device=device) * 0.2
    if feats.get("sink"):
        kw["sink"] = ref_kw["sink"] = torch.randn(4, device=device)
    out, lse = orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), block_table=table,
                                              return_softmax_lse=True, **kw)
    k, v = kc[ids, pos], vc[ids, pos]
    ref, ref_lse = varlen_attention_ref(q, k, v, cu_q, cu_k, **ref_kw)
    naive, _ = varlen_attention_ref(q, k, v, cu_q, cu_k, upcast=False, **ref_kw)
    check_close_rule(out, ref, naive, ATOL[dtype], f"paged {case}")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite.cpu())
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_varlen_gradients_reach_the_caches(device):
    """The backward of the packed call flows through the gather: each used cache row gets its
    key's gradient, rows no sequence uses (spare blocks, a last page's tail) get zero."""
    lens_q, lens_k, page = [6, 9], [21, 9], 8
    q, kc, vc, table, ids, pos = _paged_case(lens_q, lens_k, page, device=device, requires_grad=True)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    out = orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 9, 21, causal=True, block_table=table)
    dout = torch.randn_like(out)
    dq, dkc, dvc = torch.autograd.grad(out, (q, kc, vc), dout)
    k, v = kc.detach()[ids, pos].requires_grad_(), vc.detach()[ids, pos].requires_grad_()
    qd = q.detach().requires_grad_()
    packed = orchard.flash_attn_varlen_func(qd, k, v, cu_q, cu_k, 9, 21, causal=True)
    dq_p, dk_p, dv_p = torch.autograd.grad(packed, (qd, k, v), dout)
    torch.testing.assert_close(dq, dq_p)
    torch.testing.assert_close(dkc[ids, pos], dk_p)
    torch.testing.assert_close(dvc[ids, pos], dv_p)
    used = torch.zeros(kc.shape[:2], dtype=torch.bool, device=device)
    used[ids, pos] = True
    assert dkc[~used].abs().max() == 0 and dvc[~used].abs().max() == 0


def _bad(device="cpu"):
    q, kc, vc, table, _, _ = _paged_case([3, 2], [20, 5], 8, device=device)
    return dict(q=q, k=kc, v=vc, cu_seqlens_q=_cu([3, 2], device), cu_seqlens_k=_cu([20, 5], device),
                max_seqlen_q=3, max_seqlen_k=20, block_table=table)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "block_table must be (batch, max_blocks_per_seq)"),
    (lambda a: a.update(block_table=a["block_table"][:, :0]), "at least one column"),
    (lambda a: a["block_table"].__setitem__((1, 0), 10_000), "block_table[1, 0] = 10000 is outside"),
    (lambda a: a["block_table"].__setitem__((0, 1), -1), "block_table[0, 1] = -1 is outside"),
    (lambda a: a.update(block_table=a["block_table"][:, :2]), "sequence 0 needs cache position 16"),
    (lambda a: a.update(k=a["k"][0]), "paged caches (num_blocks, page_size, nheads_k, headdim)"),
    (lambda a: a.update(v=a["v"][:, :4]), "must agree in (num_blocks, page_size, nheads_k)"),
    (lambda a: a.update(block_table=a["block_table"].to("meta")), "block_table is on meta"),
    # the decode form (3 query rows, no grad): the KV-cache kernels' checks, named as this op
    (lambda a: a.update(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (lambda a: a.update(k=a["k"].double(), v=a["v"].double()), "dtype"),
])
def test_paged_varlen_bad_input(change, message):
    args = _bad()
    change(args)
    with pytest.raises(ValueError) as err:
        orchard.flash_attn_varlen_func(**args)
    assert str(err.value).startswith(OP) and message in str(err.value), str(err.value)


def test_paged_varlen_large_max_seqlen_does_not_read_past_the_pool():
    """max_seqlen_k is an upper bound only: a generous one gathers no extra rows (the
    values are readable here), and a decode-style call (one query row each) matches."""
    lens_q, lens_k, page = [1, 1, 1], [50, 1, 17], 16
    q, kc, vc, table, ids, pos = _paged_case(lens_q, lens_k, page)
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    out = orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 1, 64, block_table=table, causal=True)
    ref, _ = varlen_attention_ref(q, kc[ids, pos], vc[ids, pos], cu_q, cu_k, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.fixture
def calls(debug_log):
    """The kinds of the kernel calls so far (FWD / BWD / DECODE), from conftest's debug log."""
    return lambda: [ln.split()[0] for ln in debug_log()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("feats", [dict(), dict(causal=True), dict(causal=True, window_size=(6, -1), softcap=4.0),
                                   dict(window_size=(3, 2), alibi=True)], ids=["plain", "causal", "window_softcap",
                                                                               "window_alibi"])
def test_decode_form_reads_the_pages_in_place(feats, dtype, calls):
    """A serving step (1-3 query rows per sequence, one sequence with none, two rows of q past
    cu_seqlens_q[-1] as in a static buffer) runs on the KV-cache kernel (the debug log's DECODE
    line, no FWD), each sequence's rows on its own bottom-right diagonal."""
    lens_q, lens_k, page = [1, 3, 0, 2], [37, 16, 5, 70], 16
    q, kc, vc, table, ids, pos = _paged_case(lens_q, lens_k, page, hq=8, hkv=2, dtype=dtype)
    q = torch.cat([q, torch.randn(2, 8, 32).to(dtype)])  # rows no sequence owns
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    kw = dict(feats)
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0))
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(4, 8) * 0.2
    out, lse = orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 3, 70, block_table=table,
                                              return_softmax_lse=True, **kw)
    assert calls() == ["DECODE"], calls()
    n = int(cu_q[-1])
    k, v = kc[ids, pos], vc[ids, pos]
    ref, ref_lse = varlen_attention_ref(q[:n], k, v, cu_q, cu_k, **ref_kw)
    naive, _ = varlen_attention_ref(q[:n], k, v, cu_q, cu_k, upcast=False, **ref_kw)
    check_close_rule(out[:n], ref, naive, ATOL[dtype], "decode form")
    torch.testing.assert_close(lse[:, :n].double(), ref_lse, atol=1e-3, rtol=1e-3)
    assert out[n:].abs().max() == 0 and torch.isneginf(lse[:, n:]).all()


def test_gradients_take_the_gather_form(calls):
    """The same serving step with q requiring grad takes the gather form (a FWD line) and
    agrees with the decode form."""
    lens_q, lens_k, page = [2, 1], [40, 9], 16
    q, kc, vc, table, _, _ = _paged_case(lens_q, lens_k, page)
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    with torch.no_grad():
        decode = orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 2, 40, causal=True, block_table=table)
    gathered = orchard.flash_attn_varlen_func(q.requires_grad_(), kc, vc, cu_q, cu_k, 2, 40, causal=True,
                                              block_table=table)
    assert calls() == ["DECODE", "FWD"], calls()
    torch.testing.assert_close(gathered.detach(), decode, atol=2e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("max_q", [3, 40], ids=["decode_form", "gather_form"])
def test_paged_varlen_in_a_cuda_graph(max_q):
    """Both forms capture into a CUDA graph (no host reads while capturing: the value checks
    are skipped, the gather sizes itself from batch x max_seqlen_k) and replay to the eager result."""
    lens_q, lens_k, page = [min(max_q, 3), 2], [50, 20], 16
    q, kc, vc, table, _, _ = _paged_case(lens_q, lens_k, page, dtype=torch.bfloat16, device="cuda")
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")
    step = lambda: orchard.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max_q, 64, causal=True,  # noqa: E731
                                                  block_table=table)
    with torch.no_grad():
        eager, replayed = eager_and_graph_replay(step)
    torch.testing.assert_close(replayed, eager, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feats", [dict(causal=True), dict(window_size=(4, 1), softcap=3.0, alibi=True)],
                         ids=["causal", "window_softcap_alibi"])
def test_unpaged_decode_form(feats, dtype, calls):
    """The decode form over packed (unpaged) keys: a serving step through flash_attn_varlen_func
    reads k / v in place as one cache entry every sequence indexes from its first key (the debug
    log's DECODE line); keys that are views into a packed qkv tensor too; rows past
    cu_seqlens_q[-1] and an empty sequence as on the varlen path."""
    lens_q, lens_k = [2, 0, 1, 3], [30, 5, 1, 17]
    torch.manual_seed(4)
    qkv = torch.randn(sum(lens_k), 3, 8, 32).to(dtype)  # k and v: views into a packed qkv tensor
    k, v = qkv[:, 1, :2], qkv[:, 2, :2]
    q = torch.randn(sum(lens_q) + 2, 8, 32).to(dtype)
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    kw = dict(feats)
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0))
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(8) * 0.2
    out, lse = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 30, return_softmax_lse=True, **kw)
    assert calls() == ["DECODE"], calls()
    n = int(cu_q[-1])
    ref, ref_lse = varlen_attention_ref(q[:n], k, v, cu_q, cu_k, **ref_kw)
    naive, _ = varlen_attention_ref(q[:n], k, v, cu_q, cu_k, upcast=False, **ref_kw)
    check_close_rule(out[:n], ref, naive, ATOL[dtype], "unpaged decode form")
    torch.testing.assert_close(lse[:, :n].double(), ref_lse, atol=1e-3, rtol=1e-3)
    assert out[n:].abs().max() == 0 and torch.isneginf(lse[:, n:]).all()
    with torch.enable_grad():  # a gradient: the varlen kernels, the same answer
        tiled = orchard.flash_attn_varlen_func(q.requires_grad_(), k, v, cu_q, cu_k, 3, 30, **kw)
    assert calls() == ["DECODE", "FWD"], calls()
    torch.testing.assert_close(tiled[:n].detach().float(), out[:n].float(), atol=ATOL[dtype] * 10, rtol=1e-2)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_serving_step_compiles_fullgraph(paged, debug_log):
    """Under torch.compile(fullgraph=True) a serving step keeps the decode form (the KV-cache
    entry is the traceable op orchard::kvcache_forward there) and agrees with the eager call."""
    torch._dynamo.reset()
    lens_q, lens_k, page = [1, 2], [40, 9], 16
    q, kc, vc, table, ids, pos = _paged_case(lens_q, lens_k, page)
    cu_q, cu_k = _cu(lens_q, "cpu"), _cu(lens_k, "cpu")
    k, v = (kc, vc) if paged else (kc[ids, pos], vc[ids, pos])
    kw = dict(causal=True, block_table=table if paged else None)

    def step(q, k, v):
        return orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 40, **kw)

    with torch.no_grad():
        eager = step(q, k, v)
        before = len(debug_log())
        compiled = torch.compile(step, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=2e-6, rtol=1e-5)
    assert [ln.split()[0] for ln in debug_log()[before:]] == ["DECODE"], debug_log()[before:]


# ---- rows no sequence owns, and layouts the decode form leaves to the other path (session 41's
# review: the decode form sent rows before cu_seqlens_q[0] to sequence 0's slots, raised on an
# empty batch, and refused caches with a non-unit last stride instead of stepping aside).

@pytest.mark.parametrize("device", DEVICES)
def test_rows_before_the_first_offset_belong_to_no_sequence(device, calls):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, h, 16, generator=g).to(device) for n, h in ((7, 2), (9, 1), (9, 1)))
    cu_q = torch.tensor([2, 4, 7], dtype=torch.int32, device=device)
    cu_k = torch.tensor([1, 5, 9], dtype=torch.int32, device=device)
    with torch.no_grad():
        out, lse = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, causal=True, return_softmax_lse=True)
    assert calls() == ["DECODE"], calls()
    tiled, tiled_lse = orchard.flash_attn_varlen_func(q.clone().requires_grad_(), k, v, cu_q, cu_k, 3, 4,
                                                      causal=True, return_softmax_lse=True)
    assert calls() == ["DECODE", "FWD"], calls()
    assert out[:2].abs().max() == 0 and torch.isneginf(lse[:, :2]).all()
    assert tiled[:2].abs().max() == 0 and torch.isneginf(tiled_lse[:, :2]).all()
    torch.testing.assert_close(out, tiled.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, tiled_lse.detach(), atol=1e-5, rtol=1e-5)


def test_decode_form_with_no_sequences_and_with_strided_cache_rows():
    q, k, v = torch.randn(3, 2, 16), torch.randn(5, 2, 32)[..., ::2], torch.randn(5, 2, 16)
    with torch.no_grad():
        none = orchard.flash_attn_varlen_func(q, k, v, _cu([], "cpu"), _cu([], "cpu"), 1, 1)
        assert none.shape == q.shape and none.abs().max() == 0
        cu = _cu([1, 2], "cpu")  # k's rows have stride 2 along head_dim: the gather form copies them
        got = orchard.flash_attn_varlen_func(q, k, v, cu, _cu([2, 3], "cpu"), 2, 3)
    want = orchard.flash_attn_varlen_func(q, k.contiguous(), v, cu, _cu([2, 3], "cpu"), 2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the tiled kernels vs the decode kernel
