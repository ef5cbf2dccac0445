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
out, lse, _ = torch.ops.orchard.flash_attn_forward(q, k, v, d ** -0.5, False, False, 0.0, 0, 0, False, False, "x", None, *features)
g = torch.ops.orchard.flash_attn_backward(torch.ones_like(out), q, k, v, out, lse, d ** -0.5, False, False, 0.0, 0, 0, False, "x", None, *features)
torch.cuda.synchronize(); print(mode, "ok")
