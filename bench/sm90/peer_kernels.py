"""Which kernels a peer launches for one attention shape, with their launch geometry and time
(issue #11: what tile and grid cuDNN picks where Orchard's forward is short of it).  torch's
profiler (CUPTI) over a few SDPA calls on BSHD tensors viewed as (b, h, s, d), per backend:
each kernel's name (cuDNN's generated names carry its tile shape), grid, block, shared memory
and mean device time.  From the repository root on a GPU machine:
    python3 bench/sm90/peer_kernels.py --d 64 --s 2048 --causal [--backends cudnn,flash]
"""
import argparse
import json
import tempfile
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def kernels_of(backend, q, k, v, causal, reps, backward):
    """{(name, grid, block, smem): [device µs per launch]} over `reps` calls after a warm-up."""
    def call():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            out.backward(torch.ones_like(out))
    with sdpa_kernel([BACKENDS[backend]]):
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize()
    # The Chrome trace's kernel events carry the launch geometry in their args.
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    found = defaultdict(list)
    for e in events:
        if e.get("cat") != "kernel":
            continue
        args = e.get("args", {})
        key = (e["name"], str(args.get("grid", "?")), str(args.get("block", "?")), str(args.get("shared memory", "?")))
        found[key].append(float(e.get("dur", 0.0)))
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--s", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384, help="b * s (the FA grid's 16k)")
    ap.add_argument("--heads", type=int, default=0, help="default: 2048 / d (d192: 10)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true", help="profile forward + backward")
    ap.add_argument("--backends", default="cudnn,flash")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    h = a.heads or (10 if a.d == 192 else 2048 // a.d)
    b = max(1, a.tokens // a.s)
    q, k, v = (torch.randn(b, a.s, h, a.d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_(a.backward) for _ in range(3))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}: "
          f"b{b} h{h} s{a.s} d{a.d} {'causal' if a.causal else 'full'} bf16{' fwd+bwd' if a.backward else ''}")
    for name in a.backends.split(","):
        try:
            found = kernels_of(name, q, k, v, a.causal, a.reps, a.backward)
        except RuntimeError as e:  # a backend that refuses the shape
            print(f"{name}: not run ({str(e).splitlines()[0]})")
            continue
        print(f"{name}:")
        for (kname, grid, block, smem), times in sorted(found.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(times) / len(times):9.1f} us x{len(times) // a.reps:<2d} grid {grid} block {block} "
                  f"smem {smem}  {kname}")


if __name__ == "__main__":
    main()
