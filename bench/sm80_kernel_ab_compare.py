"""Compares two check files of bench/sm80_kernel_ab.cu whose bytes differ (a variant with another
tiling rounds differently): per segment (named in BASE.idx), max |new - base| / max |base|; exits 1
when the worst is above 2e-2 (bf16 outputs of differently ordered fp32 sums stay ~1e-2 under it).

    python3 bench/sm80_kernel_ab_compare.py BASE.bin NEW.bin
"""
import sys

import numpy as np


def main(base_path: str, new_path: str) -> int:
    base, new = (open(p, "rb").read() for p in (base_path, new_path))
    if len(base) != len(new):
        print(f"  sizes differ: {len(base)} vs {len(new)} bytes")
        return 1
    worst, pos = (0.0, ""), 0
    for line in open(base_path + ".idx"):
        tag, kind, count = line.split()
        size = int(count) * (2 if kind == "bf16" else 4)
        a, b = (np.frombuffer(x[pos:pos + size], np.uint16 if kind == "bf16" else np.float32) for x in (base, new))
        if kind == "bf16":  # bf16 bits are the top half of an fp32
            a, b = ((x.astype(np.uint32) << 16).view(np.float32) for x in (a, b))
        pos += size
        a, b = a.astype(np.float64), b.astype(np.float64)
        rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
        worst = max(worst, (rel, tag))
    print(f"  max |diff| / max |base| over segments: {worst[0]:.3g} ({worst[1]})")
    return 0 if worst[0] <= 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
