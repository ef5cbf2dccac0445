"""The wheel: `pip wheel .` makes an orchard-attn wheel that installs with no
compiler and no other package into a fresh venv, imports, and runs a forward.

CI-cheap: the wheel is built in the build directory that `pip install .`
(scripts/install_package.sh) already filled, build/<wheel tag>, with the same
ORCHARD_CUDA setting read from its CMake cache, so nothing is recompiled. The
test skips when that directory does not exist (pytest run without the install
step) or ORCHARD_SKIP_WHEEL_TEST=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_dir():
    # scikit-build-core's {wheel_tag} for this interpreter (pyproject: build-dir)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    cands = sorted((ROOT / "build").glob(f"{tag}-*-{plat}")) if (ROOT / "build").is_dir() else []
    return cands[0] if cands else None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if os.environ.get("ORCHARD_SKIP_WHEEL_TEST") == "1":
        pytest.skip("ORCHARD_SKIP_WHEEL_TEST=1")
    bdir = _build_dir()
    cache = bdir / "CMakeCache.txt" if bdir else None
    if cache is None or not cache.is_file():
        pytest.skip("no build/<wheel tag> from `pip install .` (scripts/install_package.sh) to "
                    "reuse; building from scratch is too slow for this test")
    text = cache.read_text()
    env = dict(os.environ)
    # Configure as the install did, or CMake reconfigures and recompiles everything. The
    # top-level CMakeLists reads ORCHARD_CUDA from the environment (the cache keeps its
    # default), so whether CUDA was built is read from the CUDA compiler entry, which only
    # a configure that enabled CUDA records.
    nvcc = re.search(r"^CMAKE_CUDA_COMPILER:[A-Z]+=(.*)$", text, re.M)
    env["ORCHARD_CUDA"] = "ON" if nvcc and nvcc.group(1) and "NOTFOUND" not in nvcc.group(1) else "OFF"
    archs = re.search(r"^ORCHARD_CUDA_ARCHS:STRING=(.*)$", text, re.M)
    if archs and "ORCHARD_CUDA_ARCHS" not in env:
        env["ORCHARD_CUDA_ARCHS"] = archs.group(1)
    out = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "-q", "-w", str(out), str(ROOT)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    wheels = list(out.glob("orchard_attn-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_name_tags_and_contents(wheel):
    name = wheel.name
    assert name.startswith("orchard_attn-0.1.0-")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if sys.version_info >= (3, 12):  # nanobind STABLE_ABI + wheel.py-api = cp312
        assert "-cp312-abi3-" in name, name
    else:
        assert f"-{tag}-{tag}-" in name, name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    assert re.search(r"^Name: orchard-attn$", metadata, re.M)
    assert any(re.match(r"orchard/_C\..*(so|pyd)$", n) for n in names), names
    # The stable-ABI torch ops, built when the build interpreter's torch is >= 2.10.
    import torch
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10):
        assert "orchard/_C_torch.so" in names, names
    for pkg in ("orchard/__init__.py", "orchard_ops/__init__.py",
                "orchard/integrations/transformers.py", "orchard/_autocast.py"):
        assert pkg in names
    assert not any(n.endswith((".cpp", ".cu", ".h", "CMakeLists.txt")) for n in names)


def test_wheel_installs_and_runs_in_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    # The outer pip installs into the fresh venv: no compiler, no index, no dependencies.
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # 1. Nothing but the wheel: no torch, no numpy. The core takes any buffer/DLPack array.
    code = (
        "import struct, orchard, sys\n"
        "assert 'torch' not in sys.modules\n"
        "def arr(vals, shape):\n"
        "    return memoryview(bytearray(struct.pack(f'{len(vals)}f', *vals))).cast('B').cast('f', shape)\n"
        "q = arr([0.5] * 24, [1, 3, 2, 4]); v = arr([float(i) for i in range(24)], [1, 3, 2, 4])\n"
        "out = arr([0.0] * 24, [1, 3, 2, 4]); lse = arr([0.0] * 6, [1, 2, 3])\n"
        "orchard._C.forward(q, q, v, out, lse, None, None, True, False, 0.0, 0, 0, 0, 'wheel')\n"
        "o = out.tolist()\n"
        "assert o[0][0] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]], o  # row 0 sees key 0\n"
        "assert abs(o[0][1][0][0] - 4.0) < 1e-6, o  # row 1: mean of keys 0, 1 (equal scores)\n"
        "print('core ok', orchard.__file__)\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and "core ok" in r.stdout, r.stdout + r.stderr
    assert str(venv) in r.stdout  # the wheel's copy, not the source tree's
    # 2. The same installed wheel under the test environment's torch (a .pth appends
    #    this interpreter's site-packages after the venv's own).
    purelib = sysconfig.get_paths()["purelib"]
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer_env.pth").write_text(purelib + "\n")
    code = (
        "import torch, orchard\n"
        "q = torch.randn(1, 8, 2, 16, requires_grad=True)\n"
        "out = orchard.flash_attn_func(q, q, q, causal=True)\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3, "
        "is_causal=True).transpose(1, 2)\n"
        "assert (out - ref).abs().max() < 1e-5\n"
        "out.sum().backward(); assert q.grad is not None\n"
        "from orchard import _ops\n"
        "print('torch ok', torch.__version__, orchard.__file__, 'stable ops:', _ops.STABLE_OPS_STATUS)\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and "torch ok" in r.stdout, r.stdout + r.stderr
    assert str(venv) in r.stdout
    import torch
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10):
        assert "stable ops: loaded" in r.stdout, r.stdout  # no libtorch link, loads from the wheel
