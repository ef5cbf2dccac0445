"""transformers' self-attention calls (q_len == kv_len: training, prefill) with position ids
and / or a 2-D padding mask, as one opaque op while torch.compile traces.

What the eager integration does depends on values (transformers.py): a mask with some padding
is unpadded; an all-ones mask counts as none; without one, position ids that restart inside a
row mark packed sequences. Reading those values on the host breaks the graph at every layer.
(torch.cond, which keeps both branches in the graph, hit an inductor bug: under no_grad a
branch's inputs reached it with strides other than the ones it was compiled for, torch 2.11.)
``orchard::transformers_attention`` and its backward read them where they run and make the
eager choices: a padded mask goes to the kernels as a key-padding mask (the padded queries come
out 0, as unpadded), packed sequences to the varlen kernels, anything else to the plain ones.
Outputs have fixed shapes, so the graph holds one extern call per layer and direction. They read
values on the host, so they are tagged cudagraph_unsafe.
"""

from __future__ import annotations

import weakref

import torch

from .. import _ops

_OP = "orchard.integrations.transformers"

# ---------------------------------------------------------------------------
# Plans. One model forward hands every layer the same position_ids / mask tensor, so what is
# read from it (and the one device -> host read of the max lengths) is computed once per tensor
# and reused by the other layers.
# ---------------------------------------------------------------------------

_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 8


def cached(t: torch.Tensor, key_extra, build):
    """build(), memoized per (view of a storage, key_extra) while the tensor it was built from is
    alive and its storage unmodified. Keyed by the storage and the view, not the tensor object:
    under torch.compile each layer's op (the backward's in particular) gets its own tensor object
    for one buffer, and a key per object rebuilt the plan, a host read, at every layer. The tensor
    kept (weakly) pins the storage, so a new buffer at a freed one's address cannot match. Writes
    are seen through the version counter: only those it counts (not writes through NumPy or a
    `.data` alias, which no autograd check sees either)."""
    try:
        version = t._version
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.device, key_extra)
    except (RuntimeError, AttributeError, NotImplementedError):  # inference / fake tensors: no caching
        return build()
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        # Alive (so the storage is the one the key names) and not written since the build, by its
        # own counter and by the asking tensor's (a .data / set_ alias has a counter of its own).
        seen = hit[0]()
        if seen is not None and seen._version == hit[1] and (t is seen or version == hit[1]):
            return hit[2]
    plan = build()
    if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = (weakref.ref(t), version, plan)
    return plan


def packed_plan(position_ids: torch.Tensor, b: int, s: int):
    """cu_seqlens over the flattened (b * s) tokens when position_ids restart
    inside a row (packed sequences), else None. A new sequence starts at each
    row start and wherever the position is not the previous one + 1 (as
    transformers' packed-sequence detection)."""
    pos = position_ids
    if pos.shape[0] != b:
        pos = pos.expand(b, -1)
    starts = torch.ones(b, s, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    start_idx = starts.flatten().nonzero().flatten()
    bounds = torch.cat((start_idx, start_idx.new_tensor([b * s])))
    lengths = bounds.diff()
    cu = bounds.to(torch.int32)
    return cu, int(lengths.max())


def _route(q, position_ids, mask):
    """("masked", None) for a mask with padding, ("packed", (cu, longest)) for restarting position
    ids, else ("plain", None): the eager integration's choice for this call."""
    if mask is not None and not cached(mask, ("all",), lambda: bool(mask.all())):
        return "masked", None
    if position_ids is not None:
        b, s = q.shape[:2]
        plan = cached(position_ids, ("packed", b), lambda: packed_plan(position_ids, b, s))
        if plan is not None:
            return "packed", plan
    return "plain", None


# ---------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------

_SETTINGS = ("float softmax_scale, bool causal, SymInt window_left, SymInt window_right, float softcap, "
             "Tensor? sink, float dropout_p, Tensor? rng_state")
_TAGS = (torch.Tag.pt2_compliant_tag, torch.Tag.cudagraph_unsafe)
_ops._LIB.define("transformers_attention(Tensor q, Tensor k, Tensor v, Tensor? position_ids, Tensor? mask, "
                 + _SETTINGS + ") -> (Tensor, Tensor)", tags=_TAGS)
_ops._LIB.define("transformers_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                 "Tensor lse, Tensor? position_ids, Tensor? mask, " + _SETTINGS
                 + ") -> (Tensor, Tensor, Tensor, Tensor)", tags=_TAGS)


def _features(window_left, window_right, softcap, sink, cu=None, longest=0, attn_mask=None):
    # window, softcap, ALiBi, sink, attn_mask, cu_seqlens q / k, max seqlens, dropout coordinates
    return (window_left, window_right, softcap, None, sink, attn_mask, cu, cu, longest, longest, 0, 0, 0, 0)


def key_padding_mask(mask, q):
    """The (batch, kv_len) mask as the kernels' (batch, heads, q_len, kv_len) boolean mask, read in
    place (stride 0 over heads and queries), and the queries' own rows (batch, q_len, 1, 1)."""
    b, sq, hq = q.shape[:3]
    return mask[:, None, None, :].expand(b, hq, sq, mask.shape[1]), mask[:, -sq:, None, None]


@_ops._disable_dynamo
def _forward(q, k, v, position_ids, mask, softmax_scale, causal, window_left, window_right, softcap, sink,
             dropout_p, rng_state):
    """(out (b, s, h, d_v) contiguous, lse (b, h, s))."""
    kind, plan = _route(q, position_ids, mask)
    settings = (softmax_scale, causal, False, dropout_p, 0, 0, False, False, _OP, rng_state)
    if kind == "masked":
        key_mask, rows = key_padding_mask(mask, q)
        out, lse, _ = _ops._forward_kernel(q, k, v, *settings,
                                           *_features(window_left, window_right, softcap, sink, attn_mask=key_mask))
        return (out * rows.to(out.dtype)).contiguous(), lse.contiguous()
    if plan is None:
        out, lse, _ = _ops._forward_kernel(q, k, v, *settings, *_features(window_left, window_right, softcap, sink))
        return out.contiguous(), lse.contiguous()
    b, s, h = q.shape[:3]
    cu, longest = plan
    out, lse, _ = _ops._forward_kernel(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), *settings,
                                       *_features(window_left, window_right, softcap, sink, cu, longest))
    return out.view(b, s, h, -1).contiguous(), lse.view(h, b, s).transpose(0, 1).contiguous()


@_ops._disable_dynamo
def _backward(dout, q, k, v, out, lse, position_ids, mask, softmax_scale, causal, window_left, window_right,
              softcap, sink, dropout_p, rng_state):
    """(dq, dk, dv, dsink) contiguous; dsink has no elements without a sink."""
    kind, plan = _route(q, position_ids, mask)
    settings = (softmax_scale, causal, False, dropout_p, 0, 0, False, _OP, rng_state)
    if kind == "masked":  # the padded queries' outputs were set to 0: no gradient reaches them
        key_mask, rows = key_padding_mask(mask, q)
        dout = dout * rows.to(dout.dtype)
        dq, dk, dv = _ops._backward_kernel(dout, q, k, v, out, lse, *settings,
                                           *_features(window_left, window_right, softcap, sink, attn_mask=key_mask))
        dsink = None if sink is None else _ops.sink_grad(dout, out, lse, sink)
    elif plan is None:
        dq, dk, dv = _ops._backward_kernel(dout, q, k, v, out, lse, *settings,
                                           *_features(window_left, window_right, softcap, sink))
        dsink = None if sink is None else _ops.sink_grad(dout, out, lse, sink)
    else:
        b, s, h = q.shape[:3]
        cu, longest = plan
        flat = [t.reshape(b * s, *t.shape[2:]) for t in (dout, q, k, v, out)]
        lse_flat = lse.transpose(0, 1).reshape(h, b * s)
        dq, dk, dv = _ops._backward_kernel(*flat, lse_flat, *settings,
                                           *_features(window_left, window_right, softcap, sink, cu, longest))
        dq, dk, dv = dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
        dsink = None if sink is None else _ops.sink_grad(flat[0], flat[4], lse_flat, sink, varlen=True)
    if dsink is None:
        dsink = torch.zeros((0,), dtype=torch.float32, device=q.device)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsink


def _forward_fake(q, k, v, position_ids, mask, *settings):
    b, s, h = q.shape[:3]
    return q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=_ops._lse_dtype(q.dtype))


def _backward_fake(dout, q, k, v, out, lse, position_ids, mask, softmax_scale, causal, window_left, window_right,
                   softcap, sink, dropout_p, rng_state):
    dsink = q.new_empty(sink.shape if sink is not None else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


_ops._LIB.impl("transformers_attention", _forward, "CompositeExplicitAutograd")
_ops._LIB.impl("transformers_attention_backward", _backward, "CompositeExplicitAutograd")
torch.library.register_fake("orchard::transformers_attention", _forward_fake, lib=_ops._LIB)
torch.library.register_fake("orchard::transformers_attention_backward", _backward_fake, lib=_ops._LIB)
_FWD = torch.ops.orchard.transformers_attention.default
_BWD = torch.ops.orchard.transformers_attention_backward.default


def _setup_context(ctx, inputs, output):
    q, k, v, position_ids, mask, *settings = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, position_ids, mask, settings[5], settings[7])
    ctx.settings = settings


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, position_ids, mask, sink, rng_state = ctx.saved_tensors
    s = ctx.settings
    dq, dk, dv, dsink = _BWD(dout.contiguous(), q, k, v, out, lse, position_ids, mask, s[0], s[1], s[2], s[3], s[4],
                             sink, s[6], rng_state)
    # q, k, v, position_ids, mask, scale, causal, window left / right, softcap, sink, dropout_p, rng_state
    return dq, dk, dv, None, None, None, None, None, None, None, (dsink if sink is not None else None), None, None


torch.library.register_autograd("orchard::transformers_attention", _autograd_backward,
                                setup_context=_setup_context, lib=_ops._LIB)


def attention(q, k, v, position_ids, mask, dropout_p, softmax_scale, causal, window_size, softcap, sink):
    """The integration's self-attention call for (batch, seq, heads, dim) q / k / v with position ids
    and / or a (batch, seq) bool mask (either may be None): (batch, seq, heads, dim_v) out."""
    scale = _ops.default_scale(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    rng = _ops.draw_dropout_rng_state(dropout_p, q.device)
    return _FWD(q, k, v, position_ids, mask, scale, bool(causal), int(window_size[0]), int(window_size[1]),
                float(softcap), sink, float(dropout_p), rng)[0]
