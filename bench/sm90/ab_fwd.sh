#!/usr/bin/env bash
# A/B of sm90 forward variants in one device call (issue #11): sm90_attn_bench's library entry
# (SM90_BENCH_LIBRARY_ONLY) built once per variant, every variant's checks, then ROUNDS
# alternating rounds of MODES (sm90_attn_bench.cu's modes, e.g. "d128 d256 causal"), medians per
# shape and the ratio to the first variant (ab_variants.sh).  From the repository root on an
# H100/H200:
#   VARIANTS="base=-DORCHARD_SM90_FWD_PINGPONG_MAX_D=0 pp=-DORCHARD_SM90_FWD_PINGPONG_MAX_D=128" \
#     MODES="d128 causal" bash bench/sm90/ab_fwd.sh
# BUCKET=<64|128|192|256> builds one head-dim bucket only (0, the default: all).  Writes
# $OUT/ab_fwd.log (+ $OUT/build_<NAME>.log, $OUT/checks_<NAME>.log).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AB_SRC=sm90_attn_bench.cu AB_DEFS="-DSM90_BENCH_LIBRARY_ONLY -DSM90_BENCH_BUCKET=${BUCKET:-0}" \
  AB_KERNEL=flash_fwd_sm90_kernel AB_MODES="${MODES:-d128}" AB_COLUMN=library AB_LOG=ab_fwd.log \
  exec bash "$HERE/ab_variants.sh"
