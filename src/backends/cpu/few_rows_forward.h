// Forward calls with few query rows per kv head (a decode step, a speculative-decoding or
// cross-attention call with a handful of queries, made through flash_attn_func, the SDPA
// drop-in or orchard_ops) run on the CPU decode kernel (decode.cpp) instead of the tiled
// forward (forward.cpp). The tiled forward stages K^T and V of every (batch, kv head) before
// it computes; with few rows that staging is most of the call. The decode kernel reads K / V
// in place and serves a kv head's whole query group at once.
#pragma once

#include "orchard/params.h"

namespace orchard::cpu {

// Query rows per kv head (query heads per kv head x sq) up to which the decode kernel runs.
// 2 threads, Zen 4, fp32 and fp16, d 64 / 128, MHA, GQA 4:1 and MQA 8:1 (the A/Bs in
// bench/RESULTS.md, session 40): at 16 rows the decode kernel took 0.44-0.96x the tiled
// forward's time (sk 1k / 4k); since its scores are a GEMM from 16 rows, at 24-32 rows
// 0.35-1.06x (sk 1k-8k; above 1 only at sk 1k d64 in fp32) and at 48 rows 0.73-1.10x.
inline constexpr int kFewRowsMaxRows = 32;
// The same for bf16 on a CPU with AVX512_BF16, whose tiled forward runs bf16 GEMMs. A C++
// harness calling the CPU forward (2 threads, the same box, d 64 / 128, sk 1k / 4k, 1 or 8 kv
// heads, MHA and GQA 4:1, min of 15 interleaved, before the GEMM scores): the decode kernel took
// 0.23-0.99x the tiled forward's time at 1-4 rows (1.25x on two 15-24 us calls), 0.40-1.42x at 8
// and 0.67-1.70x at 16, where two runs disagreed; through torch (bench/cpu_few_rows_bench.py)
// 1.35-3.25x faster at 1-4 rows, 1.1-1.5x slower at 16. With the GEMM scores, at 8-64 rows:
// 0.64-2.08x, below 1 mostly for GQA 4:1 at <= 4 rows per query head; MHA from 8 rows mostly
// 1.02-2.08x (three sk 1k points 0.72-0.88).
inline constexpr int kFewRowsMaxRowsBf16Dot = 4;

// Whether forward(p) runs on the decode kernel: fp32 / fp16 / bf16 with at most kFewRowsMaxRows
// rows per kv head (kFewRowsMaxRowsBf16Dot for bf16 where the CPU has AVX512_BF16), head dim a
// multiple of 8 up to 256 with d_v == d, no varlen, dropout or mask, and a bottom-right
// diagonal wherever causal, a window or ALiBi needs one (the decode
// kernel's). ORCHARD_CPU_FEW_ROWS=0 in the environment (read per call) keeps every call tiled.
bool forward_takes_decode_kernel(const FwdParams& p);

// Runs p on the decode kernel (split-KV when the (batch, kv head) pairs are fewer than the
// threads). Requires forward_takes_decode_kernel(p).
void forward_on_decode_kernel(const FwdParams& p);

}  // namespace orchard::cpu
