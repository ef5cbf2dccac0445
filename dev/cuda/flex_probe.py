"""Does FlexAttention compile on this machine (session 11: it failed on the device with Triton's
cuda_utils .so missing)? Compiles one tiny causal flex_attention forward + backward, first with
torch.compile's defaults, then (child process) with TORCHINDUCTOR_COMPILE_THREADS=1 (no
compile-worker subprocess pool), printing the last lines of any error.

    python3 dev/cuda/flex_probe.py
"""
import os
import subprocess
import sys
import time
import traceback


def attempt():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 256, 256, device="cuda")
    t0 = time.time()
    try:
        out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)
        out.sum().backward()
        torch.cuda.synchronize()
        print(f"flex ok in {time.time() - t0:.1f} s", flush=True)
    except Exception:  # noqa: BLE001
        print(f"flex FAILED after {time.time() - t0:.1f} s:", "".join(traceback.format_exc().splitlines(True)[-6:]),
              flush=True)


if __name__ == "__main__":
    print("TORCHINDUCTOR_COMPILE_THREADS =", os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"), "CC =",
          os.environ.get("CC"), flush=True)
    attempt()
    if "--child" not in sys.argv:
        subprocess.run([sys.executable, __file__, "--child"], env=dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1"),
                       timeout=300)
