"""The model behind cuda_check's dsink rule (tests/cuda/cuda_check.cu, run_case).

Emulates the harness case bias-win-sink (b1 hq3 hkv1 sq120 sk100 d128, causal, window
(20,0), boolean mask 30% masked + dead rows, sinks) in bf16: the fp64 reference, the
harness's naive same-precision reference, and a model of the CUDA kernels' arithmetic
(fp32 scores/LSE, P rounded to bf16 for PV, O rounded to bf16, D = rowsum(dO*O) fp32,
dsink = -sum exp(sink - lse) D). Reports how often the plain rule (err <= 2 naive +
atol) fails a correct computation and how the floored rule (naive error at least the
random walk of its per-row errors) does, also with injected bugs.

    python tests/cuda/dsink_rule_model.py [SEEDS]   (numpy + torch for bf16 rounding)"""
import sys
import numpy as np
import torch

def bf(x):  # round to bfloat16 (as double)
    return torch.as_tensor(x).to(torch.bfloat16).double().numpy()

def f32(x):
    return np.asarray(x, dtype=np.float32).astype(np.float64)

def run(seed, with_mask=True, bug=None, sq=120, sk=100, hq=3, d=128, wl=20):
    rng = np.random.default_rng(seed)
    q = bf(rng.standard_normal((hq, sq, d)))
    k = bf(rng.standard_normal((sk, d)))
    v = bf(rng.standard_normal((sk, d)))
    do = bf(rng.standard_normal((hq, sq, d)))
    diag = sk - sq
    i = np.arange(sq)[:, None]; j = np.arange(sk)[None, :]
    rel = j - (i + diag)
    vis = (rel <= 0) & (rel >= -wl)
    masks = []
    for h in range(hq):
        m = np.ones((sq, sk), bool)
        if with_mask:
            m = rng.random((sq, sk)) >= 0.3
            if h == 0:
                m[np.arange(sq) % 9 == 4, :] = False
        masks.append(m & vis)
    scale = 1 / np.sqrt(d)
    sinks = np.array([0.6 * h - 0.4 for h in range(hq)])
    out = {}
    terms = {"ref": [], "naive": []}
    for mode in ("ref", "naive", "kernel"):
        ds = np.zeros(hq)
        for h in range(hq):
            s = (q[h] @ k.T) * scale
            R = bf if mode == "naive" else (lambda x: x)
            if mode == "kernel":
                s = f32(s)
            s = np.where(masks[h], R(s), -np.inf)
            sink = sinks[h]
            mx = np.maximum(s.max(1), sink)
            e = np.where(np.isfinite(s), np.exp(s - mx[:, None]), 0.0)
            if mode == "kernel":
                e = f32(e)
            l = e.sum(1) + np.exp(sink - mx)
            lse = mx + np.log(l)
            if mode == "kernel":
                lse = f32(lse)
                o = f32((bf(e) @ v) / l[:, None])  # P packed to bf16 for the PV mma, fp32 acc
                o = bf(o)
                if bug == "lse":  # a systematic LSE error of 1e-3 (what a bf16-rounded score sum would give)
                    lse = lse + 1e-3
                D = f32((do[h] * o).sum(1))
                w = f32(np.exp(sink - lse))
                if bug == "row":  # one row's term dropped
                    w[sq // 2] = 0.0
                ds[h] = -(w * D).sum()
            else:
                p = R(e / l[:, None])
                o = R(p @ v)
                D = (do[h] * o).sum(1)
                terms[mode].append(-(np.exp(sink - lse) * D))
                ds[h] = -(np.exp(sink - lse) * D).sum()
        out[mode] = ds
    ek = np.abs(out["kernel"] - out["ref"]).max()
    en = np.abs(out["naive"] - out["ref"]).max()
    refmax = np.abs(out["ref"]).max()
    sig = max(np.sqrt(((tn - tr) ** 2).sum()) for tn, tr in zip(terms["naive"], terms["ref"]))
    return ek, en, refmax, sq, sig

def rules(ek, en, refmax, rows, sig, atol_rel=2e-3):
    cur = ek <= 2 * en + atol_rel * max(1.0, refmax)
    new = ek <= 2 * max(en, sig) + atol_rel * max(1.0, refmax)
    return cur, new

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for with_mask in (True, False):
        for bug in (None, "lse", "row"):
            fc = fn = 0
            ratios = []
            sigr = []
            for seed in range(n):
                ek, en, rm, rows, sig = run(seed, with_mask, bug)
                c, nw = rules(ek, en, rm, rows, sig)
                fc += not c
                fn += not nw
                ratios.append(ek / en)
                sigr.append(ek / sig)
            r = np.array(ratios)
            print(f"mask={with_mask!s:5} bug={bug!s:4}: current rule fails {fc}/{n}, rms-of-rows rule fails {fn}/{n}; "
                  f"err/naive median {np.median(r):.2f} p95 {np.percentile(r, 95):.2f} max {r.max():.2f}; "
                  f"err/rms p95 {np.percentile(sigr, 95):.2f} max {max(sigr):.2f}; last err {ek:.2e} naive {en:.2e} |ref| {rm:.2f}")
