"""Instruction counts per kernel of a `cuobjdump -sass` listing (stdin or a file): the total, the count
without memory / control instructions (LDG, STG, LDC, ULDC, S2R, S2UR, BRA, EXIT, NOP) and the most
frequent opcodes. For straight-line kernels such as dev/cuda/dropout_step_sass.cu's, the count is the
work per thread.

    cuobjdump -sass file.cubin | python3 dev/cuda/sass_op_count.py [--top 12]
"""
import argparse
import collections
import re
import sys

SKIP = ("LDG", "STG", "LDC", "ULDC", "S2R", "S2UR", "BRA", "EXIT", "NOP")


def kernels(lines):
    ops, name = {}, None
    for line in lines:
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            ops[name] = []
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if name and m:
            ops[name].append(m.group(2).split(".")[0])
    return ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("listing", nargs="?")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    lines = open(args.listing) if args.listing else sys.stdin
    for name, ops in kernels(lines).items():
        count = collections.Counter(ops)
        work = sum(n for op, n in count.items() if not op.startswith(SKIP))
        top = " ".join(f"{op} {n}" for op, n in count.most_common(args.top))
        print(f"{name}: {len(ops)} instructions, {work} without memory / control; {top}")


if __name__ == "__main__":
    main()
