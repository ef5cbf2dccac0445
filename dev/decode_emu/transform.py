"""Rewrites a CUDA .cu file into plain C++ for the CPU emulation (shim/ supplies the CUDA
names): dynamic shared memory from the emulated CTA, <<<...>>> launches as calls.
Usage: transform.py IN.cu OUT.cpp [MIN_LAUNCHES]. MIN_LAUNCHES (default 3, decode_kernel.cu's
count) and the check that no <<< is left catch launches the pattern stops recognizing."""
import re
import sys

src = open(sys.argv[1]).read()
min_launches = int(sys.argv[3]) if len(sys.argv) > 3 else 3
src = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];", r"unsigned char* \1 = emu_dyn_smem();", src)
# DOTALL: a launch's argument list may wrap onto the next line.
src, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", r"emu_launch(\1, \2, \3);", src,
                 flags=re.DOTALL)
assert n >= min_launches, f"{n} launches rewritten, expected at least {min_launches}"
assert "<<<" not in src, "a launch left unrewritten"
open(sys.argv[2], "w").write(src)
