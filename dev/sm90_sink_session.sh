#!/usr/bin/env bash
# One device call for the sm90 forward's attention sinks (session 37): package build, the sm90
# feature / mask / sink tests, then the kernel bench's d64 bucket A/B of the epilogue's sink
# branch (base = .ab/head, the tree before it; `git archive <rev> | tar -x -C .ab/head`, carry .ab).
set -u
PYTEST_TIMEOUT=200 OUT=$OUT/s bash dev/gpu_session.sh "pytest:-k,sm90_shape_features or sm90_attn_mask or sink" 2>&1 | tail -6
OUT=$OUT/ab ROUNDS=${ROUNDS:-2} BUCKET=64 MODES="d64" VARIANTS="base=@.ab/head new=" timeout ${AB_TIMEOUT:-150} bash bench/sm90/ab_fwd.sh > /dev/null 2>&1
echo "ab rc=$?"; tail -30 "$OUT/ab/ab_fwd.log"
