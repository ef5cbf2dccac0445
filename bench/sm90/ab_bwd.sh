#!/usr/bin/env bash
# A/B of sm90 backward variants in one device call (issue #11): sm90_bwd_bench built once per
# variant for one bucket (D, SM90_BWD_BENCH_D), every variant's correctness checks, then ROUNDS
# alternating rounds of the bench's "bulk" mode (the library's default form, FA grid), medians per
# shape and the ratio to the first variant (ab_variants.sh).  From the repository root on an
# H100/H200:
#   D=64 VARIANTS="base=@.ab/head new= pipe1=-DORCHARD_SM90_BWD64_PIPE=1" bash bench/sm90/ab_bwd.sh
# D=192 / 256 times the wide kernel (flash_bwd_sm90_wide.cuh) of that bucket (written in session 31,
# first run in session 32: 13 + 8 checks passed, ~70 s per bucket with two variants).
# A variant is NAME=FLAGS (nvcc -D flags, spaces as commas) or NAME=@TREE (the bench built from
# another tree's src/ and include/, e.g. `git archive REV | tar -x -C .ab/head`, carried along).
# Writes $OUT/ab_bwd.log (+ $OUT/build_<NAME>.log, $OUT/checks_<NAME>.log).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AB_SRC=sm90_bwd_bench.cu AB_DEFS="-DSM90_BWD_BENCH_D=${D:-64}" AB_KERNEL=flash_bwd_sm90_kernel AB_MODES=bulk \
  AB_COLUMN=bulk AB_LOG=ab_bwd.log exec bash "$HERE/ab_variants.sh"
