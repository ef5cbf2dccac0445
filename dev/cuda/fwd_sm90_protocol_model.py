"""A host model of the sm90 forward's barrier protocol (flash_fwd_sm90.cuh in its overlap order with
the GEMM token ring, no cross-tile carry, one Q buffer, no O staging: the d64 / d96 causal kernels),
written in session 52 to look for the hang of test_sm90_causal_phantom_warpgroups (which turned out
to be a misplaced brace in the producer, fixed in 5ba0578: the model checks the protocol as intended,
not the code as written).

The producer and each consumer warpgroup are generators that yield while they wait; mbarriers
complete a phase when their arrival count is reached and a parity wait passes once the phase of
that parity has completed (the hardware rule); a WG's GEMM turn needs the previous WG's pass. A
round in which no barrier or token changes, repeated, is reported as a deadlock with each process's
wait and the CTA's tiles (checked: removing the skipped tiles' turns deadlocks at once).

Its finding: no deadlock with or without the phantom-WG skip at sq / sk 2200 / 2300, 2200 / 2200,
2048, 4160, 2200 / 2100 (d64's and d96's tiles, the paired causal order, one CTA per SM), nor
with the dense attn_bias ring (1 or 2 stages; not modelled: d128's cross-tile carry). It models
the protocol as written by hand, not the SASS: a mismatch with the kernel is possible.

    python3 dev/cuda/fwd_sm90_protocol_model.py"""
import sys

def decode(idx, nm, num_hb, section, paired, causal):
    if not paired:
        per = section * nm; sec = idx // per; r = idx - sec * per; hb0 = sec * section
        heads = min(section, num_hb - hb0); mi = r // heads
        return (nm - 1 - mi if causal else mi), hb0 + (r - mi * heads)
    u, half = idx >> 1, idx & 1
    pairs, odd = nm >> 1, nm & 1
    pu = pairs * num_hb
    if u >= pu:
        return (0 if half == 0 else -1), u - pu
    per = section * pairs; sec = u // per; r = u - sec * per; hb0 = sec * section
    heads = min(num_hb - hb0, section); j = r // heads
    return (nm - 1 - j if half == 0 else j + odd), hb0 + (r - j * heads)

def hidden(m_block, bm, wg, bn, causal, coff, rows_end, n_begin, n_end):
    most = n_end - n_begin - 1
    if most <= 0: return 0
    first = m_block * bm + 64 * wg
    if first >= rows_end: return most
    if not causal: return 0
    last = min(first + 63, rows_end - 1)
    lk = last + coff
    fh = n_begin if lk < 0 else lk // bn + 1
    h = n_end - max(fh, n_begin)
    return 0 if h <= 0 else min(h, most)

class Bar:
    def __init__(s, n): s.n, s.pend, s.done = n, 0, 0
    def arrive(s, k=1):
        s.pend += k
        assert s.pend <= s.n, "over-arrival"
        if s.pend == s.n: s.done += 1; s.pend = 0
    def ready(s, parity): return (s.done & 1) != parity

def run_cta(cta, grid, P):
    sq, sk, bm, bn, kwg, causal, paired, nm, num_hb, section, total, coff, phantom = (
        P[k] for k in "sq sk bm bn kwg causal paired nm num_hb section total coff phantom".split())
    tiles = []
    t = 2 * cta if paired else cta
    while t < total:
        mb, hb = decode(t, nm, num_hb, section, paired, causal)
        if not (paired and mb < 0):
            m0 = mb * bm
            key_end = sk
            if causal:
                last = m0 + bm - 1 + coff + 1
                key_end = 0 if last < 0 else min(last, sk)
            tiles.append((mb, 0, (key_end + bn - 1) // bn))
        else:
            tiles.append((mb, 0, 0))
        t = (t + 1 if (t & 1) == 0 else t - 1 + 2 * grid) if paired else t + grid
    kf = [Bar(1), Bar(1)]; vf = [Bar(1), Bar(1)]; ke = [Bar(4 * kwg), Bar(4 * kwg)]; ve = [Bar(4 * kwg), Bar(4 * kwg)]
    nb = P["bias_stages"]  # dense attn_bias ring (0: none): loaded after K, read before each QK^T
    bf = [Bar(1) for _ in range(nb)]; be = [Bar(4 * kwg) for _ in range(nb)]
    qf = [Bar(1) for _ in range(kwg)]; qe = [Bar(4) for _ in range(kwg)]
    token = [0] * kwg
    def W(bar, par):  # wait
        while not bar.ready(par): yield f"wait"
    def take(w):
        while token[w] == 0: yield "turn"
        token[w] -= 1
    def give(w):
        nw = 0 if w + 1 == kwg else w + 1
        token[nw] += 1
        assert token[nw] <= 1, f"token of WG {nw} arrived twice"
    def producer():
        kv = 0; qc = 0
        for (mb, nb, ne) in tiles:
            nt = ne - nb
            if nt <= 0: continue
            for it in range(nt):
                s = kv % 2; ph = (kv // 2) & 1
                yield from W(ke[s], ph ^ 1); kf[s].arrive()
                if nb:
                    yield from W(be[kv % nb], ((kv // nb) & 1) ^ 1); bf[kv % nb].arrive()
                if it == 0:
                    use = qc
                    for w in range(kwg):
                        if use > 0: yield from W(qe[w], (use - 1) & 1)
                        qf[w].arrive()
                    qc += 1
                yield from W(ve[s], ph ^ 1); vf[s].arrive()
                kv += 1
    def consumer(wg):
        kv = 0; qpar = 0
        if wg == kwg - 1: give(wg)
        for (mb, nb, ne) in tiles:
            if paired and mb < 0: continue
            skip = hidden(mb, bm, wg, bn, True, coff, sq if phantom else 1 << 62, nb, ne) if causal and bm != bn else 0
            nt = ne - nb - skip; nend = ne - skip
            if nt > 0:
                yield from W(qf[wg], qpar); qpar ^= 1
                for j in range(skip):
                    s = kv % 2; ph = (kv // 2) & 1
                    yield from W(kf[s], ph); yield from W(vf[s], ph)
                    if nb:
                        yield from W(bf[kv % nb], (kv // nb) & 1); be[kv % nb].arrive(4)
                    ke[s].arrive(4); ve[s].arrive(4)
                    yield from take(wg); give(wg)
                    kv += 1
                s = kv % 2; ph = (kv // 2) & 1
                if nb:
                    yield from W(bf[kv % nb], (kv // nb) & 1); be[kv % nb].arrive(4)
                yield from W(kf[s], ph); yield from take(wg); give(wg)
                ke[s].arrive(4)
                if nt == 1: qe[wg].arrive(4)
                for it in range(1, nt):
                    c = kv + it; cp = c - 1
                    s, sp = c % 2, cp % 2; ph, php = (c // 2) & 1, (cp // 2) & 1
                    if nb:
                        yield from W(bf[c % nb], (c // nb) & 1); be[c % nb].arrive(4)
                    yield from W(kf[s], ph); yield from take(wg)
                    yield from W(vf[sp], php); give(wg)
                    ke[s].arrive(4)
                    if it == nt - 1: qe[wg].arrive(4)
                    ve[sp].arrive(4)
                cl = kv + nt - 1; sl = cl % 2; phl = (cl // 2) & 1
                kv += nt
                yield from W(vf[sl], phl); yield from take(wg); give(wg); ve[sl].arrive(4)
        if wg == 0: yield from take(wg)
    procs = {"producer": producer(), **{f"wg{w}": consumer(w) for w in range(kwg)}}
    state = {}
    while procs:
        progressed = False
        for name in list(procs):
            g = procs[name]
            try:
                # run until it blocks (yields) twice in a row without progress: step once
                r = next(g)
                state[name] = r
            except StopIteration:
                del procs[name]; progressed = True; continue
        # detect deadlock: if all remaining yielded 'wait'/'turn' for many rounds
        if not progressed:
            # check whether any process can proceed: run one more full round and compare
            snap = (tuple(b.done for b in kf + vf + ke + ve + qf + qe), tuple(b.pend for b in ke + ve + qe), tuple(token))
            if snap == state.get("_snap"):
                state["_same"] = state.get("_same", 0) + 1
                if state["_same"] > 5:
                    return f"DEADLOCK cta {cta}: " + ", ".join(f"{n}:{state[n]}" for n in procs) + f" tiles {tiles}"
            else:
                state["_same"] = 0
            state["_snap"] = snap
    return None

def check(sq, sk, bm, bn, kwg, causal, paired, hq=4, b=1, phantom=True, grid_sms=132, section=None, bias_stages=0):
    nm = (sq + bm - 1) // bm
    num_hb = hq * b
    slots = 2 * ((nm + 1) // 2) if paired else nm
    total = slots * num_hb
    units = total // 2 if paired else total
    grid = min(grid_sms, units)
    P = dict(sq=sq, sk=sk, bm=bm, bn=bn, kwg=kwg, causal=causal, paired=paired, nm=nm, num_hb=num_hb,
             section=section or num_hb, total=total, coff=sk - sq if causal else 0, phantom=phantom,
             bias_stages=bias_stages)
    for cta in range(grid):
        r = run_cta(cta, grid, P)
        if r: return r
    return "ok"

if __name__ == "__main__":
    bad = 0
    for bn in (128, 96):  # d64's and d96's key tiles (192-row tiles, 3 consumer WGs)
        for args in [(2200, 2300), (2200, 2200), (2048, 2048), (4160, 4160), (2200, 2100)]:
            for phantom in (True, False):
                r = check(*args, 192, bn, 3, True, True, phantom=phantom)
                bad += r != "ok"
                print(f"kBN {bn} sq/sk {args} {'phantom skip' if phantom else 'no skip'}: {r}", flush=True)
    # Dense attn_bias rings (flash_fwd_sm90.cuh, kBias): d64's 2 stages on 192 x 128 tiles, d128's and
    # d192 causal's 1 stage on 128 x 128 / 128 x 96 tiles (the paired order where the kernel uses it).
    for (bm, bn, kwg, stages, paired) in [(192, 128, 3, 2, True), (128, 128, 2, 1, False), (128, 96, 2, 1, True)]:
        for args in [(2200, 2300), (1000, 1000), (330, 460)]:
            for causal in (False, True):
                r = check(*args, bm, bn, kwg, causal, paired and causal, hq=16, bias_stages=stages)
                bad += r != "ok"
                print(f"bias ring {stages}: tiles {bm}x{bn} sq/sk {args} causal {causal}: {r}", flush=True)
    sys.exit(1 if bad else 0)
