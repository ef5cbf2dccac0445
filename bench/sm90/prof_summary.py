"""Summarise an ncu source-page CSV (prof_bwd.sh's .sass.csv): warp-stall samples by reason over
the whole kernel, then the instructions with the most samples, each with its top reasons and the
instructions just before it (where a wait's cost lands on the instruction after the wait).

    python3 bench/sm90/prof_summary.py prof_d128_s8192_c0.sass.csv [--top 25] [--context 3]
"""
import argparse
import csv
import collections


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--context", type=int, default=2)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    kernel = rows[0][1] if rows and rows[0] and rows[0][0] == "Kernel Name" else ""
    hdr_i = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[hdr_i]
    body = [r for r in rows[hdr_i + 1:] if len(r) == len(hdr)]
    col = {name: i for i, name in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "(Not Issued)" not in h]
    samples = [int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in body]
    total = sum(samples) or 1
    print(kernel[:160])
    print(f"{len(body)} SASS instructions, {total} samples")
    by_reason = collections.Counter()
    for r in body:
        for h in reasons:
            by_reason[h] += int(r[col[h]] or 0)
    print("stall reasons (share of all samples):")
    for h, n in by_reason.most_common(12):
        print(f"  {h[6:]:<20} {100 * n / total:5.1f} %")
    order = sorted(range(len(body)), key=lambda i: -samples[i])[: args.top]
    print(f"\ntop {args.top} instructions:")
    for i in order:
        r = body[i]
        top = sorted(((int(r[col[h]] or 0), h[6:]) for h in reasons), reverse=True)[:3]
        why = ", ".join(f"{h} {100 * n / total:.1f}%" for n, h in top if n)
        print(f"[{i:5d}] {100 * samples[i] / total:5.1f} %  {r[col['Source']].strip()[:90]}   ({why})")
        for j in range(max(0, i - args.context), i):
            print(f"         {' ' * 7} {body[j][col['Source']].strip()[:90]}")


if __name__ == "__main__":
    main()
