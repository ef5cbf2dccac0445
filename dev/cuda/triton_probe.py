"""Why FlexAttention's compile fails on the device (session 11: Triton's cuda_utils build left no
.so in its temporary directory): prints the C compiler Triton picks and runs its build of one
trivial module with the compiler's own output shown, in this environment.

    python3 dev/cuda/triton_probe.py
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import traceback

import triton
import triton.runtime.build as build

print("triton", triton.__version__, "python", sys.version.split()[0], "EXT_SUFFIX", sysconfig.get_config_var("EXT_SUFFIX"))
print("CC", os.environ.get("CC"), "gcc", shutil.which("gcc"), "clang", shutil.which("clang"), "cc", shutil.which("cc"))
print("PYTHONPATH", os.environ.get("PYTHONPATH"), "TMPDIR", os.environ.get("TMPDIR"), "cwd", os.getcwd())
real_call, real_check = subprocess.call, subprocess.check_call


def loud(cmd, *a, **kw):  # the compile command and everything the compiler says
    print("cmd:", " ".join(map(str, cmd)), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print("rc", r.returncode, "stdout:", r.stdout[-2000:], "stderr:", r.stderr[-2000:], flush=True)
    if r.returncode:
        raise subprocess.CalledProcessError(r.returncode, cmd)
    return 0


subprocess.check_call = loud
subprocess.call = lambda cmd, *a, **kw: (loud(cmd), 0)[1]
src = "#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\", 0, -1, 0};\n" \
      "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n"
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "probe.c")
    open(p, "w").write(src)
    try:
        print("knobs.build.impl", getattr(getattr(triton, "knobs", None), "build", None) and triton.knobs.build.impl)
        so = build._build("probe", p, d, [], [], [], [])
        print("built", so, "exists", os.path.exists(so), "dir", os.listdir(d))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("dir", os.listdir(d))
subprocess.check_call, subprocess.call = real_check, real_call
try:
    from triton.runtime.driver import driver
    print("driver utils:", type(driver.active.utils).__name__)
except Exception:  # noqa: BLE001
    traceback.print_exc()
