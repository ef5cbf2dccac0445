#!/bin/bash
# Off-device resource report for the sm_90a kernels (no GPU needed): compiles each sm90 TU
# as the build does (sm90/sources.cmake flags) and prints, per kernel, ptxas's spill bytes,
# cuobjdump -res-usage (launch registers, stack, local, shared) and from the SASS the
# instruction count, the highest register index used and the local-memory ops (LDL/STL).
# Compare two trees by running it in each (or OUTDIR=... and diff the reports).
#   bash dev/cuda/sm90_regs.sh [OUTDIR] [file-glob under src/backends/cuda/sm90, default flash_*_sm90_*_d*]
# cuobjdump: $CUOBJDUMP, else on PATH, else the copy the pip package `triton` ships (found
# through $PYTHON, default python3; e.g. PYTHON=/work/main/.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${1:-build-sm90-regs}; GLOB=${2:-flash_*_sm90_*_d*}
mkdir -p "$OUTDIR"
CO=${CUOBJDUMP:-$(command -v cuobjdump || true)}
[[ -z $CO ]] && CO=$(${PYTHON:-python3} -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)
[[ -x $CO ]] || { echo "no cuobjdump (set CUOBJDUMP or PYTHON)"; exit 1; }
for f in src/backends/cuda/sm90/$GLOB.cu; do
  n=$(basename "$f" .cu)
  nice -n 10 nvcc -std=c++20 -Isrc -Iinclude -DORCHARD_WITH_SM90=1 -gencode=arch=compute_90a,code=sm_90a \
    --expt-relaxed-constexpr -O3 -lineinfo -Xptxas -v -c "$f" -o "$OUTDIR/$n.o" > "$OUTDIR/$n.ptxas" 2>&1 ||
    { echo "$n: compile failed"; tail -20 "$OUTDIR/$n.ptxas"; continue; }
  "$CO" -res-usage "$OUTDIR/$n.o" > "$OUTDIR/$n.res" 2>/dev/null
  "$CO" -sass "$OUTDIR/$n.o" 2>/dev/null > "$OUTDIR/$n.sass"
  python3 - "$OUTDIR/$n" <<'PY'
import re, sys
base = sys.argv[1]
def per_function(path, name_re, value_re):
    """{kernel: the groups of value_re on the first matching line after its name_re line}."""
    out, name = {}, None
    for line in open(path):
        m = re.search(name_re, line)
        if m: name = m.group(1); continue
        m = re.search(value_re, line)
        if m and name: out[name] = m.groups(); name = None
    return out
spill = per_function(base + ".ptxas", r"Function properties for (\S+)",
                     r"(\d+) bytes spill stores, (\d+) bytes spill loads")
res = per_function(base + ".res", r"Function (\S+):", r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
sass = {}
cur = None
for line in open(base + ".sass"):
    m = re.search(r"Function : (\S+)", line)
    if m: cur = m.group(1); sass[cur] = [0, -1, 0]; continue
    if cur and re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
        sass[cur][0] += 1
        for r in re.findall(r"\bR(\d+)\b", line): sass[cur][1] = max(sass[cur][1], int(r))
        if re.search(r"\b(LDL|STL)\b", line): sass[cur][2] += 1
def short(k):
    m = re.search(r"kernelI(\w+?)Li(\d+)E(.*?)EEv", k)
    if not m: return k[:60]
    t = "bf16" if "bfloat" in m.group(1) else "fp16"
    rest = m.group(3).replace("Lb1", "1").replace("Lb0", "0").replace("Li", "").replace("E", " ")
    return f"{'fwd' if 'fwd' in k else 'bwd'} {t} d{m.group(2)} <{rest.strip()}>"
for k in sorted(res):
    st, ld = spill.get(k, ("?", "?"))
    reg, stack, shared, local = res[k]
    n, rmax, ll = sass.get(k, [0, -1, 0])
    print(f"{short(k):34s} REG {reg} STACK {stack:>3} LOCAL {local:>3} SHARED {shared}  spill st/ld {st:>3}/{ld:<3}  "
          f"sass {n:6d} instr  max R{rmax}  LDL/STL {ll}")
PY
done
