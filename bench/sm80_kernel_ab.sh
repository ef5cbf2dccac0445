#!/usr/bin/env bash
# A/B of the sm80-class kernels without a package build (bench/sm80_kernel_ab.cu): builds the bench
# once per variant from the bf16 d64 / d128 / d192 / d256 generated kernel files (13 files; the
# variants in parallel on the GPU machine's 16 cores), checks that every variant's outputs are the
# base's bytes, then times them in alternating rounds, and FA2 (SDPA flash) on the same grid.
#
#   locally:   git archive <rev> src include | tar -x -C .ab/kbase   (the base tree; carried: .ab is ignored)
#   on device: VARIANTS="base=@.ab/kbase new= swz=-DORCHARD_SM80_SWIZZLE_WIDE=1" bash bench/sm80_kernel_ab.sh
#
# A variant is NAME=FLAGS (nvcc flags, comma-separated, on this tree) or NAME=@DIR (the source tree at
# DIR, no flags); NAME+ENV=VALUE runs the previous build with that environment (e.g.
# "a100=new+ORCHARD_CUDA_SMEM_OPTIN=166912": the A100's kernel choices on this GPU). The first variant
# is the base of the byte check. ROUNDS (default 2) timing rounds; logs under $OUT/logs/sm80_kernel_ab.
set -uo pipefail
out="${OUT:-.}/logs/sm80_kernel_ab"; mkdir -p "$out"
arch=${ARCH:-sm_90}
work=/tmp/sm80_kernel_ab; mkdir -p "$work"
variants=(${VARIANTS:-base=@.ab/kbase new=})
build() {  # build NAME ROOT FLAGS
  local name=$1 root=$2 flags=${3//,/ } dir=$work/$1; mkdir -p "$dir"
  local tus=("$PWD/bench/sm80_kernel_ab.cu")
  for d in 64 128 192 256; do
    for f in flash_fwd_bf16_d$d flash_bwd_bf16_d$d flash_bwd_atomic_dq_bf16_d$d; do
      tus+=("$root/src/backends/cuda/sm80/generated/$f.cu")
    done
  done
  printf '%s\n' "${tus[@]}" | xargs -P13 -I{} sh -c \
    "nvcc -std=c++20 -arch=$arch --expt-relaxed-constexpr -O3 -I$root/include -I$root/src $flags -c {} -o $dir/\$(basename {} .cu).o" \
    > "$out/build_$name.log" 2>&1 && nvcc -arch=$arch "$dir"/*.o -o "$dir/bench" >> "$out/build_$name.log" 2>&1
}
declare -A bin env
names=()
t0=$(date +%s)
for v in "${variants[@]}"; do
  name=${v%%=*}; spec=${v#*=}; names+=("$name")
  if [[ $spec == *+* ]]; then bin[$name]=${spec%%+*}; env[$name]=${spec#*+}; continue; fi
  bin[$name]=$name; env[$name]=""
  if [[ $spec == @* ]]; then build "$name" "$(cd "${spec#@}" && pwd)" "" &
  else build "$name" "$PWD" "$spec" & fi
done
wait
for name in "${names[@]}"; do
  [[ -x $work/${bin[$name]}/bench ]] || { echo "build ${bin[$name]} failed"; tail -20 "$out/build_${bin[$name]}.log"; exit 1; }
done
echo "builds: $(( $(date +%s) - t0 )) s"
run() { env ${env[$1]} "$work/${bin[$1]}/bench" "${@:2}"; }
rc=0
base=${names[0]}
for name in "${names[@]}"; do
  run "$name" check "$work/$name.bin" > "$out/check_$name.log" 2>&1; r=$?
  (( r != 0 )) && rc=1
  same=$(cmp -s "$work/$base.bin" "$work/$name.bin" && echo "same bytes as $base" || echo "DIFFERENT bytes from $base")
  echo "check $name rc=$r: $same" | tee -a "$out/check_summary.txt"
  grep -v " 0 non-finite" "$out/check_$name.log" | grep -E "FAIL|non-finite" | head -5
  if [[ $same == DIFF* ]]; then
    # Another tiling may round differently: compare within bf16 tolerance, segment by segment.
    python3 bench/sm80_kernel_ab_compare.py "$work/$base.bin" "$work/$name.bin" | tee -a "$out/check_summary.txt"
    (( PIPESTATUS[0] != 0 )) && rc=1
  fi
done
for round in $(seq 1 "${ROUNDS:-2}"); do
  for name in "${names[@]}"; do
    run "$name" time > "$out/time_${name}_$round.md" 2>&1 || rc=1
  done
done
python3 - "$out" "${ROUNDS:-2}" "${names[@]}" <<'EOF'
# One table: each variant's median-of-rounds ms and its speed ratio to the first variant.
import statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = {}
for name in names:
    for r in range(1, rounds + 1):
        for line in open(f"{out}/time_{name}_{r}.md"):
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if len(c) == 8 and c[0].isdigit():
                rows.setdefault(tuple(c[:4]), {}).setdefault(name, []).append((float(c[4]), float(c[5])))
head = "| d | causal | dropout | s | " + " | ".join(f"{n} fwd / bwd ms" for n in names)
head += " | " + " | ".join(f"{n}/{names[0]} fwd / bwd" for n in names[1:]) + " |"
print(head + "\n" + "|---" * (4 + 2 * len(names) - 1) + "|")
for key, by in rows.items():
    med = {n: (statistics.median(f for f, _ in v), statistics.median(b for _, b in v)) for n, v in by.items()}
    cells = [f"{med[n][0]:.3f} / {med[n][1]:.3f}" for n in names]
    b0 = med[names[0]]
    cells += [f"{b0[0] / med[n][0]:.3f} / {b0[1] / med[n][1]:.3f}" for n in names[1:]]
    print("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
EOF
if [[ ${PEERS:-1} == 1 ]] && python3 -c "import torch" 2>/dev/null; then
  echo "== FA2 (SDPA flash), same grid"
  python3 bench/sm80_kernel_peer.py | tee "$out/fa2.md" || rc=1
fi
exit $rc
