"""Medians over repeated runs of sm90_attn_bench (its TIME lines, every variant the binary times),
per shape and variant, with each variant's ratio to the library entry.
    for r in 1 2 3; do ./sm90_attn_bench d128; done > t.log; python3 bench/sm90/attn_medians.py t.log"""
import collections
import re
import statistics
import sys

runs = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    m = re.match(r"TIME (.+?)\s+(\S+)\s+[\d.]+ ms\s+([\d.]+) TFLOP/s", line)
    if m:
        runs[m.group(1)][m.group(2)].append(float(m.group(3)))
for shape, per in runs.items():
    base = statistics.median(per.get("library", [float("nan")]))
    cells = (f"{v} {statistics.median(x):.0f} ({statistics.median(x) / base:.3f}x)" for v, x in per.items())
    print(f"{shape:42s} " + " | ".join(cells))
