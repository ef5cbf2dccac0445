"""Where a CPU forward's time goes on many cores (issue 15's short points): each call timed from
Python, its kernel time and parallel regions read back from the debug log's region trace
(ORCHARD_DEBUG_FLASH_ATN=1, README), and torch's SDPA on the same tensors in the same process.

For each shape and dtype: Orchard's best wall time (--reps calls back to back, the log off),
then --logged more calls with the log on; of those the one with the median kernel time is shown:
its elapsed time, the time outside every region, and per region its tasks, team, wall time,
participants' latest start (threads waking up) and busy median / max (load balance). The Python
wall time minus the kernel time is the call's host path (argument checks, allocation).

    OMP_NUM_THREADS=16 python bench/cpu_region_probe.py [--points 2,7] [--threads 16,4] [--copy]
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile

import torch
import torch.nn.functional as F

import orchard
from cpu_bench import run_heading  # bench/ is the script's directory
from cpu_mask_bench import best_ms

# issue 15's points short of 1.5x on the 16-core host ([G59]): b, h, s, d, dtype, causal
SHORT = [
    (1, 1, 512, 128, torch.bfloat16, False), (1, 8, 512, 64, torch.bfloat16, False),
    (1, 8, 512, 128, torch.bfloat16, False), (1, 8, 512, 128, torch.float32, False),
    (1, 8, 512, 64, torch.float32, False), (1, 8, 512, 128, torch.bfloat16, True),
    (1, 4, 2048, 64, torch.bfloat16, False), (1, 4, 2048, 128, torch.bfloat16, False),
    (1, 2, 4096, 128, torch.bfloat16, False), (1, 2, 4096, 64, torch.float32, False),
    (1, 4, 2048, 128, torch.float32, False),
    # 11-13: the other fp32 non-causal points (split planes against the FMA units, session 60)
    (1, 4, 2048, 64, torch.float32, False), (1, 1, 8192, 64, torch.float32, False),
    (1, 1, 8192, 128, torch.float32, False),
]
REGION = re.compile(r"\[tasks=(\d+) team=(\d+) wall_us=(\d+)(?: start_us=\d+/(\d+) busy_us=(\d+)/(\d+))?\]")


def logged_lines(fn, calls, log_dir):
    """fn() `calls` times with the debug log on; its FWD lines."""
    path = os.path.join(log_dir, f"orchard_flash_attn_{os.getpid()}.log")
    if os.path.exists(path):
        os.remove(path)
    os.environ["ORCHARD_DEBUG_FLASH_ATN"], os.environ["ORCHARD_LOG_DIR"] = "1", log_dir
    try:
        for _ in range(calls):
            fn()
    finally:
        del os.environ["ORCHARD_DEBUG_FLASH_ATN"]
    with open(path) as f:
        return [ln for ln in f.read().splitlines() if ln.startswith("FWD")]


def describe(line):
    """(kernel ms, outside µs, variant, region summary) of one log line."""
    elapsed = float(re.search(r"elapsed_ms=(\S+)$", line).group(1))
    outside = int(re.search(r"cpu_outside_us=(\d+)", line).group(1))
    variant = re.search(r"variant=cpu_fwd_(\S+?)_threads", line).group(1)
    parts = []
    for tasks, team, wall, start_max, busy_med, busy_max in REGION.findall(line):
        parts.append(f"{tasks}t/{team}: {wall} (start<={start_max or '-'}, busy {busy_med or '-'}/{busy_max or '-'})")
    return elapsed, outside, variant, "; ".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: OMP_NUM_THREADS)")
    ap.add_argument("--points", default="", help="comma-separated indices into SHORT (default: all)")
    ap.add_argument("--copy", action="store_true",
                    help="also time torch's copy of each point's K and V into reused tensors (the staging's bytes)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--logged", type=int, default=9)
    a = ap.parse_args()
    top, heading = run_heading("CPU forward regions", "wall", "best of --reps; regions from the median logged call")
    print(heading)
    counts = [int(t) for t in a.threads.split(",")] if a.threads else [top]
    log_dir = tempfile.mkdtemp(prefix="orchard_regions_")
    torch.manual_seed(0)
    print("| threads | b,h,s,d | dtype | causal | orchard ms | kernel ms | outside µs | torch ms | torch / orchard "
          "| variant | regions: tasks/team: wall µs (latest start, busy median/max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in counts:
        torch.set_num_threads(threads)
        points = [SHORT[int(i)] for i in a.points.split(",")] if a.points else SHORT
        for b, h, s, d, dtype, causal in points:
            q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
            if a.copy:
                k2, v2 = torch.empty_like(k), torch.empty_like(v)
                t_copy = best_ms(lambda: (k2.copy_(k), v2.copy_(v)), a.reps)
                mb = 2 * k.numel() * k.element_size() / 1e6
                print(f"(torch copy of K and V, {mb:.1f} MB: {t_copy * 1e3:.0f} µs, {mb / t_copy:.1f} GB/s)")
            with torch.no_grad():
                mine = lambda: orchard.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                t_theirs = best_ms(theirs, a.reps)
                t_mine = best_ms(mine, a.reps)
                t_theirs = min(t_theirs, best_ms(theirs, a.reps))  # interleaved: both warm, both twice
                t_mine = min(t_mine, best_ms(mine, a.reps))
                lines = logged_lines(mine, a.logged, log_dir)
            rows = sorted((describe(ln) for ln in lines), key=lambda r: r[0])
            elapsed, outside, variant, regions = rows[len(rows) // 2]
            print(f"| {threads} | {b},{h},{s},{d} | {str(dtype)[6:]} | {causal} | {t_mine:.3f} | {elapsed:.3f} | "
                  f"{outside} | {t_theirs:.3f} | {t_theirs / t_mine:.2f}x | {variant} | {regions} |", flush=True)


if __name__ == "__main__":
    main()
