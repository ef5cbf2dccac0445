"""Which call hangs: each case in its own process with a time limit (a hung kernel never returns).
A cold process on a fresh device machine needs more than 15 s to import torch and start CUDA
(session 52: every case, the control included, ran past 15 s), hence 60."""
import subprocess, sys
CASE = """
import torch, orchard
sq, sk, d, causal, bwd = {sq}, {sk}, {d}, {causal}, {bwd}
q = torch.randn(1, sq, 4, d, device='cuda', dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, sk, 2, d, device='cuda', dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, sk, 2, d, device='cuda', dtype=torch.bfloat16, requires_grad=True)
o = orchard.flash_attn_func(q, k, v, causal=causal)
torch.cuda.synchronize()
if bwd:
    o.backward(torch.randn_like(o)); torch.cuda.synchronize()
print('ok')
"""
# The most suspect case last: after a hung kernel the GPU may stay busy for the later cases.
for sq, sk, d, causal, bwd in [(2200, 2300, 64, False, False), (2200, 2200, 64, True, False),
                               (2200, 2200, 64, True, True), (2200, 2300, 64, True, False),
                               (2200, 2300, 64, True, True)]:
    try:
        r = subprocess.run([sys.executable, "-c", CASE.format(sq=sq, sk=sk, d=d, causal=causal, bwd=bwd)],
                           capture_output=True, text=True, timeout=60)
        res = r.stdout.strip() or r.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        res = "HANG"
    print(f"sq {sq} sk {sk} d {d} causal {causal} bwd {bwd}: {res}", flush=True)
