"""float32 attention on CUDA: Orchard's kernels (the 3xTF32 tensor-core kernels of flash_fp32_tc.cu
by default, "orchard_simt" = the SIMT kernels of flash_fp32.cu through ORCHARD_CUDA_FP32_TC=0,
and the decode kernel for few query rows) against torch SDPA's float32 backends (efficient =
CUTLASS kernels, fp32 as 3xTF32 on tensor cores; math = matmuls + softmax), timed in the same
process on the same card.

Prefill / training points: forward and forward + backward, (B, S, H, D) inputs, causal and
not. Decode points: one query row per sequence (GQA 4:1) against a long key set, forward only.
Timing: triton.testing.do_bench (median, L2 flushed between calls) when triton is present,
else CUDA events around back-to-back calls. Prints a markdown table; --out writes it too.

    python bench/fp32_cuda_bench.py [--out results.md] [--quick]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard

try:
    from triton.testing import do_bench
except ImportError:  # CUDA events around back-to-back calls, median (gpu_bench.py's timer)
    from gpu_bench import median_ms

    def do_bench(fn):
        return median_ms(fn, 50, warmup=5)


def sdpa(backend, enable_gqa=False):
    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal, enable_gqa=enable_gqa).transpose(1, 2)
    return run


IMPLS = {
    "orchard": lambda q, k, v, causal: orchard.flash_attn_func(q, k, v, causal=causal),
    "orchard_simt": lambda q, k, v, causal: orchard.flash_attn_func(q, k, v, causal=causal),
    "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_math": sdpa(SDPBackend.MATH),
}
ENV = {"orchard_simt": {"ORCHARD_CUDA_FP32_TC": "0"}}  # set around the timed call (read per call)


def with_env(fn, env):
    if not env:
        return fn

    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return run


def time_ms(fn):
    try:
        return do_bench(fn)
    except RuntimeError as e:  # a backend that refuses the shape / dtype
        print(f"  (skipped: {str(e).splitlines()[0][:100]})")
        return float("nan")


def prefill_rows(points, backward):
    rows = []
    for b, s, h, d, causal in points:
        flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", requires_grad=backward) for _ in range(3))
        do = torch.randn_like(q)
        times = {}
        for name, run in IMPLS.items():
            if name == "sdpa_math" and s > 4096:
                times[name] = float("nan")  # its S x S scores: memory, and minutes of timing
                continue
            if backward:
                fn = lambda run=run: torch.autograd.grad(run(q, k, v, causal), (q, k, v), do)  # noqa: E731
            else:
                fn = lambda run=run: run(q, k, v, causal)  # noqa: E731
            times[name] = time_ms(with_env(fn, ENV.get(name)))
        rows.append(((b, s, h, d, causal), times, flops))
    return rows


def decode_rows(points):
    rows = []
    for b, sk, hq, hkv, d in points:
        q = torch.randn(b, 1, hq, d, device="cuda")
        k, v = (torch.randn(b, sk, hkv, d, device="cuda") for _ in range(2))
        times = {"orchard": time_ms(lambda: orchard.flash_attn_func(q, k, v))}
        times["orchard_simt"] = float("nan")  # (decode rows take the decode kernel either way)
        # SDPA efficient has no GQA: its row runs on K / V expanded to every query head beforehand
        # (the expansion untimed), the fastest way a user could call it; math takes enable_gqa.
        group = hq // hkv
        k_full, v_full = (t.repeat_interleave(group, dim=2) for t in (k, v))
        times["sdpa_efficient"] = time_ms(lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION)(q, k_full, v_full, False))
        times["sdpa_math"] = time_ms(lambda: sdpa(SDPBackend.MATH, enable_gqa=True)(q, k, v, False))
        rows.append(((b, sk, hq, hkv, d), times, 4 * b * hq * sk * d))
    return rows


def table(title, head, rows):
    names = list(IMPLS)
    out = [f"### {title}", "", f"| {head} | " + " | ".join(f"{n} ms" for n in names) +
           " | orchard TFLOP/s | peer's time / orchard's | simt's time / orchard's |", "|" + "---|" * (len(names) + 4)]
    for point, times, flops in rows:
        peers = [times[n] for n in names if not n.startswith("orchard") and times[n] == times[n]]
        best = min(peers) if peers else float("nan")
        out.append(f"| {' '.join(map(str, point))} | " + " | ".join(f"{times[n]:.3f}" for n in names) +
                   f" | {flops / times['orchard'] / 1e9:.2f} | {best / times['orchard']:.2f}x"
                   f" | {times['orchard_simt'] / times['orchard']:.2f}x |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    seqs = (1024, 4096) if args.quick else (1024, 4096, 8192)
    points = [(2, s, 16, d, c) for d in (64, 128) for s in seqs for c in (False, True)]
    decode = [(b, sk, 32, 8, 128) for b in (1, 8) for sk in (4096, 32768)] + [(1, 4096, 8, 2, 64)]
    head = "b s h d causal"
    md = f"## float32 attention, {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
    md += table("forward", head, prefill_rows(points, backward=False))
    md += "\n" + table("forward + backward", head, prefill_rows(points, backward=True))
    md += "\n" + table("decode (1 query row, forward)", "b sk hq hkv d", decode_rows(decode))
    md += "\n(peer = the fastest SDPA backend that ran; > 1 means Orchard is faster)\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
