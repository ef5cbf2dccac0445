// The C++ side of the Metal backend: variant choice, limits, geometry and sources.
#include <gtest/gtest.h>

#include <string>

#include "backends/metal/metal_kernels.h"
#include "orchard/errors.h"

namespace orchard::metal {
namespace {

TEST(MetalVariant, EveryVariantFitsThreadgroupMemory) {
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int d = 1; d <= kMaxHeadDim; ++d) {
      const Variant v = select_variant(dt, d);
      ASSERT_GE(v.block_d, d);
      for (int floats : {forward_smem_floats(v), dq_smem_floats(v), dkv_smem_floats(v)})
        ASSERT_LE(floats * sizeof(float), kThreadgroupMemoryBytes) << v.name();
      for (int rows : {v.fwd_block_q, v.fwd_block_k, v.dq_block_q, v.dq_block_k, v.dkv_block_k, v.dkv_block_q})
        ASSERT_TRUE(rows > 0 && rows % 8 == 0) << v.name();
    }
}

TEST(MetalVariant, RejectsUnsupportedDtypesAndHeadDims) {
  EXPECT_NE(check_support(DType::kFloat64, 64).find("float64"), std::string::npos);
  EXPECT_NE(check_support(DType::kFloat16, 257).find("head dims 1..256"), std::string::npos);
  EXPECT_NE(check_support(DType::kFloat16, 0), "");
  EXPECT_EQ(check_support(DType::kBFloat16, 256), "");
  EXPECT_THROW(select_variant(DType::kFloat64, 64), Error);
}

TEST(MetalVariant, SourceIsSelfContainedRuntimeCompilableMsl) {
  const Variant v = select_variant(DType::kBFloat16, 100);
  EXPECT_EQ(v.name(), "metal_bf16_d128");
  const std::string src = variant_source(v);
  EXPECT_NE(src.find("typedef bfloat elem_t;"), std::string::npos);
  EXPECT_NE(src.find("constant constexpr int kBlockD = 128;"), std::string::npos);
  for (const char* kernel : {"orchard_fwd", "orchard_bwd_dot", "orchard_bwd_dq", "orchard_bwd_dkdv"})
    EXPECT_NE(src.find(std::string("kernel void ") + kernel + "("), std::string::npos) << kernel;
  // What compile_shader cannot give or rejects: function constants, dynamic threadgroup
  // memory (threadgroup pointer arguments), inline AIR assembly, atomics (not needed).
  for (const char* banned : {"function_constant", "__asm", "atomic_", "threadgroup float*", "threadgroup float *"})
    EXPECT_EQ(src.find(banned), std::string::npos) << banned;
}

TEST(MetalVariant, GeometryCoversTheProblem) {
  FwdParams p;
  p.b = 2, p.sq = 33, p.sk = 70, p.hq = 6, p.hkv = 2, p.d = 64, p.dtype = DType::kFloat16;
  const Variant v = select_variant(p.dtype, p.d);
  const Launch f = forward_launch(v, p);
  EXPECT_EQ(f.kernel, "orchard_fwd");
  EXPECT_EQ(f.groups, 2u * 6u * ((33 + v.fwd_block_q - 1) / v.fwd_block_q));
  EXPECT_EQ(f.threads_per_group, unsigned(v.fwd_block_q / 8 * 32));
  const Launch kv = backward_dkdv_launch(v, p);
  EXPECT_EQ(kv.groups, 2u * 2u * ((70 + v.dkv_block_k - 1) / v.dkv_block_k));
  EXPECT_EQ(backward_dot_launch(v, p).groups * 128u >= 2u * 6u * 33u, true);
}

TEST(MetalVariant, MetaPacksStridesAndDropout) {
  BwdParams p;
  p.b = 1, p.sq = 4, p.sk = 5, p.hq = 2, p.hkv = 1, p.d = 8;
  p.q_row_stride = 123, p.dv_head_stride = 77, p.causal = true, p.causal_offset = 1;
  p.dropout_p = 0.25f, p.scale = 0.5f;
  const auto m = pack_meta(p, true);
  ASSERT_EQ(m.size(), std::size_t(kMetaCount));
  EXPECT_EQ(m[kMetaQRow], 123);
  EXPECT_EQ(m[kMetaDvHead], 77);
  EXPECT_EQ(m[kMetaCausalOffset], 1);
  EXPECT_EQ(m[kMetaKeepThreshold], 64);  // round(256 * 0.25)
  EXPECT_EQ(m[kMetaWriteMask], 1);
  EXPECT_EQ(m[kMetaScaleBits], 0x3f000000);
}

}  // namespace
}  // namespace orchard::metal
