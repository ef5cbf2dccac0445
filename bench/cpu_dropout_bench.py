"""CPU dropout cost: orchard.flash_attn_func on CPU tensors (b, s, h, d), forward (no grad) and
forward + backward, wall-clock ms, best of --reps calls after one warm-up, per dtype and head dim.

    OMP_NUM_THREADS=2 python bench/cpu_dropout_bench.py [--p 0.1] [--reps 5]

--ab A B runs the same cases in fresh processes with PYTHONPATH=A, then B (a `pip install
--target` site of another build; '-' for the installed package), alternating for --rounds
rounds, and prints each side's range of per-round bests (on a noisy box compare the lows):

    OMP_NUM_THREADS=2 python bench/cpu_dropout_bench.py --ab /tmp/site_before - --rounds 10
"""
import argparse
import json
import os
import subprocess
import sys

from cpu_mask_bench import best_ms  # bench/ is the script's directory: ms, best of reps after a warm-up


def measure(a):
    """{case: ms} for every dtype x head dim x (fwd, fwd+bwd) in this process."""
    import torch
    import orchard

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        for d in a.d:
            q, k, v = (torch.randn(a.b, a.s, a.h, d, dtype=dt, requires_grad=True) for _ in range(3))
            name = f"{str(dt)[6:]} b{a.b} h{a.h} s{a.s} d{d} p{a.p}"

            def fwd_bwd():
                orchard.flash_attn_func(q, k, v, dropout_p=a.p).sum().backward()

            with torch.no_grad():
                out[name + " fwd"] = best_ms(lambda: orchard.flash_attn_func(q, k, v, dropout_p=a.p), a.reps)
            out[name + " fwd+bwd"] = best_ms(fwd_bwd, max(1, a.reps - 2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--h", type=int, default=4)
    ap.add_argument("--s", type=int, default=2048)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print {case: ms} as one JSON line")
    ap.add_argument("--ab", nargs=2, metavar=("A", "B"))
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    if not a.ab:
        res = measure(a)
        print(json.dumps(res) if a.json else "\n".join(f"{k}: {v:.2f} ms" for k, v in res.items()), flush=True)
        return
    args = [sys.executable, __file__, "--json", "--b", str(a.b), "--h", str(a.h), "--s", str(a.s),
            "--p", str(a.p), "--reps", str(a.reps), "--d", *map(str, a.d)]
    runs = {side: [] for side in a.ab}
    for r in range(a.rounds):
        for side in a.ab:
            env = dict(os.environ)
            if side != "-":
                env["PYTHONPATH"] = side
            line = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            runs[side].append(json.loads(line))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    print(f"| case | {a.ab[0]} ms (min-max of {a.rounds}) | {a.ab[1]} ms | best B/A |\n|---|---|---|---|")
    for case in runs[a.ab[0]][0]:
        lo = {side: min(x[case] for x in runs[side]) for side in a.ab}
        hi = {side: max(x[case] for x in runs[side]) for side in a.ab}
        print(f"| {case} | {lo[a.ab[0]]:.2f}-{hi[a.ab[0]]:.2f} | {lo[a.ab[1]]:.2f}-{hi[a.ab[1]]:.2f} | "
              f"{lo[a.ab[1]] / lo[a.ab[0]]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
