"""Shared fixtures: the device list (CPU always; CUDA when torch sees a GPU and
this orchard build has the CUDA backend) and the `cuda` marker's skip."""

import os

import pytest
import torch

import orchard

HAS_CUDA = torch.cuda.is_available() and bool(orchard.build_info().get("cuda_compiled"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    why = ("no CUDA device" if not torch.cuda.is_available()
           else "this orchard build has no CUDA backend (ORCHARD_CUDA=OFF)")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh, reproducible inputs per test: seed from the test's node id.
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)
    yield


@pytest.fixture
def debug_log(tmp_path, monkeypatch):
    """Switches the per-call debug log on into tmp_path; returns a function giving its lines so far
    (one per kernel call: FWD / BWD / DECODE ..., with the variant that ran)."""
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_DIR", str(tmp_path))
    path = tmp_path / f"orchard_flash_attn_{os.getpid()}.log"
    return lambda: path.read_text().splitlines() if path.exists() else []


@pytest.fixture(params=["3xtf32", "simt"])
def fp32_family(request, monkeypatch):
    """The tiled CUDA fp32 kernel family a test runs on: the 3xTF32 tensor-core kernels or the SIMT
    ones (ORCHARD_CUDA_FP32_TC, read per call), every forward on the tiled kernels
    (ORCHARD_CUDA_FEW_ROWS=0). Its value is the debug log's variant suffix ("fp32_3xtf32" /
    "fp32_simt")."""
    monkeypatch.setenv("ORCHARD_CUDA_FP32_TC", "1" if request.param == "3xtf32" else "0")
    monkeypatch.setenv("ORCHARD_CUDA_FEW_ROWS", "0")
    return f"fp32_{request.param}"


def pytest_report_header(config):
    info = orchard.build_info()
    return (f"orchard {orchard.__version__}: cuda_compiled={info['cuda_compiled']} "
            f"archs={info['cuda_archs']!r} openmp={info['openmp']} threads={info['cpu_threads']}; "
            f"torch {torch.__version__}, cuda available={torch.cuda.is_available()}")


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    # A backend may leave some dtype/shape combinations unimplemented (e.g.
    # float64 on CUDA): those CUDA cases skip with the backend's own message,
    # while on the CPU (which implements everything) they still fail.
    try:
        return (yield)
    except NotImplementedError as e:
        callspec = getattr(pyfuncitem, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            pytest.skip(f"not implemented on CUDA: {e}")
        raise
