// Which CPU forward calls run on the decode kernel (src/backends/cpu/few_rows_forward.h): a call
// it cannot serve (dropout, a mask, varlen, a top-left diagonal, d_v != d, d not a
// multiple of 8, fp64) must stay on the tiled forward, else a wrong answer; the calls it serves
// should not silently stop taking it. tests/python/test_cpu_few_rows.py checks the answers.
#include "backends/cpu/few_rows_forward.h"

#include "backends/cpu/gemm_bf16.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>

namespace orchard::cpu {
namespace {

// A decode step: fp32, b 2, one query row, sk 500, 8 query heads over 2 kv heads, d 64.
FwdParams decode_step() {
  FwdParams p;
  p.dtype = DType::kFloat32;
  p.b = 2;
  p.sq = 1;
  p.sk = 500;
  p.hq = 8;
  p.hkv = 2;
  p.d = p.d_v = 64;
  return p;
}

TEST(CpuFewRowsRule, DecodeStepsTakeTheDecodeKernel) {
  ::unsetenv("ORCHARD_CPU_FEW_ROWS");
  FwdParams p = decode_step();
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  p.dtype = DType::kFloat16;
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  p.sq = kFewRowsMaxRows / 4;  // 4 query heads per kv head x 4 rows = 16
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  p.sq += 1;
  EXPECT_FALSE(forward_takes_decode_kernel(p)) << "4 rows past the limit";
}

TEST(CpuFewRowsRule, DiagonalMustBeBottomRight) {
  FwdParams p = decode_step();
  p.causal = true;
  p.window_right = 0;
  p.causal_offset = p.sk - p.sq;  // flash-attn's alignment
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  p.causal_offset = 0;  // SDPA's top-left is_causal
  EXPECT_FALSE(forward_takes_decode_kernel(p));
  FwdParams w = decode_step();  // a window or ALiBi reads the diagonal too
  w.window_left = 10;
  w.causal_offset = 0;
  EXPECT_FALSE(forward_takes_decode_kernel(w));
  w.causal_offset = w.sk - w.sq;
  EXPECT_TRUE(forward_takes_decode_kernel(w));
  FwdParams plain = decode_step();  // no feature reads it: the offset does not matter
  plain.causal_offset = 0;
  EXPECT_TRUE(forward_takes_decode_kernel(plain));
}

TEST(CpuFewRowsRule, WhatTheDecodeKernelCannotServeStaysTiled) {
  const float slope = 0.5f, sink = 1.0f;
  const std::int32_t cu[2] = {0, 1};
  const std::uint8_t mask = 1;
  std::uint8_t keep = 0;
  const auto stays_tiled = [](FwdParams p) { return !forward_takes_decode_kernel(p); };
  FwdParams p = decode_step();
  p.dtype = DType::kFloat64;
  EXPECT_TRUE(stays_tiled(p)) << "fp64";
  p = decode_step(), p.dropout_p = 0.1f;
  EXPECT_TRUE(stays_tiled(p)) << "dropout";
  p = decode_step(), p.dropout_mask = &keep;
  EXPECT_TRUE(stays_tiled(p)) << "returned keep-mask";
  p = decode_step(), p.attn_bias = &mask;
  EXPECT_TRUE(stays_tiled(p)) << "mask";
  p = decode_step(), p.sink = &sink;
  EXPECT_FALSE(stays_tiled(p)) << "a sink is served (split 0 starts each row's softmax with it)";
  p = decode_step(), p.cu_seqlens_q = p.cu_seqlens_k = cu;
  EXPECT_TRUE(stays_tiled(p)) << "varlen";
  p = decode_step(), p.d_v = 32;
  EXPECT_TRUE(stays_tiled(p)) << "d_v != d";
  p = decode_step(), p.d = p.d_v = 60;
  EXPECT_TRUE(stays_tiled(p)) << "d % 8 != 0";
  p = decode_step(), p.d = p.d_v = 264;
  EXPECT_TRUE(stays_tiled(p)) << "d > 256";
  p = decode_step(), p.alibi_slopes = &slope, p.causal_offset = p.sk - p.sq;
  EXPECT_FALSE(stays_tiled(p)) << "ALiBi on the bottom-right diagonal is served";
}

TEST(CpuFewRowsRule, Bf16RowsDependOnTheBf16DotPath) {
  const bool saved = g_bf16_dot;
  FwdParams p = decode_step();  // 4 query heads per kv head, one row: 4 rows
  p.dtype = DType::kBFloat16;
  g_bf16_dot = false;  // bf16 tiles would run the fp32 path: the fp32 limit
  p.sq = kFewRowsMaxRows / 4;
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  g_bf16_dot = true;
  p.sq = kFewRowsMaxRowsBf16Dot / 4;
  EXPECT_TRUE(forward_takes_decode_kernel(p));
  p.sq += 1;
  EXPECT_EQ(forward_takes_decode_kernel(p), !bf16_dot_available()) << "8 rows take the bf16 tiles where they exist";
  g_bf16_dot = saved;
}

TEST(CpuFewRowsRule, EnvironmentSwitchKeepsEveryCallTiled) {
  ::setenv("ORCHARD_CPU_FEW_ROWS", "0", 1);
  EXPECT_FALSE(forward_takes_decode_kernel(decode_step()));
  ::setenv("ORCHARD_CPU_FEW_ROWS", "1", 1);
  EXPECT_TRUE(forward_takes_decode_kernel(decode_step()));
  ::unsetenv("ORCHARD_CPU_FEW_ROWS");
}

}  // namespace
}  // namespace orchard::cpu
