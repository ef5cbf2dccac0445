#!/usr/bin/env bash
# A/B of compile-time variants of the float32 3xTF32 tensor-core kernels
# (src/backends/cuda/flash_fp32_tc.cu) in one device call: fp32_tc_bench.cu, which includes that
# file, built once per variant in parallel (seconds of nvcc, no package build), every variant's
# checks (one that fails is not timed), then ROUNDS alternating rounds of MODES, medians per shape
# and the ratio to the first variant (bench/sm90/ab_variants.sh, the engine of ab_fwd.sh /
# ab_bwd.sh).  No package build is needed: from the repository root on an H100/H200 (the device
# tool's $OUT gives the logs back),
#   OUT=$OUT VARIANTS="base= new=-DORCHARD_FP32_TC_SOMETHING=1" bash bench/fp32_tc/ab.sh
#   OUT=$OUT VARIANTS="base=@.ab/head new=" MODES="fwd_d128 bwd_d128" bash bench/fp32_tc/ab.sh
# or as a step of dev/gpu_session.sh, after its package build (the step takes more than the default
# SH_TIMEOUT of 180 s: ~1-4 s per mode x 4 modes x ROUNDS x variants, plus checks and builds):
#   VARIANTS="..." SH_TIMEOUT=600 bash dev/gpu_session.sh sh:bench/fp32_tc/ab.sh
# (or AB='VARIANTS="..." bash bench/fp32_tc/ab.sh' bash dev/sm90_ab_session.sh STEP... next to it).
# A variant is NAME=FLAGS (nvcc -D flags, commas for spaces) or NAME=@TREE (the kernels of another
# tree's src/ and include/, e.g. `git archive REV | tar -x -C .ab/head`, carried along).
# The kernel file's compile-time knobs: ORCHARD_FP32_TC_STAGES=1|2 (force the pipeline's buffers),
# ORCHARD_FP32_TC_FWD_MIN_CTAS / _FWD_MIN_CTAS_D64 / _DQ_MIN_CTAS (register caps; 1 = none),
# ORCHARD_FP32_TC_VEC_LDS=0 (the scalar-load layout instead of the 16-byte one),
# (Session 50 removed the knobs that lost their A/B: M_TILES=2 and the split backward kernels,
# bench/NOTES.md.)
# MODES: fp32_tc_bench.cu's timed modes (fwd_d<D> / bwd_d<D>: b2 h16, s 1k / 4k, causal or not).
# The spills shown are those of every *_tc_kernel (forward, dQ, dK / dV).  Writes
# $OUT/ab_fp32_tc.log (+ $OUT/build_<NAME>.log, $OUT/checks_<NAME>.log).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# AB_SRC is relative to bench/sm90, where ab_variants.sh looks.
AB_SRC=../fp32_tc/fp32_tc_bench.cu AB_DEFS="" AB_KERNEL=_tc_kernel \
  AB_MODES="${MODES:-fwd_d64 fwd_d128 bwd_d64 bwd_d128}" AB_COLUMN=library AB_LOG=ab_fp32_tc.log \
  exec bash "$HERE/../sm90/ab_variants.sh"
