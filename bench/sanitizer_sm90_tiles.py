"""Forward + backward calls with more tiles than SMs (each persistent sm90 forward CTA runs
several tiles, so the consumer warpgroups' GEMM token passes across tiles), d64 / d96 / d128 / d192
/ d256 (d128's and d192's at these lengths write O by TMA stores from shared memory; d128 at 1024 keys
runs the 128-key tiles with two Q buffers, at 2048 keys non-causal the 192-key tiles that stage O
in a V stage; d192 at 960 keys non-causal its 64-key tiles, causal and at 1536 keys the 96-key
tiles whose two warpgroups share one O buffer in turn; d64 causal under 2048 keys runs 2 consumer
warpgroups, 3 otherwise; d256 at 1024 keys its 64-key tiles, 192 tiles for 132 SMs),
causal and not, bf16 and fp16, GQA, for compute-sanitizer (memcheck, racecheck, synccheck) to watch.
Each output is also checked against plain fp32 math, so a wrong answer fails the run.
SANITIZE_DIMS=96,128 runs those head dims only, SANITIZE_DTYPES=bf16 one dtype (racecheck is slow:
one bucket per call fits)."""
import os

import torch

import orchard

torch.manual_seed(0)
props = torch.cuda.get_device_properties(0)
dims = {int(x) for x in os.environ.get("SANITIZE_DIMS", "64,96,128,192,256").split(",")}
dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
for dtype in (dtypes[x] for x in os.environ.get("SANITIZE_DTYPES", "bf16,fp16").split(",")):
    for d, b, hq, hkv, s in ((64, 4, 8, 4, 1024), (64, 3, 8, 8, 960), (96, 3, 8, 8, 960), (128, 3, 8, 8, 1024),
                              (128, 2, 8, 8, 2048), (256, 3, 8, 8, 1024), (192, 3, 8, 8, 960),
                              (192, 2, 8, 8, 1536)):
        if d not in dims:
            continue
        for causal in (False, True):
            q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
            out = orchard.flash_attn_func(q, k, v, causal=causal)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            qf, kf, vf = (x.detach().float().transpose(1, 2) for x in (q, k, v))
            rep = hq // hkv
            # Plain fp32 math (not torch's SDPA: its own kernels would show up under racecheck).
            scores = qf @ kf.repeat_interleave(rep, 1).transpose(-1, -2) / d ** 0.5
            if causal:
                scores.masked_fill_(torch.ones(s, s, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
            ref = (scores.softmax(-1) @ vf.repeat_interleave(rep, 1)).transpose(1, 2)
            err = (out.float() - ref).abs().max().item()
            assert err < 2e-2, f"d{d} causal={causal} {dtype}: max error {err}"
            assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
            print(f"d{d} causal={causal} {dtype} ({props.multi_processor_count} SMs): out err {err:.2e}", flush=True)
