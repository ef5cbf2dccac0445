"""Load-balance model of the persistent sm90 forward's tile schedules (no GPU needed).

Each causal query tile costs its key tiles plus one (Q load / epilogue); a schedule hands the
tiles to 132 CTAs (H100 SXM / H200). Printed: the busiest CTA's work over the mean, for
  greedy  - one CTA per tile, dispatched by the hardware in launch order (the kernel before
            persistence: head-major, longest m block first);
  stride  - persistent, CTA x runs tiles x, x + 132, ... in the L2-section order (main since
            session 14, used for causal calls only up to sq 4096 at d <= 128);
  paired  - persistent, the stride's unit a long and a short m block of one head (odd counts:
            block 0 alone, after all sections): branch sm90-fwd-paired, not yet run on a GPU.
Session 14 measured stride against greedy on an H200: d128 causal s8k -4.4 % (model 1.15 vs
1.05), d128 s2k +3-4 % (1.14 vs 1.07: the epilogue overlap outweighed it there).

    python3 dev/cuda/fwd_schedule_model.py
"""
import heapq
import math

SMS = 132


def section_heads(s, d, heads):
    """(b, h) pairs per L2 section: K + V of a head (4 s d bytes) within 32 MB, a power of 2."""
    k = 1
    while 2 * k * 4 * s * d <= 32 << 20:
        k *= 2
    return min(k, heads)


def tile_cost(s, bm, bn, m):
    return math.ceil(min(s, (m + 1) * bm) / bn) + 1.0


def head_major(s, bm, bn, heads):
    nm = math.ceil(s / bm)
    return [tile_cost(s, bm, bn, nm - 1 - mi) for _ in range(heads) for mi in range(nm)]


def sectioned(s, bm, bn, heads, section):
    nm = math.ceil(s / bm)
    return [tile_cost(s, bm, bn, nm - 1 - mi)
            for h0 in range(0, heads, section) for mi in range(nm) for _ in range(min(section, heads - h0))]


def paired_units(s, bm, bn, heads, section):
    nm = math.ceil(s / bm)
    odd = nm & 1
    units = [tile_cost(s, bm, bn, nm - 1 - j) + tile_cost(s, bm, bn, j + odd)
             for h0 in range(0, heads, section) for j in range(nm // 2) for _ in range(min(section, heads - h0))]
    return units + [tile_cost(s, bm, bn, 0)] * heads * odd


def strided(costs):
    load = [0.0] * SMS
    for i, c in enumerate(costs):
        load[i % SMS] += c
    return max(load)


def greedy(costs):
    heap = [(0.0, c) for c in range(SMS)]
    for c in costs:
        t, cta = heapq.heappop(heap)
        heapq.heappush(heap, (t + c, cta))
    return max(t for t, _ in heap)


def main():
    # name, s, d, query rows per tile, keys per tile (the kernels' causal configurations), heads = b * hq
    points = [("d64 s2k", 2048, 64, 192, 128, 256), ("d64 s8k", 8192, 64, 192, 128, 64),
              ("d128 s512", 512, 128, 128, 128, 512), ("d128 s2k", 2048, 128, 128, 128, 128),
              ("d128 s4k", 4096, 128, 128, 192, 64), ("d128 s8k", 8192, 128, 128, 192, 32),
              ("d192 s4k", 4096, 192, 128, 96, 40), ("d256 s2k", 2048, 256, 128, 64, 64),
              ("d256 s8k", 8192, 256, 128, 64, 16)]
    print(f"{'causal point':10s} {'greedy':>7s} {'stride':>7s} {'paired':>7s}   (busiest CTA / mean, {SMS} CTAs)")
    for name, s, d, bm, bn, heads in points:
        sec = section_heads(s, d, heads)
        mean = sum(head_major(s, bm, bn, heads)) / SMS
        print(f"{name:10s} {greedy(head_major(s, bm, bn, heads)) / mean:7.3f} "
              f"{strided(sectioned(s, bm, bn, heads, sec)) / mean:7.3f} "
              f"{strided(paired_units(s, bm, bn, heads, sec)) / mean:7.3f}")


if __name__ == "__main__":
    main()
