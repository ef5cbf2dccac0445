"""Hugging Face transformers with attn_implementation="orchard" against the
library's own attention (sdpa; eager for the models that do not support sdpa:
Gemma 2 for its softcap, gpt-oss for its sinks).

Tiny randomly initialized models built from configs here (no downloads, HF
offline): logits, loss and every parameter gradient, with no / left / right
padding; greedy generate(); position-id packed batches; dropout in training.
fp32 on the CPU; a cuda-marked bf16 variant under flash-attn's tolerance rule.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import orchard.integrations.transformers as orchard_hf  # noqa: E402  (registers "orchard")

VOCAB = 96
SEQ = 12


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These models are tiny: torch's intra-op threads only add contention (on
    # a loaded 2-core CI machine the module ran 4x slower with 2 threads).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _common(**kw):
    # initializer_range 0.2 (not 0.02): peaked attention, so a wrong mask or
    # window shows in the logits instead of vanishing under uniform weights.
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return base


def _config(name):
    """(config, reference attn_implementation)."""
    if name == "llama":
        return transformers.LlamaConfig(**_common()), "sdpa"
    if name == "mistral":  # sliding window shorter than the sequence
        return transformers.MistralConfig(**_common(sliding_window=5)), "sdpa"
    if name == "qwen2":  # one sliding layer, one full layer; biased q/k/v projections
        return transformers.Qwen2Config(**_common(use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=1)), "sdpa"
    if name == "gemma2":  # softcap + alternating sliding/global layers + query_pre_attn_scalar
        return transformers.Gemma2Config(**_common(head_dim=8, sliding_window=4,
                                                   attn_logit_softcapping=2.0,
                                                   final_logit_softcapping=30.0,
                                                   query_pre_attn_scalar=12)), "eager"
    if name == "gpt2":  # MHA, learned positions, Conv1D projections
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, initializer_range=0.2, attn_pdrop=0.0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2), "sdpa"
    if name == "gpt_oss":  # attention sinks (s_aux) + sliding layers + MoE
        return transformers.GptOssConfig(**_common(head_dim=8, sliding_window=4,
                                                   num_local_experts=2, num_experts_per_tok=2,
                                                   intermediate_size=32,
                                                   layer_types=["sliding_attention",
                                                                "full_attention"])), "eager"
    raise ValueError(name)


MODELS = ["llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_oss"]


def _pair(name, dtype=torch.float32, device="cpu"):
    cfg, ref_impl = _config(name)
    torch.manual_seed(0)
    # Each model gets its own config: from_config records the attention
    # implementation on the config object it is given.
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                        attn_implementation=ref_impl)
    if name == "gpt_oss":
        with torch.no_grad():  # sinks are zero-initialized: make them matter
            for layer in ref.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    orc = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                        attn_implementation="orchard")
    orc.load_state_dict(ref.state_dict())
    ref.to(device=device, dtype=dtype).eval()
    orc.to(device=device, dtype=dtype).eval()
    assert orc.config._attn_implementation == "orchard"
    assert ref.config._attn_implementation == ref_impl
    return ref, orc


def _batch(padding, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=g)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if padding == "left":
        mask[0, :5] = 0
        mask[2, :2] = 0
    elif padding == "right":
        mask[0, -5:] = 0
        mask[2, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    # A token right after padding is predicted from a padded position, whose
    # output no implementation defines (a row that sees no key): not a label.
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _close(name, got, want, rel=2e-4):
    scale = max(1.0, want.abs().max().item())
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale, f"{name}: max |diff| {err:.3g} > {rel * scale:.3g}"


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_loss_grads_match_reference(name, padding):
    ref, orc = _pair(name)
    ids, mask, labels = _batch(padding)
    m = None if padding == "none" else mask
    lr, Lr, gr = _run(ref, ids, m, labels)
    lo, Lo, go = _run(orc, ids, m, labels)
    keep = mask.bool()
    _close("logits", lo[keep], lr[keep])  # padded query rows are undefined (Orchard: 0)
    _close("loss", Lo, Lr)
    assert gr.keys() == go.keys() and len(gr) > 0
    for n in gr:
        _close(f"grad {n}", go[n], gr[n])


@pytest.mark.parametrize("name", MODELS)
def test_generate_greedy_same_tokens(name):
    ref, orc = _pair(name)
    ids, mask, _ = _batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = orc.generate(ids, **kw)
    assert torch.equal(a, b), f"{name}: generated tokens differ\n{a}\n{b}"


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_packed_position_ids(name):
    """Three sequences packed into one row, told apart by position_ids only."""
    ref, orc = _pair(name)
    lengths = [5, 3, 4]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    outs = []
    for model in (ref, orc):
        model.zero_grad(set_to_none=True)
        # use_cache=False: transformers' sdpa/eager masks honour packed
        # position_ids only without a cache (Orchard, like its flash-attention
        # path, splits the row either way; checked against each sequence alone).
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}))
    _close("logits", outs[1][0], outs[0][0])
    for n in outs[0][1]:
        _close(f"grad {n}", outs[1][1][n], outs[0][1][n])
    # and the packed row equals running each sequence on its own
    with torch.no_grad():
        start = 0
        for n in lengths:
            alone = orc(input_ids=ids[:, start:start + n]).logits
            _close("packed vs alone", outs[1][0][:, start:start + n], alone)
            start += n


def test_precomputed_cu_seq_lens_kwargs():
    """Padding-free batches with cu_seq_lens_q/k + max_length_q/k keyword arguments
    (what DataCollatorWithFlattening produces) give each sequence on its own."""
    _, orc = _pair("llama")
    lengths = [4, 6, 2]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 10, 12], dtype=torch.int32)
    calls = []
    real = orchard_hf.flash_attn_varlen_func  # the path for caller-provided cu_seqlens
    orchard_hf.flash_attn_varlen_func = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            got = orc(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=6, max_length_k=6, use_cache=False).logits
    finally:
        orchard_hf.flash_attn_varlen_func = real
    assert len(calls) == orc.config.num_hidden_layers
    start = 0
    with torch.no_grad():
        for n in lengths:
            alone = orc(input_ids=ids[:, start:start + n]).logits
            _close("cu_seq_lens vs alone", got[:, start:start + n], alone)
            start += n


def test_set_attn_implementation_switches_model():
    cfg, _ = _config("llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids, mask, _ = _batch("right")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    calls = []
    real = orchard_hf._varlen_trusted  # the padded path's kernel call

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    model.set_attn_implementation("orchard")
    assert model.config._attn_implementation == "orchard"
    orchard_hf._varlen_trusted = spy
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        orchard_hf._varlen_trusted = real
    assert len(calls) == cfg.num_hidden_layers  # Orchard ran every layer's attention
    _close("logits", got[mask.bool()], want[mask.bool()])


def test_register_is_idempotent_and_listed():
    assert orchard_hf.register() == "orchard"
    from transformers import AttentionInterface
    assert AttentionInterface._global_mapping["orchard"] is orchard_hf.orchard_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionMaskInterface._global_mapping["orchard"] is orchard_hf.orchard_attention_mask


def test_dropout_in_training():
    cfg, _ = _config("llama")
    cfg.attention_dropout = 0.5
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="orchard")
    ids, mask, labels = _batch("right")
    model.eval()
    with torch.no_grad():
        eval_a = model(input_ids=ids, attention_mask=mask).logits
        eval_b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(eval_a, eval_b)  # no dropout in eval mode
    model.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # seeded
    assert torch.isfinite(runs[0][1]).all()
    with torch.no_grad():
        torch.manual_seed(7)
        train_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(train_logits[mask.bool()], eval_a[mask.bool()])  # dropout applied


def test_custom_4d_mask():
    """A prepared 4-D mask (here: bool causal + padding) goes to the kernels as attn_mask."""
    ref, orc = _pair("llama")
    ids, mask, _ = _batch("right")
    s = ids.shape[1]
    m4 = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=m4).logits
        got = orc(input_ids=ids, attention_mask=m4).logits
    _close("logits", got[mask.bool()], want[mask.bool()])


# ---------------------------------------------------------------------------
# bf16 on the GPU: flash-attn's rule against an fp32 run of the same weights.
# ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_cuda_matches_reference(name, padding):
    ref32, _ = _pair(name, torch.float32, "cuda")
    ref, orc = _pair(name, torch.bfloat16, "cuda")
    ids, mask, labels = _batch(padding, "cuda")
    m = None if padding == "none" else mask
    l32, L32, g32 = _run(ref32, ids, m, labels)
    lr, Lr, gr = _run(ref, ids, m, labels)
    lo, Lo, go = _run(orc, ids, m, labels)
    keep = mask.bool()

    def rule(what, got, base, want):
        err_o = (got.float() - want.float()).abs().max().item()
        err_r = (base.float() - want.float()).abs().max().item()
        assert err_o <= 2 * err_r + 1e-2 * max(1.0, want.abs().max().item()), \
            f"{what}: orchard bf16 err {err_o:.3g} vs reference bf16 err {err_r:.3g}"

    rule("logits", lo[keep], lr[keep], l32[keep])
    rule("loss", Lo, Lr, L32)
    for n in g32:
        rule(f"grad {n}", go[n], gr[n], g32[n])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = orc.generate(ids, **kw)
    # bf16 rounding may flip a near-tie: the first generated token must agree
    # wherever the fp32 model's top-2 margin at the last prompt position exceeds
    # the bf16 reference's own logit error (seen on the H200: Gemma-2, a flip
    # where both bf16 runs were within the rule of the fp32 logits).
    with torch.no_grad():
        last = ref32(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    top2 = last.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    noise = (lr.float() - l32.float())[keep].abs().max()
    clear = margin > 2 * noise
    assert torch.equal(a[clear, SEQ], b[clear, SEQ]), (margin, noise)


def test_padding_plan_shares_cu_seqlens_when_queries_are_the_keys():
    """Training and prefill (q_len == kv_len): one cu_seqlens tensor for q and k, the form the
    Hopper kernels run varlen in (sm90_call_support.h); decode steps (q_len < kv_len) keep two."""
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    (bq, iq), (bk, ik), cu_q, cu_k, max_q, max_k = orchard_hf._padding_plan(mask, 5)
    assert cu_q is cu_k and cu_q.tolist() == [0, 4, 7] and (max_q, max_k) == (4, 4)
    assert torch.equal(bq, bk) and torch.equal(iq, ik) and iq.tolist() == [1, 2, 3, 4, 0, 1, 2]
    (bq, iq), _, cu_q, cu_k, max_q, max_k = orchard_hf._padding_plan(mask, 1)
    assert cu_q is not cu_k and cu_q.tolist() == [0, 1, 1] and cu_k.tolist() == [0, 4, 7]
    assert (max_q, max_k) == (1, 4) and iq.tolist() == [0]


def test_left_padding_plan_only_for_left_padded_rows():
    """Batched generation's mask (left padding, keys to the end): the KV-cache route's
    (seqlens, leftpad); right padding, holes, or a row with fewer keys than query rows: None."""
    from orchard.integrations.transformers import _left_padding_plan
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    seqlens, leftpad = _left_padding_plan(left, 1)
    assert seqlens.tolist() == [5, 5, 5] and leftpad.tolist() == [2, 0, 4] and leftpad.dtype == torch.int32
    assert _left_padding_plan(left, 2) is None  # row 2 has one key for two query rows
    assert _left_padding_plan(torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool), 1) is None
    assert _left_padding_plan(torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool), 1) is None


def test_left_padded_generation_reads_the_cache_in_place(debug_log):
    """The decode steps of a left-padded batch run the KV-cache kernel (the debug log's DECODE
    lines; the prefill's FWD lines take varlen), and the tokens equal SDPA's."""
    ref, orc = _pair("llama")
    ids, mask, _ = _batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = orc.generate(ids, **kw)
    assert torch.equal(a, b), f"generated tokens differ\n{a}\n{b}"
    kinds = [ln.split()[0] for ln in debug_log()]
    layers = orc.config.num_hidden_layers
    assert kinds.count("DECODE") == 3 * layers and kinds.count("FWD") == layers, kinds


# ---- torch.compile -------------------------------------------------------------------------
# Under compile the integration reads no mask or position values on the host: a padding mask
# goes to the kernels as a key-padding mask, packed position_ids through torch.cond (a
# block-diagonal mask when they restart). One graph (fullgraph=True), the eager answer.

def _compiled_vs_eager(model, backend, **inputs):
    torch._dynamo.reset()
    eager = _run(model, **inputs)
    compiled_model = copy.deepcopy(model)
    compiled_model.forward = torch.compile(compiled_model.forward, backend=backend, fullgraph=True)
    return eager, _run(compiled_model, **inputs)


def _check_same(eager, compiled, keep=None):
    (le, Le, ge), (lc, Lc, gc) = eager, compiled
    _close("logits", lc if keep is None else lc[keep], le if keep is None else le[keep], rel=2e-5)
    _close("loss", Lc, Le, rel=2e-5)
    assert ge.keys() == gc.keys() and len(ge) > 0
    for n in ge:
        _close(f"grad {n}", gc[n], ge[n], rel=2e-5)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_compiled_training_step_is_one_graph(name, padding):
    _, orc = _pair(name)
    ids, mask, labels = _batch(padding)
    eager, compiled = _compiled_vs_eager(orc, "aot_eager", ids=ids, mask=None if padding == "none" else mask,
                                         labels=labels)
    _check_same(eager, compiled, keep=mask.bool())  # padded query rows: 0 on both paths


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_packed_position_ids(backend):
    """position_ids that restart inside a row (three packed sequences) under compile: the same
    logits and gradients as the eager varlen path, and each sequence as if alone."""
    _, orc = _pair("llama")
    lengths = [5, 3, 4]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                         if p.grad is not None}

    torch._dynamo.reset()
    eager = run(orc)
    compiled_model = copy.deepcopy(orc)
    compiled_model.forward = torch.compile(compiled_model.forward, backend=backend, fullgraph=True)
    _check_same(eager, run(compiled_model))
    # The unpacked row (positions 0..n-1) through the same compiled forward: the plain branch.
    plain = torch.arange(sum(lengths))[None]
    with torch.no_grad():
        want = orc(input_ids=ids, position_ids=plain, use_cache=False).logits
        _close("plain branch", compiled_model(input_ids=ids, position_ids=plain, use_cache=False).logits, want,
               rel=2e-5)


@pytest.mark.parametrize("route", ["plain", "packed", "masked", "all_ones_mask_packed"])
def test_compiled_attention_op_opcheck(route):
    """The op the compiled path calls (every eager choice it makes where it runs): its fake kernel,
    autograd registration and AOT tracing (torch.library.opcheck), with a sink and GQA."""
    from orchard.integrations import _compiled_attention
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 4, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 9, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    sink = torch.randn(4, generator=g, requires_grad=True)
    packed = route in ("packed", "all_ones_mask_packed")
    pos = torch.cat([torch.arange(4), torch.arange(5)]) if packed else torch.arange(9)
    mask = None
    if route == "masked":
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, :3] = False
    elif route == "all_ones_mask_packed":
        mask = torch.ones(2, 9, dtype=torch.bool)
    args = (q, k, v, pos[None].expand(2, -1), mask, 0.3, True, -1, -1, 0.0, sink, 0.0, None)
    torch.library.opcheck(_compiled_attention._FWD, args)


def test_compiled_all_ones_mask_keeps_packed_position_ids():
    """An all-ones 2-D mask counts as none (eager's mask function drops it), so position ids that
    restart still split the row: compiled (the mask is passed on unread) equals eager."""
    _, orc = _pair("llama")
    lengths = [5, 3, 4]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    kw = dict(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = orc(**kw).logits
        compiled_model = copy.deepcopy(orc)
        compiled_model.forward = torch.compile(compiled_model.forward, backend="aot_eager", fullgraph=True)
        _close("all-ones mask, packed", compiled_model(**kw).logits, eager, rel=2e-5)
        alone = orc(input_ids=ids[:, :5]).logits
        _close("packed row vs alone", eager[:, :5], alone, rel=2e-5)


def test_padding_inside_a_row_with_a_sliding_window():
    """A mask with a hole inside a row: the window counts positions (as SDPA does), so such a
    mask goes to the kernels as a key-padding mask rather than being unpadded (which would close
    the gap); eager and compiled agree with SDPA on the kept rows."""
    ref, orc = _pair("mistral")  # sliding_window 5
    ids, mask, labels = _batch("none")
    mask[0, 3:6] = 0
    keep = mask.bool()
    lr, _, _ = _run(ref, ids, mask, labels)
    lo, _, _ = _run(orc, ids, mask, labels)
    _close("eager vs sdpa", lo[keep], lr[keep])
    _, compiled = _compiled_vs_eager(orc, "aot_eager", ids=ids, mask=mask, labels=labels)
    _close("compiled vs sdpa", compiled[0][keep], lr[keep])


def test_plan_cache_is_per_buffer_not_per_tensor_object():
    """Under compile each layer's backward op gets its own tensor object for one buffer: the plan
    (a host read) is built once per buffer and content, not once per object."""
    from orchard.integrations._compiled_attention import cached
    builds = []
    pos = torch.arange(12)[None]
    for view in (pos, pos.view(1, 12), pos.detach()):  # three objects, one buffer
        cached(view, ("test",), lambda: builds.append(1) or len(builds))
    assert builds == [1]
    pos.add_(0)  # written: rebuilt
    cached(pos, ("test",), lambda: builds.append(1) or len(builds))
    other = torch.arange(12)[None]  # another buffer, same values: its own plan
    cached(other, ("test",), lambda: builds.append(1) or len(builds))
    assert builds == [1, 1, 1]
    other.copy_(other + 1)  # written, then asked through a .data alias (a counter of its own): rebuilt
    cached(other.data, ("test",), lambda: builds.append(1) or len(builds))
    assert builds == [1, 1, 1, 1]
