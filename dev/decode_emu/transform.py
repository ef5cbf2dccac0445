"""Rewrites decode_kernel.cu into plain C++ for the CPU emulation (shim/ supplies the
CUDA names): dynamic shared memory from the emulated CTA, <<<...>>> launches as calls."""
import re
import sys

src = open(sys.argv[1]).read()
src = src.replace("extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = emu_dyn_smem();")
src, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", r"emu_launch(\1, \2, \3);", src)
assert n >= 3, n
open(sys.argv[2], "w").write(src)
