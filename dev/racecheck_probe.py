"""One bf16 d64 forward + backward (b2, sq 330, sk 461, GQA 4:2) for compute-sanitizer racecheck to
watch (session 37): `plain`, `window` (left 100) or `bias` (an all-visible key-padding mask: the sm90
kBias kernels). All three report the same 8 hazards, the backward producer's LSE / D rows against the
consumers' reads, which mbarrier waits order and racecheck does not model (bench/RESULTS.md).
    compute-sanitizer --tool racecheck python3 dev/racecheck_probe.py plain|window|bias
"""
import os, sys, torch, orchard
torch.manual_seed(0)
mode = sys.argv[1]
b, hq, hkv, sq, sk, d = 2, 4, 2, 330, 461, 64
q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(b, 1, 1, sk, device="cuda", dtype=torch.bool) if mode == "bias" else None
wl = 100 if mode == "window" else -1
features = (wl, -1, 0.0, None, None, mask)
out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, d ** -0.5, False, False, 0.0, 0, 0, False, False, "orchard.flash_attn", None, *features)
g = torch.ops.orchard.flash_attn_backward(torch.ones_like(out), q, k, v, out, lse, d ** -0.5, False, False, 0.0, 0, 0, False, "orchard.flash_attn", None, *features)
torch.cuda.synchronize(); print(mode, "ok")
