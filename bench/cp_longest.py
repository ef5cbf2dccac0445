"""Longest sequence that trains, on 1 GPU and on W GPUs (issue #14: W = 2 must
reach >= 1.9x the one-GPU length).

    torchrun --standalone --nproc-per-node=2 bench/cp_longest.py --out $OUT/cp_longest

"Trains" = one attention layer's forward and backward (h32 kv8 d128 bf16 causal,
batch 1: q, k, v with gradients, the incoming gradient, out and LSE, and the op's
own buffers) fits in a per-GPU memory cap, --cap-gib (default 8 GiB, the same on
every GPU) — a cap far below the card's memory keeps each trial short (time grows
as S^2) while the length ratio it gives is the one of the full card, since the
memory of all these modes is linear in S.

How (each rank on its own GPU):
1. Calibrate each case at two short lengths: peak memory is linear in S, so
   two points predict the longest S under the cap; the second trial's time
   predicts a trial's time (~S^2).
2. Search S (multiples of --granule tokens): probe the prediction, widen
   until one length fails, then narrow the bracket by interpolating the
   measured peaks (then by halving) down to one granule. A trial runs uncapped and "fits" when the most memory the
   caching allocator held during the step (max_memory_reserved, the quantity
   torch.cuda.set_per_process_memory_fraction limits), over all ranks of the
   case, is <= the cap. Deciding by the measured peak instead of by an OOM
   under the cap keeps every rank's outcome the same: an out-of-memory error
   on one rank in the middle of a ring would leave its peer waiting in NCCL.
3. Verify the answer under the real cap: set_per_process_memory_fraction to
   the cap on every GPU and run S* (must succeed); on one GPU also S* + one
   granule (an OutOfMemoryError there is caught, and says the criterion is
   tight).
Cases: "1 GPU" (orchard.flash_attn_func; every rank searches it alone on its
own GPU, at the same time, and rank 0's answer is used), then for W ranks each
of --modes: ring-zigzag, ulysses (and allgather, ring-contiguous on request).
--budget-s bounds the whole search (trials predicted to overrun it are not run;
the bracket reached so far is reported).

--dry-run runs the same logic on the CPU over gloo with tiny shapes and a
memory figure summed from the step's tensors (no cap exists there), so a typo
cannot waste device time:
    torchrun --standalone --nproc-per-node=2 bench/cp_longest.py --dry-run --out /tmp/x
"""
from __future__ import annotations

import os

# Before torch / NCCL initialize: no NVLS / multicast (lent machines).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GIB = 1 << 30
# Distributed modes: name -> (function name in orchard.distributed, keyword args,
# environment for the step).
MODES = {
    "ring-zigzag": ("ring_flash_attn_func", {"layout": "zigzag"}, {}),
    "ulysses": ("ulysses_flash_attn_func", {"layout": "zigzag"}, {}),
    "allgather": ("allgather_flash_attn_func", {"layout": "zigzag"}, {}),
    "ring-contiguous": ("ring_flash_attn_func", {"layout": "contiguous"}, {}),
    # the ring's backward without its fp32 dQ accumulator (the path before it)
    "ring-zigzag-no-accum": ("ring_flash_attn_func", {"layout": "zigzag"},
                             {"ORCHARD_CP_DQ_ACCUM": "0"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="output path prefix: writes PREFIX.json and PREFIX.md (default "
                        "$OUT/cp_longest, else ./cp_longest)")
    p.add_argument("--cap-gib", type=float, default=8.0, help="memory cap per GPU (GiB)")
    p.add_argument("--modes", nargs="+", default=["ring-zigzag", "ulysses"],
                   choices=list(MODES))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--granule", type=int, default=2048,
                   help="S is a multiple of this (total tokens); also the bisection's resolution")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="tokens per GPU of the first calibration trial (the second: twice that)")
    p.add_argument("--budget-s", type=float, default=150.0, help="time bound of all searches")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU/gloo, tiny shapes, memory summed from the step's tensors")
    a = p.parse_args(argv)
    if a.dry_run:
        a.heads, a.kv_heads, a.dim = 4, 2, 16
        a.granule = 16
        a.calib_tokens = 32
        if a.cap_gib == 8.0:
            a.cap_gib = 256 * 1024 / GIB  # 256 KiB: a few hundred tokens
    return a


def fit_line(points):
    """(fixed bytes, bytes per token) through two (tokens, bytes) points."""
    (s0, m0), (s1, m1) = points
    per = (m1 - m0) / (s1 - s0) if s1 != s0 else m1 / max(s1, 1)
    per = max(per, 1e-9)
    return m0 - per * s0, per


class Search:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        timeout = datetime.timedelta(seconds=120)  # a hung peer kills the run, not the budget
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            try:
                dist.init_process_group("nccl", device_id=self.device, timeout=timeout)
            except TypeError:  # torch without device_id
                dist.init_process_group("nccl", timeout=timeout)
            self.dtype = torch.bfloat16
            self.total_bytes = torch.cuda.get_device_properties(self.device).total_memory
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=timeout)
            self.dtype = torch.float32
            self.total_bytes = 0
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cap = int(args.cap_gib * GIB)
        self.t_start = time.perf_counter()
        self.results = {}
        out = args.out or os.path.join(os.environ.get("OUT") or ".", "cp_longest")
        self.out_prefix = out[:-5] if out.endswith(".json") else out

    # ---- one trial ---------------------------------------------------------
    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _step(self, mode, s_total):
        """One fwd+bwd of the case at s_total tokens; returns the bytes its tensors
        hold (the dry run's memory figure)."""
        import orchard
        import orchard.distributed as od
        a = self.args
        local = s_total if mode == "1 GPU" else s_total // self.world
        mk = lambda h: torch.randn(1, local, h, a.dim, device=self.device,  # noqa: E731
                                   dtype=self.dtype)
        q, k, v = (mk(h).requires_grad_(True) for h in (a.heads, a.kv_heads, a.kv_heads))
        env = {} if mode == "1 GPU" else MODES[mode][2]
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            if mode == "1 GPU":
                out = orchard.flash_attn_func(q, k, v, causal=True)
            else:
                name, kw, _ = MODES[mode]
                out = getattr(od, name)(q, k, v, causal=True, check_inputs=False, **kw)
            do = mk(a.heads)  # the incoming gradient exists from the backward on, as in training
            out.backward(do)
        finally:
            for key, val in saved.items():
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
        tensors = (q, k, v, do, out, q.grad, k.grad, v.grad)
        held = sum(t.numel() * t.element_size() for t in tensors)
        # the LSE the op saves: (1, heads, local) fp32
        return held + local * a.heads * 4

    def trial(self, mode, s_total, capped=False):
        """{"ok", "reserved", "allocated", "seconds"}: this rank's outcome (the caller
        reduces over ranks for a distributed mode)."""
        res = {"ok": True, "reserved": 0, "allocated": 0, "seconds": 0.0}
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            if capped:
                torch.cuda.set_per_process_memory_fraction(self.cap / self.total_bytes, self.device)
            base_r = torch.cuda.memory_reserved(self.device)
            base_a = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        try:
            held = self._step(mode, s_total)
            self._sync()
            res["seconds"] = time.perf_counter() - t0
            if self.cuda:
                res["reserved"] = torch.cuda.max_memory_reserved(self.device) - base_r
                res["allocated"] = torch.cuda.max_memory_allocated(self.device) - base_a
            else:
                res["reserved"] = res["allocated"] = held
        except torch.cuda.OutOfMemoryError:
            res.update(ok=False, seconds=time.perf_counter() - t0)
        finally:
            if self.cuda:
                self._sync()
                if capped:
                    torch.cuda.set_per_process_memory_fraction(1.0, self.device)
                torch.cuda.empty_cache()
        return res

    def reduced_trial(self, mode, s_total, capped=False):
        """trial() with the outcome combined over the ranks that ran it: ok on all,
        the largest peaks and time. The single-GPU case is this rank's own."""
        res = self.trial(mode, s_total, capped)
        if mode == "1 GPU":
            return res
        t = torch.tensor([0.0 if res["ok"] else 1.0, res["reserved"], res["allocated"],
                          res["seconds"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        bad, reserved, allocated, seconds = t.tolist()
        return {"ok": bad == 0.0, "reserved": int(reserved), "allocated": int(allocated),
                "seconds": seconds}

    # ---- the search --------------------------------------------------------
    def search(self, mode, budget_s):
        """Longest S (multiple of the granule) whose step fits under the cap."""
        a = self.args
        g = a.granule
        w = 1 if mode == "1 GPU" else self.world
        t_begin = time.perf_counter()
        log = []
        stopped = None

        def run(s, capped=False):
            r = self.reduced_trial(mode, s, capped)
            r["fits"] = r["ok"] and r["reserved"] <= self.cap
            log.append({"tokens": s, "capped": capped, **r})
            if self.rank == 0:
                print(f"  [{mode}] S={s:>8} {'capped ' if capped else ''}ok={r['ok']} "
                      f"reserved={r['reserved'] / GIB:.3f} GiB allocated="
                      f"{r['allocated'] / GIB:.3f} GiB fits={r['fits']} {r['seconds']:.2f}s",
                      flush=True)
            return r

        # Budget decisions use only the trials' times, which are reduced over the
        # ranks of a distributed case, so every rank takes the same branches (a rank
        # that skipped a trial its peers run would leave them waiting).
        spent = lambda: sum(e["seconds"] for e in log) + 0.05 * len(log)  # noqa: E731
        down = lambda x: max(g, int(x) // g * g)  # noqa: E731

        # 1. calibration: memory linear in S, time ~ S^2
        s_a = down(a.calib_tokens * w)
        s_b = 2 * s_a
        run(s_a)  # also the warm-up (first launches, NCCL connections)
        r_a = run(s_a)
        r_b = run(s_b)
        fixed, per = fit_line([(s_a, r_a["reserved"]), (s_b, r_b["reserved"])])
        predicted = down((self.cap - fixed) / per)
        sec_per_s2 = max(r_b["seconds"], 1e-4) / s_b ** 2
        est = lambda s: sec_per_s2 * s * s  # noqa: E731

        def affordable(s):
            nonlocal stopped
            if spent() + est(s) > budget_s:
                stopped = f"budget: the next trial (S={s}) would take ~{est(s):.1f} s"
                return False
            return True

        # 2. bracket: lo fits, hi does not; first probe at the prediction
        stopped = None
        lo = hi = m_lo = m_hi = None  # lengths, and their measured peaks
        for s, r in ((s_a, r_a), (s_b, r_b)):
            if r["fits"]:
                lo, m_lo = s, r["reserved"]
            elif hi is None:
                hi, m_hi = s, (r["reserved"] if r["ok"] else None)
        if lo is None:
            stopped = "the first calibration length does not fit: lower --calib-tokens"
        cand = predicted
        while lo is not None and hi is None:
            cand = max(cand, lo + g)
            if not affordable(cand):
                break
            r = run(cand)
            if r["fits"]:
                lo, m_lo, cand = cand, r["reserved"], down(cand * 1.04) + g
            else:
                hi, m_hi = cand, (r["reserved"] if r["ok"] else None)
        # 3. narrow it: interpolate the measured peaks (linear in S) a few times, then halve
        n = 0
        while stopped is None and lo is not None and hi is not None and hi - lo > g:
            if n < 3 and m_hi is not None and m_hi > m_lo:
                mid = down(lo + (hi - lo) * (self.cap - m_lo) / (m_hi - m_lo))
            else:
                mid = (lo + hi) // 2 // g * g
            mid = min(max(mid, lo + g), hi - g)
            n += 1
            if not affordable(mid):
                break
            r = run(mid)
            if r["fits"]:
                lo, m_lo = mid, r["reserved"]
            else:
                hi, m_hi = mid, (r["reserved"] if r["ok"] else None)

        # 4. the answer under the real cap
        verify = {}
        if lo is not None and self.cuda and affordable(lo):
            verify["longest_under_cap_ok"] = run(lo, capped=True)["ok"]
            if mode == "1 GPU" and hi is not None and affordable(hi):
                # safe on one GPU: an OOM here has no peer waiting
                verify["next_under_cap_ok"] = run(hi, capped=True)["ok"]
        elif not self.cuda:
            verify["note"] = "dry run: no memory cap on the CPU"
        best = next((e for e in reversed(log) if e["tokens"] == lo and not e["capped"]), None)
        return {
            "mode": mode, "gpus": w, "longest_tokens": lo, "tokens_per_gpu": None if lo is None
            else lo // w, "first_failing_tokens": hi, "resolution_tokens": None if lo is None
            or hi is None else hi - lo,
            "predicted_tokens": predicted, "bytes_per_token": per, "fixed_bytes": fixed,
            "reserved_at_longest": None if best is None else best["reserved"],
            "allocated_at_longest": None if best is None else best["allocated"],
            "seconds_at_longest": None if best is None else best["seconds"],
            "verify": verify, "stopped": stopped, "trials": log,
            "search_seconds": time.perf_counter() - t_begin,
        }

    def run_all(self):
        a = self.args
        n = 1 + len(a.modes)
        cases = ["1 GPU", *a.modes]
        for i, mode in enumerate(cases):
            # the same share on every rank: the least time left over the ranks
            left = torch.tensor([a.budget_s - (time.perf_counter() - self.t_start)],
                                dtype=torch.float64, device=self.device)
            dist.all_reduce(left, op=dist.ReduceOp.MIN)
            share = max(1.0, float(left.item()) / (n - i))
            try:
                res = self.search(mode, share)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if mode == "1 GPU":  # every rank searched on its own GPU: keep them all
                t = torch.tensor([float(res.get("longest_tokens") or 0)], dtype=torch.float64,
                                 device=self.device)
                every = torch.empty(self.world, dtype=torch.float64, device=self.device)
                dist.all_gather_into_tensor(every, t)
                res["longest_tokens_per_rank"] = [int(x) for x in every.tolist()]
            self.results[mode] = res
            self.write()

    # ---- output ------------------------------------------------------------
    def summary(self):
        a = self.args
        one = self.results.get("1 GPU", {}).get("longest_tokens")
        rows = []
        for mode, r in self.results.items():
            s = r.get("longest_tokens")
            ratio = (s / one) if (s and one) else None
            rows.append({"mode": mode, "gpus": r.get("gpus"), "longest_tokens": s,
                         "ratio_vs_1gpu": ratio, "error": r.get("error"),
                         "resolution_tokens": r.get("resolution_tokens"),
                         "reserved_gib": None if r.get("reserved_at_longest") is None
                         else r["reserved_at_longest"] / GIB,
                         "kib_per_token": None if r.get("bytes_per_token") is None
                         else r["bytes_per_token"] / 1024,
                         "verify": r.get("verify"), "stopped": r.get("stopped"),
                         "seconds": r.get("search_seconds")})
        dev = torch.cuda.get_device_name(self.device) if self.cuda else "cpu (dry run)"
        return {"device": dev, "world_size": self.world, "cap_gib": a.cap_gib,
                "shape": f"batch 1, heads {a.heads}, kv-heads {a.kv_heads}, head dim {a.dim}, "
                         f"{str(self.dtype).replace('torch.', '')}, causal",
                "granule": a.granule, "torch": torch.__version__,
                "elapsed_s": time.perf_counter() - self.t_start, "rows": rows,
                "goal": "longest on W=2 GPUs >= 1.9x the longest on 1", "details": self.results}

    def write(self):
        if self.rank != 0:
            return
        s = self.summary()
        os.makedirs(os.path.dirname(os.path.abspath(self.out_prefix)), exist_ok=True)
        with open(self.out_prefix + ".json", "w") as f:
            json.dump(s, f, indent=1, default=str)
        lines = [f"# Longest sequence that trains (one attention layer fwd+bwd), "
                 f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC", "",
                 f"{s['device']}, world size {s['world_size']}, cap {s['cap_gib']:.4g} GiB per "
                 f"GPU, {s['shape']}, S in multiples of {s['granule']}; elapsed "
                 f"{s['elapsed_s']:.0f} s.", "",
                 "| case | GPUs | longest S | vs 1 GPU | resolution | reserved at S (GiB) | "
                 "KiB/token | under the real cap | note |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            ratio = "" if r["ratio_vs_1gpu"] is None else f"{r['ratio_vs_1gpu']:.3f}x"
            fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
            ver = r.get("verify") or {}
            vtxt = ", ".join(f"{k}={v}" for k, v in ver.items())
            lines.append(f"| {r['mode']} | {r['gpus'] or ''} | {fmt(r['longest_tokens'], ',')} | "
                         f"{ratio} | {fmt(r['resolution_tokens'], ',')} | "
                         f"{fmt(r['reserved_gib'], '.3f')} | {fmt(r['kib_per_token'], '.2f')} | "
                         f"{vtxt} | {r.get('error') or r.get('stopped') or ''} |")
        lines += ["", f"Goal (issue #14): {s['goal']}."]
        with open(self.out_prefix + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


def main(argv=None):
    args = parse_args(argv)
    s = Search(args)
    try:
        s.run_all()
        if s.rank == 0:
            print(f"wrote {s.out_prefix}.json and .md", flush=True)
    finally:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
