"""``python -m orchard doctor``: what is installed, how it was built, which
devices it sees, and whether forward + backward agree with a float64 reference
on each of them. Ends with PASS or FAIL (exit code 1 on FAIL).

Environment variables worth knowing when something looks wrong:
``ORCHARD_DEBUG_FLASH_ATN=1`` (log every call) and ``ORCHARD_TENSOR_PROFILE=1``
(log zero-copy vs staged tensors).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import traceback


def _reference(q, k, v, scale, causal, top_left):
    """Math attention in float64 on BSHD tensors (GQA by repetition)."""
    import torch

    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))
    rep = qf.shape[1] // kf.shape[1]
    kf = kf.repeat_interleave(rep, dim=1)
    vf = vf.repeat_interleave(rep, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        off = 0 if top_left else sk - sq
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(sk, device=s.device)[None, :]
        s = s.masked_fill(j > i + off, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2)


def _self_check(device, dtype) -> tuple[bool, str]:
    import torch
    import orchard

    gen = torch.Generator(device="cpu").manual_seed(0)
    b, sq, sk, hq, hkv, d = 2, 37, 45, 4, 2, 32
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    q64, k64, v64, do64 = mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, hq, d)
    scale = 1.0 / math.sqrt(d)
    worst = 0.0
    details = []
    for causal in (False, True):
        q, k, v = (t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (q64, k64, v64))
        do = do64.to(device=device, dtype=dtype)
        out = orchard.flash_attn_func(q, k, v, causal=causal)
        out.backward(do)
        qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
        ref = _reference(qr, kr, vr, scale, causal, top_left=False)
        ref.backward(do.double().cpu())
        # Low-precision inputs: compare against the reference on the rounded
        # inputs, relative to the reference's magnitude.
        tol = {torch.float32: 2e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        for name, got, want in (("out", out, ref), ("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad),
                                ("dv", v.grad, vr.grad)):
            got = got.detach().double().cpu()
            if not torch.isfinite(got).all():
                return False, f"{name} (causal={causal}) has non-finite values"
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err / tol)
            details.append(f"{name}{'/causal' if causal else ''} {err:.1e}")
    ok = worst <= 1.0
    return ok, f"max rel err / tol = {worst:.3f} ({', '.join(details[:4])}, ...)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchard doctor", description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    failed = False
    print("Orchard doctor")
    print("=" * 60)
    print(f"python   {sys.version.split()[0]} ({platform.platform()})")
    try:
        import torch
        print(f"torch    {torch.__version__} (CUDA runtime {torch.version.cuda}, "
              f"cuda available: {torch.cuda.is_available()})")
    except Exception as e:  # pragma: no cover
        print(f"torch    NOT IMPORTABLE: {e}")
        print("verdict: FAIL")
        return 1
    try:
        import orchard
        print(f"orchard  {orchard.__version__} ({os.path.dirname(orchard.__file__)})")
        info = orchard.build_info()
    except Exception as e:
        print(f"orchard  NOT IMPORTABLE: {e}")
        traceback.print_exc()
        print("verdict: FAIL")
        return 1
    print("-" * 60)
    print("build:")
    print(f"  core version     {info.get('version')}")
    print(f"  CUDA compiled    {info.get('cuda_compiled')}"
          + (f" (archs {info.get('cuda_archs')})" if info.get("cuda_compiled") else ""))
    print(f"  OpenMP           {info.get('openmp')} ({info.get('cpu_threads')} CPU threads)")
    print(f"  CPU kernels      {info.get('cpu_kernels')}")
    for var in ("ORCHARD_DEBUG_FLASH_ATN", "ORCHARD_TENSOR_PROFILE", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            print(f"  env {var}={os.environ[var]}")
    print("-" * 60)
    print("devices:")
    devices = [torch.device("cpu")]
    print("  cpu")
    names = info.get("cuda_devices") or []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}  {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
            devices.append(torch.device("cuda", i))
        if not info.get("cuda_compiled"):
            print("  NOTE: torch sees CUDA but this orchard build has no CUDA backend "
                  "(rebuild with ORCHARD_CUDA=ON); CUDA self-checks are skipped")
            devices = devices[:1]
    elif names:
        print(f"  (orchard sees CUDA devices {names} but torch does not)")
    print("-" * 60)
    print("self-check (forward + backward vs float64 reference, GQA, sq != sk, causal and not):")
    for dev in devices:
        dtypes = [torch.float32, torch.float64] if dev.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
        for dt in dtypes:
            label = f"{dev} {str(dt).replace('torch.', '')}"
            try:
                ok, msg = _self_check(dev, dt)
            except NotImplementedError as e:
                print(f"  SKIP  {label}: {e}")
                continue
            except Exception as e:
                ok, msg = False, f"{type(e).__name__}: {e}"
            print(f"  {'ok  ' if ok else 'FAIL'}  {label}: {msg}")
            failed |= not ok
    print("=" * 60)
    print(f"verdict: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
