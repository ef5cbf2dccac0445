"""Greedy generation with a transformers Llama on Orchard against the model's SDPA attention:
same process, same weights, same prompt; the prefill and the per-token decode step timed apart
(the decode steps are where Orchard's few-rows path runs: one query row per step against the
growing cache). The generated tokens of both must match (printed).

    python bench/hf_generate_bench.py [--device cpu] [--dtypes float32,bfloat16] [--prompt 4096]
        [--new 64] [--reps 2] [--batch 1] [--left-pad]

--batch B --left-pad: B prompts, row r left-padded by r * prompt / (2 B) tokens (transformers'
form for batched generation; Orchard's steps then take flash_attn_with_kvcache with cache_leftpad).

Timing: one generate(1 + new) per rep with a streamer that stamps each token as generate hands it
over: prefill = start to the first new token, decode step = the median gap between the later
ones; min over --reps, wall clock (CUDA synchronised at each stamp). The model is small (2 layers, hidden 512, 8
heads over 2 kv heads, head dim 64), so attention's share of a step is large: an upper bound
on what attention speed buys a real model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import orchard.integrations.transformers  # noqa: F401  (registers "orchard")


class TokenClock:
    """A generate() streamer that stamps each call: the prompt first, then every new token."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def put(self, value):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def timed_generate(model, ids, new, device, gen):
    """(prefill seconds, median decode-step seconds, output ids) of one greedy generate."""
    clock = TokenClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=1 + new, min_new_tokens=1 + new, streamer=clock, **gen)
    tokens = clock.stamps[1:]  # stamps[0]: the prompt, handed over before the prefill runs
    return tokens[0] - t0, statistics.median(b - a for a, b in zip(tokens, tokens[1:])), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--left-pad", action="store_true")
    args = ap.parse_args()
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=args.prompt + args.new + 8)
    ids = torch.randint(3, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if args.left_pad:
        for r in range(args.batch):
            pad = r * args.prompt // (2 * args.batch)
            ids[r, :pad], mask[r, :pad] = 0, 0
    ids, mask = ids.to(args.device), mask.to(args.device)
    gen = dict(attention_mask=mask, pad_token_id=0, do_sample=False)
    print(f"## transformers Llama generation ({args.device}, threads {torch.get_num_threads()}, batch {args.batch}"
          f"{' left-padded' if args.left_pad else ''}, prompt {args.prompt}, {args.new} new tokens, 2 layers, "
          f"h8 kv2 d64, torch {torch.__version__})")
    print("| dtype | attention | prefill ms | decode ms / token | SDPA's time / this | tokens match |")
    print("|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, dname)).eval()
        best, tokens = {}, {}
        for _ in range(args.reps):
            for impl in ("sdpa", "orchard"):
                model.set_attn_implementation(impl)
                with torch.no_grad():
                    pre, step, out = timed_generate(model, ids, args.new, args.device, gen)
                old = best.get(impl, (float("inf"), float("inf")))
                best[impl] = (min(old[0], pre), min(old[1], step))
                tokens[impl] = out[:, args.prompt:].tolist()
        same = tokens["orchard"] == tokens["sdpa"]
        for impl in ("sdpa", "orchard"):
            pre, step = best[impl]
            ratio = "" if impl == "sdpa" else (f"{best['sdpa'][0] / pre:.2f}x / {best['sdpa'][1] / step:.2f}x")
            print(f"| {dname} | {impl} | {1e3 * pre:.0f} | {1e3 * step:.2f} | {ratio} | "
                  f"{'' if impl == 'sdpa' else same} |", flush=True)


if __name__ == "__main__":
    main()
