"""Forward + backward calls of the sm90 kernels' kBias instantiations (row-broadcast attn_bias:
a key-padding bool mask (B, 1, 1, S), right or left padded or hiding keys in the middle, whose
hidden key tiles the kernels do not run, and a float key bias (1, H, 1, S), attn_bias_fragment.cuh;
dense ones staged by TMA (the forward, and the backward up to d128), attn_bias_tiles.cuh: a bool
mask (B, H, S, S) and a 16-bit float bias (1, H, S, S), rows padded to 16-byte chunks and sliced to the ragged sk),
d64 / d128 / d192 / d256 buckets (d 80 and 160 below their buckets), causal and not, bf16 and
fp16, GQA, ragged lengths (the column reads stop and clamp at sk), for compute-sanitizer
(memcheck, racecheck) to watch. Each output is also checked against plain fp32 math, so a wrong
answer fails the run. SANITIZE_DIMS=64,128 runs those head dims only."""
import os

import torch

import orchard

torch.manual_seed(0)
dims = [int(x) for x in os.environ.get("SANITIZE_DIMS", "64,80,128,160,256").split(",")]
b, hq, hkv, sq, sk = 2, 4, 2, 330, 461
for dtype in (torch.bfloat16, torch.float16):
    for d in dims:
        for causal in (False, True):
            for kind in ("bool", "bool_left", "float", "dense_bool", "dense_float"):
                q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
                if kind.startswith("bool"):
                    mask = torch.ones(b, 1, 1, sk, device="cuda", dtype=torch.bool)
                    if kind == "bool":
                        mask[-1, ..., 300:] = False
                    else:  # hidden key tiles at the low end and in the middle (not run)
                        mask[0, ..., :260] = False
                        mask[1, ..., 100:300] = False
                    bias = torch.zeros(mask.shape, device="cuda").masked_fill(~mask, float("-inf"))
                elif kind == "dense_bool":
                    # Rows of 480 bytes: the comparison before the slice (after it, the result would be a
                    # packed tensor of sk-byte rows, which TMA cannot stage: the sm80 kernels would run).
                    mask = (torch.rand(b, hq, sq, 480, device="cuda") > 0.3)[..., :sk]
                    bias = torch.zeros(mask.shape, device="cuda").masked_fill(~mask, float("-inf"))
                elif kind == "dense_float":
                    mask = torch.randn(1, hq, sq, 464, device="cuda", dtype=dtype)[..., :sk]
                    bias = mask.float()
                else:
                    mask = torch.randn(1, hq, 1, sk, device="cuda", dtype=dtype)
                    bias = mask.float()
                if kind.startswith("dense"):  # stageable rows, or this kind would not reach the TMA tiles
                    assert mask.stride(-2) * mask.element_size() % 16 == 0, (kind, mask.stride())
                scale = d ** -0.5
                features = (-1, -1, 0.0, None, None, mask)
                out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, scale, causal, False, 0.0, 0, 0, False,
                                                                   False, "orchard.flash_attn", None, *features)
                do = torch.ones_like(out)
                grads = torch.ops.orchard.flash_attn_backward(do, q, k, v, out, lse, scale, causal, False, 0.0, 0, 0,
                                                              False, "orchard.flash_attn", None, *features)
                qf, kf, vf = (x.detach().float().transpose(1, 2) for x in (q, k, v))
                rep = hq // hkv
                # Plain fp32 math (not torch's SDPA: its own kernels would show up under racecheck).
                scores = qf @ kf.repeat_interleave(rep, 1).transpose(-1, -2) * scale + bias
                if causal:
                    hidden = torch.ones(sq, sk, device="cuda", dtype=torch.bool).triu(sk - sq + 1)
                    scores.masked_fill_(hidden, float("-inf"))
                # (rows that see no key: NaN here, 0 from Orchard)
                ref = (scores.softmax(-1).nan_to_num(0.0) @ vf.repeat_interleave(rep, 1)).transpose(1, 2)
                err = (out.float() - ref).abs().max().item()
                assert err < 2e-2, f"d{d} causal={causal} {kind} {dtype}: max error {err}"
                assert all(torch.isfinite(g).all() for g in grads)
                print(f"d{d} causal={causal} {kind} {dtype}: out err {err:.2e}", flush=True)
