"""Context-parallel benchmark and check for orchard.distributed (issue #14).

Launch on one host with W GPUs (measured on 2 x H200 over NVLink):

    torchrun --standalone --nproc-per-node=2 bench/cp_bench.py [--out PATH]

What it does, rank 0 writing one markdown file (rewritten after every section,
so a run cut short still leaves what it measured):

1. Correctness, bf16, h=32 / kv-heads 8 / d=128 (GQA), --check-tokens total
   tokens: each mode's out / dq / dk / dv against single-GPU Orchard
   (orchard.flash_attn_func on the whole sequence, same inputs, fwd+bwd):
   pass = allclose(atol = rtol = 2.5e-2) and RMSE < 0.01 on every tensor.
2. Scaling, fwd+bwd, causal, bf16, h=32, kv-heads 8, d=128, batch 1, at each
   --tokens-per-gpu (default 16k and 32k): T1(S/W) is one GPU running
   Orchard on S/W tokens, T_W(S) the distributed op on S = W * tokens-per-GPU,
   E = W * T1(S/W) / T_W(S). Modes: zigzag ring, contiguous ring (for contrast:
   unbalanced under causal), Ulysses, all-gather.
3. Exposed communication: the same run with every exchange skipped (each
   "received" buffer is a local copy: same kernels, same shapes, wrong
   numbers), exposed = (T_W - T_W,no-comm) / T_W.
4. Per-rank compute time (the no-comm run timed on each rank alone, no
   collective in the loop): the spread (max - min) / mean shows the load
   balance of the layout (zigzag causal should be within 5%).

Timing: CUDA events around --iters back-to-back fwd+bwd steps after --warmup,
median of --reps windows, the slowest rank's value (all ranks start each
window after a barrier). Input checks (the metadata all_gather, a host sync)
are off in the timed loops (check_inputs=False); the "ring zigzag, checked"
row shows their cost.

Multicast is kept off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are set before torch initializes NCCL (NVLink SHARP /
multicast objects can take the host's GPUs out of service on the lent machines).

5. Where the time goes, under torch.profiler: one zigzag ring fwd+bwd step
   and one single-GPU step on S/W tokens per rank, their kernels split into
   attention / other compute / NCCL, NCCL time overlapped with compute, and
   idle gaps; the slowest rank's step minus W x the single-GPU step, split
   by those parts, is the explanation of any shortfall of E (--no-profile
   skips it; --profile runs only it, ~10 s; --trace writes chrome traces).
--modes picks the scaling rows (default all), --no-check skips section 1.
--smoke runs tiny shapes (and works on the CPU with gloo: `torchrun
--standalone --nproc-per-node=2 bench/cp_bench.py --smoke`) to test the script.
"""
from __future__ import annotations

import os

# Before torch / NCCL initialize: no NVLS / multicast (see the docstring).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import orchard  # noqa: E402
import orchard.distributed as od  # noqa: E402
from orchard.distributed import _comm  # noqa: E402

MODES = {
    "ring": od.ring_flash_attn_func,
    "ulysses": od.ulysses_flash_attn_func,
    "allgather": od.allgather_flash_attn_func,
}


# Scaling rows: name -> (mode, layout, with input checks).
SCALING_MODES = {
    "ring-zigzag": ("ring", "zigzag", False),
    "ring-contiguous": ("ring", "contiguous", False),
    "ulysses": ("ulysses", "zigzag", False),
    "allgather": ("allgather", "zigzag", False),
    "ring-zigzag-checked": ("ring", "zigzag", True),
    # The ring without its fp32 dQ accumulator (ORCHARD_CP_DQ_ACCUM=0: each call's own
    # workspace and a dQ partial per step, as before it): the A/B of that change.
    "ring-zigzag-no-accum": ("ring", "zigzag", False),
    # W = 2 without reusing the forward's last K/V in the backward (ORCHARD_CP_KEEP_KV=0:
    # the backward exchanges K/V again and its last dK/dV hop is exposed).
    "ring-zigzag-no-keep-kv": ("ring", "zigzag", False),
}
# Rows run with an environment switch: the A/B of one change of the ring.
ROW_ENV = {"ring-zigzag-no-accum": {"ORCHARD_CP_DQ_ACCUM": "0"},
           "ring-zigzag-no-keep-kv": {"ORCHARD_CP_KEEP_KV": "0"}}


class _env:
    """Sets environment variables for a block (same on every rank), restoring them after."""

    def __init__(self, **kw):
        self.kw, self.old = kw, {}

    def __enter__(self):
        for k, v in self.kw.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="markdown path (default: $OUT/cp_bench.md, "
                   "else ./cp_bench.md)")
    p.add_argument("--tokens-per-gpu", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--check-tokens", type=int, default=8192, help="total tokens of the check")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-profile", dest="with_profile", action="store_false",
                   help="skip the torch.profiler section")
    p.add_argument("--profile", action="store_true",
                   help="only the torch.profiler section (one zigzag ring step and one "
                        "single-GPU step per rank at the first --tokens-per-gpu; ~10 s)")
    p.add_argument("--trace", action="store_true",
                   help="also write a chrome trace per rank next to --out")
    p.add_argument("--modes", nargs="+", default=[m for m in SCALING_MODES if m not in ROW_ENV],
                   choices=list(SCALING_MODES), help="scaling rows to run")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the correctness section")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (tests the script; CPU ok)")
    a = p.parse_args()
    if a.smoke:
        a.tokens_per_gpu = [64, 128]
        a.heads, a.kv_heads, a.dim = 4, 2, 32
        a.check_tokens = 128
        a.iters, a.reps, a.warmup = 2, 2, 1
    return a


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available()
        if self.cuda and not orchard.build_info().get("cuda_compiled"):
            raise SystemExit("cp_bench: this orchard build has no CUDA backend (install with "
                             "ORCHARD_CUDA=ON bash scripts/install_package.sh)")
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            try:
                dist.init_process_group("nccl", device_id=self.device,
                                        timeout=datetime.timedelta(minutes=5))
            except TypeError:  # torch without device_id
                dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dtype = torch.bfloat16
        self.sections: list[tuple[str, list[str]]] = []
        out = args.out or os.path.join(os.environ.get("OUT") or ".", "cp_bench.md")
        self.out_path = out

    # ---- helpers ----------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather_floats(self, x: float) -> list[float]:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        out = torch.empty(self.world, dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(out, t)
        return out.tolist()

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def time_ms(self, fn, barrier=True) -> float:
        """Median over reps of the mean time of iters back-to-back calls (this rank)."""
        a = self.args
        for _ in range(a.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(a.reps):
            if barrier:
                dist.barrier()
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(a.iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / a.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / a.iters)
        return statistics.median(times)

    def inputs(self, s_total, seed, requires_grad=False):
        a = self.args
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape_q = (1, s_total, a.heads, a.dim)
        shape_k = (1, s_total, a.kv_heads, a.dim)
        mk = lambda shape: torch.randn(shape, generator=g, device=self.device,  # noqa: E731
                                       dtype=torch.float32).to(self.dtype)
        return mk(shape_q), mk(shape_k), mk(shape_k), mk(shape_q)

    def write(self):
        if self.rank != 0:
            return
        lines = [f"# orchard.distributed benchmark ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} "
                 f"UTC)", ""]
        for title, body in self.sections:
            lines += [f"## {title}", "", *body, ""]
        text = "\n".join(lines)
        d = os.path.dirname(os.path.abspath(self.out_path))
        os.makedirs(d, exist_ok=True)
        with open(self.out_path, "w") as f:
            f.write(text)

    def section(self, title, body):
        self.sections.append((title, body))
        self.write()
        if self.rank == 0:
            print(f"\n## {title}\n" + "\n".join(body), flush=True)

    # ---- sections ---------------------------------------------------------
    def environment(self):
        names = []
        if self.cuda:
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        nccl = ""
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version())) if self.cuda else "n/a (gloo)"
        except Exception:  # noqa: BLE001
            nccl = "?"
        a = self.args
        body = [
            f"- world size {self.world}, backend {dist.get_backend()}, devices: "
            f"{', '.join(names) or 'cpu'}",
            f"- torch {torch.__version__}, NCCL {nccl}, orchard {orchard.__version__} "
            f"(cuda_compiled={orchard.build_info().get('cuda_compiled')})",
            f"- env: NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}, "
            f"TORCH_SYMM_MEM_DISABLE_MULTICAST={os.environ['TORCH_SYMM_MEM_DISABLE_MULTICAST']}, "
            f"NVSHMEM_DISABLE_NVLS={os.environ['NVSHMEM_DISABLE_NVLS']}",
            f"- shapes: batch 1, heads {a.heads}, kv-heads {a.kv_heads}, head dim {a.dim}, bf16; "
            f"timing: {a.iters} fwd+bwd steps x median of {a.reps} windows after {a.warmup} "
            f"warm-up, slowest rank",
        ]
        self.section("Environment", body)

    def correctness(self):
        a = self.args
        s = a.check_tokens
        q, k, v, do = self.inputs(s, seed=1234)
        rows = ["| mode | layout | causal | tensor | max abs err | RMSE | allclose 2.5e-2 | "
                "RMSE < 0.01 |", "|---|---|---|---|---|---|---|---|"]
        refs = {}
        overall = True
        # (mode, layout, causal, ring dQ accumulator off): the ring's default path adds dQ
        # into one fp32 accumulator; the "no-accum" row checks the per-call path too.
        cases = [("ring", "zigzag", True, False), ("ring", "contiguous", True, False),
                 ("ring", "zigzag", False, False), ("ring", "zigzag", True, True),
                 ("ulysses", "zigzag", True, False), ("allgather", "zigzag", True, False),
                 ("allgather", "contiguous", False, False)]
        for mode, layout, causal, no_accum in cases:
            env = _env(ORCHARD_CP_DQ_ACCUM="0") if no_accum else _env()
            label = f"{mode}{' (no accum)' if no_accum else ''}"
            try:
                if causal not in refs:
                    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
                    out = orchard.flash_attn_func(qr, kr, vr, causal=causal)
                    out.backward(do)
                    refs[causal] = (out.detach(), qr.grad, kr.grad, vr.grad)
                    del qr, kr, vr, out
                ref = refs[causal]
                sh = lambda t: od.shard_sequence(t, layout=layout)  # noqa: E731
                ql, kl, vl = (sh(t).requires_grad_(True) for t in (q, k, v))
                with env:
                    out = MODES[mode](ql, kl, vl, causal=causal, layout=layout)
                    out.backward(sh(do))
                for name, got, r in zip(("out", "dq", "dk", "dv"),
                                        (out, ql.grad, kl.grad, vl.grad), ref):
                    r = sh(r).float()
                    g = got.float()
                    err = (g - r).abs().max().item()
                    rmse = (g - r).pow(2).mean().sqrt().item()
                    close = torch.allclose(g, r, atol=2.5e-2, rtol=2.5e-2)
                    err, rmse = max(self.gather_floats(err)), max(self.gather_floats(rmse))
                    close = self.all_ok(close)
                    overall &= close and rmse < 0.01
                    rows.append(f"| {label} | {layout} | {causal} | {name} | {err:.2e} | "
                                f"{rmse:.2e} | {'yes' if close else 'NO'} | "
                                f"{'yes' if rmse < 0.01 else 'NO'} |")
            except Exception as e:  # noqa: BLE001
                overall = False
                rows.append(f"| {label} | {layout} | {causal} | ERROR | {type(e).__name__}: "
                            f"{str(e)[:200]} | | | |")
                if self.rank == 0:
                    traceback.print_exc()
        del refs
        self.free()
        verdict = "PASS" if overall else "FAIL"
        self.section(f"Correctness vs single-GPU Orchard, bf16, {s} tokens total: {verdict}",
                     rows)

    def free(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def step_fn(self, fn, q, k, v, do, **kw):
        def step():
            out = fn(q, k, v, **kw)
            torch.autograd.grad(out, (q, k, v), do)
        return step

    def single_gpu_ms(self, s_local):
        q, k, v, do = self.inputs(s_local, seed=7)
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))

        def step():
            out = orchard.flash_attn_func(q, k, v, causal=True)
            torch.autograd.grad(out, (q, k, v), do)
        ms = self.time_ms(step, barrier=False)
        del q, k, v, do
        self.free()
        return ms

    def scaling(self):
        a = self.args
        w = self.world
        rows = ["| mode | layout | tokens/GPU | S total | T1(S/W) ms | T_W(S) ms | E | "
                "T_W no-comm ms | exposed comm | per-rank compute ms | spread |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        configs = []
        for tpg in a.tokens_per_gpu:
            configs += [(*SCALING_MODES[m], m, tpg) for m in a.modes if m != "ring-zigzag-checked"]
        if "ring-zigzag-checked" in a.modes:  # input checks cost: the first size only
            configs.append((*SCALING_MODES["ring-zigzag-checked"], "ring-zigzag-checked",
                            a.tokens_per_gpu[0]))
        t1_cache = {}
        for mode, layout, checked, name, tpg in configs:
            suffix = name[len("ring-zigzag-"):] if name in ROW_ENV else ""
            label = f"{mode}{' (checked)' if checked else ''}{f' ({suffix})' if suffix else ''}"
            env = _env(**ROW_ENV.get(name, {}))
            try:
                if tpg not in t1_cache:
                    t1_cache[tpg] = statistics.mean(self.gather_floats(self.single_gpu_ms(tpg)))
                t1 = t1_cache[tpg]
                s = tpg * w
                q, k, v, do = self.inputs(s, seed=11)
                sh = lambda t: od.shard_sequence(t, layout=layout)  # noqa: E731
                ql, kl, vl, dol = (sh(t) for t in (q, k, v, do))
                del q, k, v, do
                ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))
                step = self.step_fn(MODES[mode], ql, kl, vl, dol, causal=True, layout=layout,
                                    check_inputs=checked)
                with env:
                    tw = self.max_over_ranks(self.time_ms(step))
                _comm._SKIP_EXCHANGE = True
                try:
                    nostep = self.step_fn(MODES[mode], ql, kl, vl, dol, causal=True,
                                          layout=layout, check_inputs=False)
                    with env:
                        tn = self.max_over_ranks(self.time_ms(nostep))
                        per_rank = self.gather_floats(self.time_ms(nostep, barrier=False))
                finally:
                    _comm._SKIP_EXCHANGE = False
                eff = w * t1 / tw
                exposed = (tw - tn) / tw
                mean = statistics.mean(per_rank)
                spread = (max(per_rank) - min(per_rank)) / mean if mean > 0 else float("nan")
                rows.append(f"| {label} | {layout} | {tpg} | {s} | {t1:.2f} | {tw:.2f} | "
                            f"{eff:.3f} | {tn:.2f} | {100 * exposed:.1f}% | "
                            f"{', '.join(f'{x:.2f}' for x in per_rank)} | {100 * spread:.1f}% |")
                del ql, kl, vl, dol, step, nostep
            except Exception as e:  # noqa: BLE001
                _comm._SKIP_EXCHANGE = False
                rows.append(f"| {label} | {layout} | {tpg} | | ERROR {type(e).__name__}: "
                            f"{str(e)[:160]} | | | | | | |")
                if self.rank == 0:
                    traceback.print_exc()
            self.free()
            # rewrite the file after every row
            self.sections = [x for x in self.sections if x[0] != "Scaling (fwd+bwd, causal)"]
            self.sections.append(("Scaling (fwd+bwd, causal)", list(rows)))
            self.write()
        if self.rank == 0:
            print("\n## Scaling (fwd+bwd, causal)\n" + "\n".join(rows), flush=True)
        notes = [
            "- E = W * T1(S/W) / T_W(S); goal (issue #14) E >= 0.95 for zigzag ring at >= 16k "
            "tokens/GPU and Ulysses at >= 32k; exposed communication <= 5%.",
            "- exposed comm = (T_W - T_W no-comm) / T_W, where no-comm skips every exchange "
            "(same kernels and shapes).",
            "- per-rank compute: the no-comm step timed on each rank alone; spread = (max - min) "
            "/ mean (zigzag should be within 5%; contiguous causal is unbalanced by design).",
            "- (checked): the same op with check_inputs=True (one metadata all_gather + host "
            "sync per call).",
            "- (no-accum): the ring with ORCHARD_CP_DQ_ACCUM=0 (every backward call its own "
            "fp32 dQ workspace and a dQ partial to add up, the path before the accumulator).",
            "- (no-keep-kv): the ring with ORCHARD_CP_KEEP_KV=0 (W = 2: the backward exchanges "
            "K/V again, own block first, its last dK/dV hop exposed: the order before).",
        ]
        self.section("Notes", notes)

    def _profiled_kernels(self, step):
        """[(start_us, end_us, name)] of the device kernels of one profiled call of step
        (after one unprofiled call), on this rank's device."""
        from torch.profiler import ProfilerActivity, profile
        step()
        self.sync()
        dist.barrier()
        self.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            self.sync()
        kernels = []
        for evt in prof.events():
            if "CUDA" not in str(getattr(evt, "device_type", "")):
                continue
            t0, t1 = float(evt.time_range.start), float(evt.time_range.end)
            if t1 > t0:
                kernels.append((t0, t1, evt.name))
        return kernels, prof

    def profile(self):
        """One zigzag ring fwd+bwd step under torch.profiler on each rank, and one
        single-GPU step on S/W tokens as the reference: where the step's GPU time goes
        (attention kernels, other compute, NCCL alone, idle) — the explanation of any
        gap between T_W and W * T1."""
        if not self.cuda:
            return
        a = self.args
        tpg = a.tokens_per_gpu[0]
        cats = ("attention", "other", "nccl")
        rows = ["| rank | what | window ms | attention ms (n) | other compute ms (n) | "
                "NCCL ms (n) | NCCL overlapped with compute ms | NCCL alone ms | idle ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        notes = []
        try:
            q, k, v, do = self.inputs(tpg, seed=12)
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))

            def single():
                out = orchard.flash_attn_func(q, k, v, causal=True)
                torch.autograd.grad(out, (q, k, v), do)
            one, _ = self._profiled_kernels(single)
            del q, k, v, do
            self.free()
            q, k, v, do = self.inputs(tpg * self.world, seed=13)
            ql, kl, vl, dol = (od.shard_sequence(t) for t in (q, k, v, do))
            del q, k, v, do
            ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))
            step = self.step_fn(od.ring_flash_attn_func, ql, kl, vl, dol, causal=True,
                                check_inputs=False)
            ring, prof = self._profiled_kernels(step)
            summaries = {"1 GPU, S/W": timeline_summary(one), "ring zigzag": timeline_summary(ring)}
            keys = ("window", "attention", "other", "nccl", "overlap", "nccl_alone", "idle",
                    "n_attention", "n_other", "n_nccl")
            gathered = {what: {key: self.gather_floats(sm[key]) for key in keys}
                        for what, sm in summaries.items()}
            for r in range(self.world):
                for what, g in gathered.items():
                    rows.append(
                        f"| {r} | {what} | {g['window'][r]:.2f} | {g['attention'][r]:.2f} "
                        f"({int(g['n_attention'][r])}) | {g['other'][r]:.2f} "
                        f"({int(g['n_other'][r])}) | {g['nccl'][r]:.2f} ({int(g['n_nccl'][r])}) | "
                        f"{g['overlap'][r]:.2f} | {g['nccl_alone'][r]:.2f} | {g['idle'][r]:.2f} |")
            w = self.world
            one_g, ring_g = gathered["1 GPU, S/W"], gathered["ring zigzag"]
            worst = max(range(w), key=lambda r: ring_g["window"][r])
            ideal = w * statistics.mean(one_g["window"])
            parts = [("attention kernels", ring_g["attention"][worst]
                      - w * statistics.mean(one_g["attention"])),
                     ("other compute (merge, accumulate, copies)", ring_g["other"][worst]
                      - w * statistics.mean(one_g["other"])),
                     ("NCCL not overlapped", ring_g["nccl_alone"][worst]),
                     ("idle gaps", ring_g["idle"][worst] - w * statistics.mean(one_g["idle"]))]
            gap = ring_g["window"][worst] - ideal
            notes.append(f"- shortfall of the slowest rank ({worst}): window "
                         f"{ring_g['window'][worst]:.2f} ms vs W x single-GPU window "
                         f"{ideal:.2f} ms = {gap:+.2f} ms ({100 * gap / ideal:+.1f}%), of which:")
            for name, ms in parts:
                notes.append(f"  - {name}: {ms:+.2f} ms ({100 * ms / ideal:+.1f}%)")
            notes.append(f"- one fwd+bwd step at {tpg} tokens/GPU (ring: S = {tpg * w}); window "
                         "= first kernel start to last kernel end on the device; attention = "
                         "Orchard's kernels, other = everything else but NCCL; NCCL alone = "
                         "NCCL kernel time with no compute kernel running (includes waiting "
                         "for the peer); idle = no kernel at all (host launch gaps, stream "
                         "waits). (n) = kernel launches.")
            if a.trace:
                base = os.path.splitext(self.out_path)[0]
                prof.export_chrome_trace(f"{base}_ring_trace_rank{self.rank}.json")
                notes.append(f"- chrome traces: {os.path.basename(base)}_ring_trace_rank<r>.json")
            del ql, kl, vl, dol, step
            self.free()
        except Exception as e:  # noqa: BLE001
            notes.append(f"- profile failed: {type(e).__name__}: {str(e)[:200]}")
            if self.rank == 0:
                traceback.print_exc()
        self.section("Where the ring step's time goes (torch.profiler)", rows + [""] + notes)


def _union(intervals):
    """Sorted, merged [(start, end)]."""
    out = []
    for t0, t1 in sorted(intervals):
        if out and t0 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t1)
        else:
            out.append([t0, t1])
    return out


def _length(merged):
    return sum(t1 - t0 for t0, t1 in merged)


def _intersection(a, b):
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernel_category(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if "orchard::" in low or "flash_" in low:
        return "attention"
    return "other"


def timeline_summary(kernels):
    """ms per category from [(start_us, end_us, name)]: summed kernel time of
    attention / other / nccl, NCCL time overlapped with compute and alone, idle
    time in the window (first start to last end), launch counts."""
    by = {"attention": [], "other": [], "nccl": []}
    for t0, t1, name in kernels:
        by[kernel_category(name)].append((t0, t1))
    if not kernels:
        return {k: 0.0 for k in ("window", "attention", "other", "nccl", "overlap", "nccl_alone",
                                 "idle", "n_attention", "n_other", "n_nccl")}
    window = max(t1 for _, t1, _ in kernels) - min(t0 for t0, _, _ in kernels)
    compute = _union(by["attention"] + by["other"])
    nccl = _union(by["nccl"])
    overlap = _intersection(compute, nccl)
    busy = _length(_union(by["attention"] + by["other"] + by["nccl"]))
    res = {k: sum(t1 - t0 for t0, t1 in v) / 1e3 for k, v in by.items()}
    res.update(window=window / 1e3, overlap=overlap / 1e3,
               nccl_alone=(_length(nccl) - overlap) / 1e3, idle=(window - busy) / 1e3,
               **{f"n_{k}": float(len(v)) for k, v in by.items()})
    return res


def main():
    args = parse_args()
    b = Bench(args)
    try:
        b.environment()
        if not args.profile:
            if args.check:
                b.correctness()
            b.scaling()
        if args.profile or args.with_profile:
            b.profile()
        if b.rank == 0:
            print(f"\nwrote {os.path.abspath(b.out_path)}", flush=True)
    finally:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
