"""Summarises ncu's SASS source page (--page source --print-source sass --csv): executed warp
instructions per opcode. Column names vary between ncu versions, so the executed-instructions
column is found by name.
    python3 sass_counts.py PAGE.csv"""
import collections
import csv
import re
import sys


def main(path):
    rows = list(csv.reader(open(path, errors="replace")))
    head_at = next((i for i, r in enumerate(rows) if "Source" in [c.strip() for c in r]), None)
    if head_at is None:
        print("no header found; first lines:", rows[:4])
        return
    head = [c.strip() for c in rows[head_at]]
    print("columns:", head[:10])
    exe = next((i for i, c in enumerate(head) if re.search(r"instructions executed|inst_executed", c, re.I)), None)
    src = head.index("Source")
    if exe is None:
        print("no executed-instructions column")
        return
    counted = []
    for r in rows[head_at + 1:]:
        if len(r) <= max(exe, src):
            continue
        try:
            n = int(float(r[exe].replace(",", "") or 0))
        except ValueError:
            continue
        counted.append((n, r))
    total = sum(n for n, _ in counted)
    print(f"total executed warp instructions: {total:,}")
    by_op = collections.Counter()
    for n, r in counted:
        m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", r[src])
        by_op[m.group(1) if m else "?"] += n
    for op, n in by_op.most_common(28):
        print(f"  {op:10s} {n:>15,} {100 * n / max(total, 1):5.1f} %")


if __name__ == "__main__":
    main(sys.argv[1])
