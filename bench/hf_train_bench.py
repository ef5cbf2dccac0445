"""Training steps of a transformers Llama on Orchard against the model's other attention
implementations, same process, same weights and batches: where Orchard's integration
(python/orchard/integrations/transformers.py) meets real model code.

Batches, causal LM loss, forward + backward (no optimizer step):
  padded   rows of random lengths (right padding, a 2-D attention mask): Orchard unpads to
           varlen with one cu_seqlens for q and k (the sm90 kernels on Hopper), SDPA runs the
           4-D mask transformers builds;
  packed   the same tokens back to back in one row per batch entry, position_ids restarting
           at each sequence (DataCollatorWithFlattening's form): Orchard runs varlen, SDPA a
           block-diagonal mask;
  full     every row full length, no mask.

    python bench/hf_train_bench.py [--tiny] [--impls orchard,sdpa] [--out DIR]

--tiny: a small model on the CPU (checks the script, not a measurement). Each step is timed
with CUDA events (wall clock on the CPU), median of --steps after --warmup; the loss of every
implementation is printed so a mismatch shows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import transformers

import orchard.integrations.transformers  # noqa: F401  (registers "orchard")


def model_config(tiny):
    if tiny:
        return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512)
    # Llama-3-like block shapes (head dim 128, GQA 4:1), few layers: attention's share of a step
    # is that of a real model's layer.
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                    max_position_embeddings=8192)


def batches(cfg, b, s, device, seed=0):
    """{kind: (input_ids, attention_mask or None, position_ids or None, labels)}."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(s // 4, s + 1, (b,), generator=g)
    ids = torch.randint(3, cfg.vocab_size, (b, s), generator=g)
    out = {}
    mask = (torch.arange(s)[None, :] < lens[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    out["padded"] = (ids, mask, None, labels)
    # packed: the padded batch's tokens, back to back, cut into rows of s tokens
    flat = ids[mask.bool()]
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    rows = flat.numel() // s
    flat, pos = flat[:rows * s].view(rows, s), pos[:rows * s].view(rows, s)
    out["packed"] = (flat, None, pos, flat.clone())
    out["full"] = (ids, None, None, ids.clone())
    return {k: tuple(None if t is None else t.to(device) for t in v) for k, v in out.items()}


def timed_steps(model, batch, steps, warmup, device):
    ids, mask, pos, labels = batch
    times, loss = [], None
    for i in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        # use_cache=False: transformers' sdpa / eager masks honour packed position_ids only then
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(ms)
        loss = float(out.loss.detach())
    return statistics.median(times), loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--impls", default="orchard,sdpa")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    b, s = (2, 64) if args.tiny else (args.batch, args.seq)
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    cfg = model_config(args.tiny)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.train()
    data = batches(cfg, b, s, device)
    impls = args.impls.split(",")
    rows = []
    print(f"## transformers Llama training step ({'tiny, CPU' if args.tiny else torch.cuda.get_device_name()}, "
          f"{dtype}, b{b} s{s}, {cfg.num_hidden_layers} layers, h{cfg.num_attention_heads} "
          f"kv{cfg.num_key_value_heads} d{cfg.hidden_size // cfg.num_attention_heads})", flush=True)
    for kind, batch in data.items():
        base = None
        for impl in impls:
            model.set_attn_implementation(impl)
            try:
                ms, loss = timed_steps(model, batch, steps, warmup, device)
            except Exception as e:  # noqa: BLE001  (a peer that cannot run the batch)
                rows.append(dict(batch=kind, impl=impl, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"| {kind} | {impl} | failed: {rows[-1]['error']} |", flush=True)
                continue
            base = ms if impl == "orchard" else base
            ratio = "" if base is None or impl == "orchard" else f"{ms / base:.2f}x orchard's time"
            rows.append(dict(batch=kind, impl=impl, ms=ms, loss=loss))
            print(f"| {kind} | {impl} | {ms:.2f} ms | loss {loss:.4f} | {ratio} |", flush=True)
    with open(os.path.join(args.out, "hf_train_bench.json"), "w") as f:
        json.dump(dict(device=str(device), dtype=str(dtype), b=b, s=s, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
