"""SDPA's decode call at one point, for a profiler (bench/decode/ab.sh, NCU_SDPA=1): torch only.
  python3 bench/decode/sdpa_probe.py [b hkv hq L d]"""
import sys

import torch
import torch.nn.functional as F

b, hkv, hq, L, d = (int(x) for x in (sys.argv[1:] or ["64", "4", "32", "131072", "128"]))
q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, L, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for _ in range(3):
    F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
torch.cuda.synchronize()
torch.cuda.profiler.start()
F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
torch.cuda.synchronize()
torch.cuda.profiler.stop()
