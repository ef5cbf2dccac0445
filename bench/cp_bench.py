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

5. Per-rank kernel time of one zigzag ring step under torch.profiler (NCCL
   kernels vs the rest), and one chrome trace per rank (compute vs NCCL
   timeline) next to the markdown file (--no-profile skips this).
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
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler section")
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
        cases = [("ring", "zigzag", True), ("ring", "contiguous", True), ("ring", "zigzag", False),
                 ("ulysses", "zigzag", True), ("allgather", "zigzag", True),
                 ("allgather", "contiguous", False)]
        for mode, layout, causal in cases:
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
                    rows.append(f"| {mode} | {layout} | {causal} | {name} | {err:.2e} | "
                                f"{rmse:.2e} | {'yes' if close else 'NO'} | "
                                f"{'yes' if rmse < 0.01 else 'NO'} |")
            except Exception as e:  # noqa: BLE001
                overall = False
                rows.append(f"| {mode} | {layout} | {causal} | ERROR | {type(e).__name__}: "
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
            configs += [("ring", "zigzag", tpg, False), ("ring", "contiguous", tpg, False),
                        ("ulysses", "zigzag", tpg, False), ("allgather", "zigzag", tpg, False)]
        configs.append(("ring", "zigzag", a.tokens_per_gpu[0], True))  # with input checks
        t1_cache = {}
        for mode, layout, tpg, checked in configs:
            label = f"{mode}{' (checked)' if checked else ''}"
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
                tw = self.max_over_ranks(self.time_ms(step))
                _comm._SKIP_EXCHANGE = True
                try:
                    nostep = self.step_fn(MODES[mode], ql, kl, vl, dol, causal=True,
                                          layout=layout, check_inputs=False)
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
        ]
        self.section("Notes", notes)

    def profile(self):
        """One zigzag ring fwd+bwd step under torch.profiler on each rank: per-rank kernel
        time (NCCL vs the rest) and a chrome trace of the compute/communication timeline."""
        if not self.cuda:
            return
        rows = ["| rank | step wall ms | NCCL kernels ms | other kernels ms | kernels |",
                "|---|---|---|---|---|"]
        notes = []
        try:
            from torch.profiler import ProfilerActivity, profile
            a = self.args
            tpg = a.tokens_per_gpu[0]
            q, k, v, do = self.inputs(tpg * self.world, seed=13)
            ql, kl, vl, dol = (od.shard_sequence(t) for t in (q, k, v, do))
            del q, k, v, do
            ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))
            step = self.step_fn(od.ring_flash_attn_func, ql, kl, vl, dol, causal=True,
                                check_inputs=False)
            step()
            self.sync()
            dist.barrier()
            self.sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                self.sync()
            wall = start.elapsed_time(end)
            nccl = other = 0.0
            count = 0
            for evt in prof.events():
                dev_type = str(getattr(evt, "device_type", ""))
                if "CUDA" not in dev_type:
                    continue
                try:  # a device-side event: its own time range is the kernel's duration
                    us = float(evt.time_range.elapsed_us())
                except Exception:  # noqa: BLE001
                    us = float(getattr(evt, "device_time_total", 0.0) or 0.0)
                name = evt.name.lower()
                if "memcpy" in name or "memset" in name:
                    continue
                count += 1
                if "nccl" in name:
                    nccl += us / 1e3
                else:
                    other += us / 1e3
            vals = [self.gather_floats(x) for x in (wall, nccl, other, float(count))]
            for r in range(self.world):
                rows.append(f"| {r} | {vals[0][r]:.2f} | {vals[1][r]:.2f} | {vals[2][r]:.2f} | "
                            f"{int(vals[3][r])} |")
            base = os.path.splitext(self.out_path)[0]
            try:
                prof.export_chrome_trace(f"{base}_ring_trace_rank{self.rank}.json")
                notes.append(f"- chrome traces: {os.path.basename(base)}_ring_trace_rank<r>.json")
            except Exception as e:  # noqa: BLE001
                notes.append(f"- trace export failed: {type(e).__name__}: {e}")
            notes.append(f"- one zigzag ring fwd+bwd step at {tpg} tokens/GPU; NCCL kernels "
                         f"run on their own stream, overlapping the others when the ring hides "
                         f"them (their time includes waiting for the peer)")
        except Exception as e:  # noqa: BLE001
            notes.append(f"- profile failed: {type(e).__name__}: {str(e)[:200]}")
        self.section("Per-rank kernel time (torch.profiler)", rows + [""] + notes)


def main():
    args = parse_args()
    b = Bench(args)
    try:
        b.environment()
        b.correctness()
        b.scaling()
        if args.profile:
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
