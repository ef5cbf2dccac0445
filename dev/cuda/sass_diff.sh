#!/bin/bash
# Proves a device-code refactor changes nothing the GPU runs, without a GPU: compiles one
# translation unit to a cubin from a base revision and from the working tree, with the
# build's device flags, and diffs the SASS (addresses and encodings stripped) and the
# per-kernel resource usage (registers, shared memory, stack / spills).
#   bash dev/cuda/sass_diff.sh [-b REV] FILE.cu ARCH [-DNAME=VALUE ...]
#     FILE.cu  path from the repository root, e.g. src/backends/cuda/sm80/generated/flash_bwd_bf16_d64.cu
#     ARCH     80 (sm80 kernels, decode, fp32) or 90a (the sm90/ kernels: pass -DORCHARD_WITH_SM90=1)
#     REV      base revision (default main); its outputs are cached under $SASS_DIFF_CACHE
# Exit 0: SASS and resource usage identical; 1: they differ (the diffs are printed with a
# verdict: only the order, only register numbers and order, or other instructions; the full
# dumps are kept beside the cache); 2: a compile failed. One sm80 backward TU takes ~2 min
# on the 2-core dev box, so a check costs two compiles (one once the base is cached).
# SASS_DIFF_BASE_ONLY=1: only compile (and cache) the base.
# -m PATTERN=REPLACEMENT: compare kernel by kernel, after renaming the working tree's kernels
# with that Python regex (re.sub) — for a change that adds a template argument, e.g.
# -m 'Lb0EEEv=EEv' (drop a last template argument `false`) matches the new <..., false>
# instantiations to the base's kernels. Only kernels named on both sides are compared; the
# ones left out on each side are counted in the first line (read it: 0 compared is no proof).
# cuobjdump: $CUOBJDUMP, else on PATH, else the copy that ships in triton's wheel.
set -uo pipefail
base=main map=""
while [[ ${1:-} == -b || ${1:-} == -m ]]; do
  if [[ $1 == -b ]]; then base=$2; else map=$2; fi
  shift 2
done
[[ $# -ge 2 ]] || { sed -n 5,10p "$0"; exit 2; }
file=$1 arch=$2
shift 2
defs=("$@")
root=$(git rev-parse --show-toplevel) || exit 2
sha=$(git -C "$root" rev-parse --verify "$base^{commit}") || exit 2
# Cache by the content of src/ and include/, so a base that moved on elsewhere still hits.
tkey=$(git -C "$root" rev-parse "$sha:src" "$sha:include" | sha1sum | cut -c1-12)
cache=${SASS_DIFF_CACHE:-/tmp/sass_diff}
cuobjdump=${CUOBJDUMP:-$(command -v cuobjdump || ls "$root"/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump /work/main/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)}
[[ -x $cuobjdump ]] || { echo "sass_diff: no cuobjdump (set CUOBJDUMP)"; exit 2; }
key=$(printf '%s|%s|%s' "$file" "$arch" "${defs[*]:-}" | sha1sum | cut -c1-12)
name=$(basename "$file" .cu)-sm_$arch-$key
mkdir -p "$cache"

compile() {  # compile <tree root> <out prefix>: cubin, normalised sass and res-usage
  nice -n 10 nvcc -cubin -gencode=arch=compute_$arch,code=sm_$arch -std=c++20 --expt-relaxed-constexpr -O3 \
    -lineinfo -I"$1/src" -I"$1/include" "${defs[@]}" -o "$2.cubin" "$1/$file" > "$2.log" 2>&1 ||
    { tail -30 "$2.log"; return 1; }
  # Strip what moves with any code above it: instruction addresses, encodings, branch targets
  # (immediates stay: a changed constant must show), and the anonymous namespace's hash (it
  # follows the source path, so the base tree's differs).
  local names='s/_GLOBAL__N__[0-9a-f]+_/_GLOBAL__N__X_/g'
  "$cuobjdump" -sass "$2.cubin" 2>/dev/null |
    sed -E "s#/\\*[0-9a-f]{4,}\\*/##; s#/\\* 0x[0-9a-f]+ \\*/##; /(BRA|BSSY|CALL|JMP|BRX|JMX|SSY|PBK|PCNT)/ s#0x[0-9a-f]+#ADDR#g; s/[[:space:]]+\$//; $names" |
    grep -v '^[[:space:]]*$' > "$2.sass"
  "$cuobjdump" -res-usage "$2.cubin" 2>/dev/null | sed -E "s/^[[:space:]]+//; $names" > "$2.res"
}

basedir=$cache/$tkey/$name
if [[ ! -s $basedir.sass ]]; then
  tree=$cache/$tkey/tree
  if [[ ! -d $tree ]]; then
    mkdir -p "$tree.tmp" && git -C "$root" archive "$sha" src include | tar -x -C "$tree.tmp" && mv "$tree.tmp" "$tree"
  fi
  echo "sass_diff: compiling base ${sha:0:10} $file (sm_$arch ${defs[*]:-})"
  compile "$tree" "$basedir" || exit 2
fi
[[ -n ${SASS_DIFF_BASE_ONLY:-} ]] && { echo "sass_diff: base cached at $basedir.sass"; exit 0; }
cur=$cache/cur-$name
echo "sass_diff: compiling working tree $file (sm_$arch ${defs[*]:-})"
# A snapshot of the working tree's sources, so that editing on during the compile is safe.
snap=$(mktemp -d "$cache/cur-tree.XXXXXX")
trap 'rm -rf "$snap"' EXIT
cp -r "$root/src" "$root/include" "$snap/"
compile "$snap" "$cur" || exit 2

if [[ -n $map ]]; then  # per kernel, the working tree's names mapped (-m): both sides sorted by kernel
  python3 - "$basedir" "$cur" "$map" <<'PY' || exit 2
import re, sys
base, cur, spec = sys.argv[1], sys.argv[2], sys.argv[3]
pat, _, rep = spec.partition("=")
def sections(path, head_re):
    out, name = {}, None
    for line in open(path):
        m = re.search(head_re, line)
        if m: name = m.group(1); out[name] = []; continue
        if name is not None: out[name].append(line)
    return out
def write(path, secs, head):
    with open(path, "w") as f:
        for n in sorted(secs): f.write(head.format(n) + "\n" + "".join(secs[n]))
for ext, head_re, head in ((".sass", r"Function : (\S+)", "Function : {}"), (".res", r"Function (\S+):", "Function {}:")):
    b = sections(base + ext, head_re)
    c = {re.sub(pat, rep, n): body for n, body in sections(cur + ext, head_re).items()}
    both = set(b) & set(c)
    write(base + ".bk" + ext, {n: b[n] for n in both}, head)
    write(cur + ".bk" + ext, {n: c[n] for n in both}, head)
    if ext == ".sass":
        print(f"per kernel (-m {spec}): {len(both)} kernels compared; left out: {len(b) - len(both)} base-only, "
              f"{len(c) - len(both)} working-tree-only")
PY
  basedir=$basedir.bk cur=$cur.bk
fi

rc=0
echo "kernels: $(grep -c 'Function :' "$cur.sass"), SASS lines: $(wc -l < "$basedir.sass") base, $(wc -l < "$cur.sass") now"
if diff -q "$basedir.res" "$cur.res" > /dev/null; then
  echo "res-usage: identical"
else
  echo "res-usage: DIFFERS"; diff "$basedir.res" "$cur.res"; rc=1
fi
if diff -q "$basedir.sass" "$cur.sass" > /dev/null; then
  echo "SASS: identical"
else
  echo "SASS: DIFFERS ($(diff "$basedir.sass" "$cur.sass" | grep -c '^[<>]') lines; $basedir.sass vs $cur.sass)"
  # Same multiset of instructions = only the schedule moved; the same once register numbers
  # and .reuse hints (operand-cache flags the scheduler sets) are dropped = only the schedule
  # and the register assignment moved (read the diff: which code, why).
  regs() { sed -E 's/\bU?R[0-9]+\b/R/g; s/\bU?P[0-9]\b/P/g; s/\.reuse//g' "$1" | sort; }
  if diff -q <(sort "$basedir.sass") <(sort "$cur.sass") > /dev/null; then
    echo "SASS: same instructions, different order (scheduling only)"
  elif diff -q <(regs "$basedir.sass") <(regs "$cur.sass") > /dev/null; then
    echo "SASS: same instructions up to register numbers and order (register assignment / scheduling only)"
  else
    echo "SASS: different instructions ($(diff <(regs "$basedir.sass") <(regs "$cur.sass") | grep -c '^[<>]') lines differ after dropping register numbers and order)"
  fi
  diff "$basedir.sass" "$cur.sass" | head -${SASS_DIFF_LINES:-40}; rc=1
fi
exit $rc
