"""``python -m orchard demo``: train a small causal transformer LM through Orchard.

A char-level GPT (default 4 layers, d_model 128, 4 heads, context 128) learns
the Shakespeare text shipped in ``data/corpus.txt``; every attention call goes
through :func:`orchard.scaled_dot_product_attention` (``is_causal=True``),
forward and backward. It runs on CUDA when available, else on the CPU, and
prints the loss and tokens/s with a tqdm progress bar.

It ends with two checks and exits 1 if either fails:

1. the loss fell (mean of the last 10 steps well below the first 10);
2. one step's gradients match the same model (same weights, same batch) run
   with ``torch.nn.functional.scaled_dot_product_attention`` — the largest
   per-parameter relative error (||g_orchard - g_torch|| / ||g_torch||) is
   printed and must be below ``--grad-tol``.

Set ``ORCHARD_DEBUG_FLASH_ATN=1`` to see every attention call logged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import orchard


def find_corpus(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    here = Path(__file__).resolve().parent
    candidates = [
        here / "data" / "corpus.txt",                   # installed wheel
        here.parent.parent / "data" / "corpus.txt",     # source tree (python/orchard -> repo)
        Path.cwd() / "data" / "corpus.txt",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError("data/corpus.txt not found; pass --corpus PATH")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.use_torch_sdpa = False  # switched on for the gradient cross-check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, H, D) -> (B, H, T, D) views: Orchard reads them in place.
        q = q.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        k = k.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        v = v.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.use_torch_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = orchard.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d_model: int, n_layers: int, n_heads: int,
                 dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(ctx, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_torch_sdpa(self, on: bool):
        for blk in self.blocks:
            blk.attn.use_torch_sdpa = on

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def get_batch(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator, device):
    ix = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=gen)
    x = torch.stack([data[i:i + ctx] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + ctx] for i in ix.tolist()])
    return x.to(device), y.to(device)


def grad_check(model: CharGPT, x, y) -> float:
    """Max over parameters of ||g_orchard - g_torch|| / ||g_torch|| for one step."""
    was_training = model.training
    model.eval()  # no dropout: both runs see the same function
    grads = []
    for use_torch in (False, True):
        model.set_torch_sdpa(use_torch)
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        grads.append([p.grad.detach().double().clone() for p in model.parameters()])
    model.set_torch_sdpa(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    worst = 0.0
    for go, gt in zip(*grads):
        denom = gt.norm().item()
        if denom == 0.0:
            continue
        worst = max(worst, (go - gt).norm().item() / denom)
    return worst


def sample(model: CharGPT, stoi, itos, ctx: int, device, n: int = 200, seed: int = 0) -> str:
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.tensor([[stoi.get("\n", 0)]], device=device)
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -ctx:])[:, -1, :].float().cpu()
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt.to(device)], dim=1)
    model.train()
    return "".join(itos[i] for i in idx[0].tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchard demo", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="autocast dtype on CUDA (auto: bfloat16 on CUDA, float32 = no autocast); "
                         "the CPU trains in float32")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--corpus", default=None, help="text file (default: the shipped data/corpus.txt)")
    ap.add_argument("--grad-tol", type=float, default=None,
                    help="max relative gradient error vs torch SDPA (default 1e-3 fp32, 5e-2 low precision)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--sample", type=int, default=200, help="characters to sample at the end (0: none)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    corpus = find_corpus(args.corpus)
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for c, i in stoi.items()}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * data.numel())
    train, val = data[:n_train], data[n_train:]

    model = CharGPT(len(chars), args.ctx, args.d_model, args.layers, args.heads, args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    use_amp = amp_dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    print(f"orchard {orchard.__version__} demo: device {device}, corpus {corpus} "
          f"({len(text):,} chars, vocab {len(chars)}), {n_params / 1e6:.2f}M params, "
          f"{args.layers} layers x {args.heads} heads, d_model {args.d_model}, ctx {args.ctx}, "
          f"batch {args.batch}, {args.steps} steps, "
          f"{dtype_name if use_amp else 'float32'}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    tokens_per_step = args.batch * args.ctx
    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), disable=args.no_progress, dynamic_ncols=True, file=sys.stdout)
    except ImportError:  # the demo extra brings tqdm; run without a bar otherwise
        bar = range(args.steps)
    t0 = time.perf_counter()
    model.train()
    for step in bar:
        x, y = get_batch(train, args.batch, args.ctx, gen, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        lv = loss.item()
        if not math.isfinite(lv):
            print(f"FAIL: loss became {lv} at step {step}")
            return 1
        losses.append(lv)
        show_bar = hasattr(bar, "set_postfix") and not args.no_progress
        if show_bar and (step % 5 == 0 or step == args.steps - 1):
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{lv:.3f}", tok_s=f"{tokens_per_step * (step + 1) / el:,.0f}")
        elif not show_bar and (step % 20 == 0 or step == args.steps - 1):
            el = time.perf_counter() - t0
            print(f"step {step:5d}  loss {lv:.4f}  {tokens_per_step * (step + 1) / el:,.0f} tokens/s",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    tok_s = tokens_per_step * args.steps / max(elapsed, 1e-9)

    model.eval()
    with torch.no_grad():
        vx, vy = get_batch(val, args.batch, args.ctx, gen, device)
        val_loss = model(vx, vy).item()
    model.train()

    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f}; val loss {val_loss:.4f}")
    print(f"throughput: {tok_s:,.0f} tokens/s ({elapsed:.1f} s for {args.steps} steps)")
    if args.sample > 0:
        print("sample:\n" + "-" * 40 + "\n" + sample(model, stoi, itos, args.ctx, device, args.sample)
              + "\n" + "-" * 40)

    ok = True
    if not (last < first - 0.25 and last < 0.9 * first):
        print(f"FAIL: loss did not fall enough ({first:.4f} -> {last:.4f})")
        ok = False
    else:
        print(f"PASS: loss fell ({first:.4f} -> {last:.4f})")

    # Gradient cross-check against torch SDPA, full precision, same weights and batch.
    gx, gy = get_batch(train, min(args.batch, 8), args.ctx, gen, device)
    rel = grad_check(model, gx, gy)
    tol = args.grad_tol if args.grad_tol is not None else 1e-3
    verdict = "PASS" if rel <= tol else "FAIL"
    print(f"{verdict}: gradients vs torch.nn.functional.scaled_dot_product_attention: "
          f"max relative error {rel:.3e} (tolerance {tol:.0e})")
    ok = ok and rel <= tol
    print("demo " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
