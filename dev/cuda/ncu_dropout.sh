#!/usr/bin/env bash
# Where a dropout forward's time goes (one device call, from dev/gpu_session.sh as
# "sh:dev/cuda/ncu_dropout.sh"): ncu's scheduler, warp-state and compute-workload sections of
# one forward kernel launch through the package, with dropout 0.1 and without, per head dim
# (bf16, the FlashAttention grid's s2k point: b8, h = 2048 / d). POINTS="d:p ..." picks them.
set -uo pipefail
out="${OUT:-.}/logs/ncu_dropout"; mkdir -p "$out"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
cat > /tmp/ncu_dropout_call.py <<'PY'
import sys, torch, orchard
d, p = int(sys.argv[1]), float(sys.argv[2])
q, k, v = (torch.randn(8, 2048, 2048 // d, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with torch.no_grad():
    for _ in range(3):
        orchard.flash_attn_func(q, k, v, dropout_p=p)
torch.cuda.synchronize()
PY
for point in ${POINTS:-64:0 64:0.1 128:0 128:0.1 192:0 192:0.1}; do
  d=${point%%:*}; p=${point#*:}
  log="$out/d${d}_p${p}.txt"
  timeout 120 "$NCU" --kernel-name regex:"fwd" --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section InstructionStats python3 /tmp/ncu_dropout_call.py "$d" "$p" > "$log" 2>&1
  echo "== d$d p$p rc=$?"
  grep -E "^\s+(Duration|Issue Slots Busy|Issued Warp Per Scheduler|No Eligible|Executed Ipc Active|Warp Cycles Per Issued|Executed Instructions |Registers Per Thread|SM Busy|Compute \(SM\) Throughput)" "$log" | sed 's/  */ /g'
  grep -E "Context [0-9]+, Stream" "$log" | head -1 | cut -c1-200
done
