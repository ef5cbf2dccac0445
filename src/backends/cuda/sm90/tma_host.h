// TMA host side: builds a CUtensorMap (a 2D row-major matrix, a 4D view, a BSHD attention
// tensor) with cuTensorMapEncodeTiled.
// The driver function is fetched through the runtime (cudaGetDriverEntryPoint[ByVersion]),
// so nothing links against libcuda: the runtime already holds the driver handle.
#pragma once
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

namespace orchard::sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_tiled_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn) return fn;
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
  // ByVersion pins the ABI of the symbol we get (v12000), whatever the driver's newest is.
  cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                   cudaEnableDefault, &q);
#else
  cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || p == nullptr) {
    std::fprintf(stderr, "tma_host: cuTensorMapEncodeTiled unavailable (%s, query %d)\n",
                 cudaGetErrorString(e), static_cast<int>(q));
    return nullptr;
  }
  fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  return fn;
}

// cuTensorMapEncodeTiled is a driver call: it needs a current context on the calling thread,
// which the runtime makes current only at the thread's first runtime call that needs one.  The
// first backward that torch's autograd engine runs on its own worker thread may come before any
// (c10 skips cudaSetDevice when the device index already matches), and the encode then failed
// with CUDA_ERROR_INVALID_CONTEXT (compute-sanitizer on the H200, session 12), sending that call
// to the sm80 kernels.  cudaSetDevice makes the device's primary context current (CUDA >= 12);
// cuCtxGetCurrent (a thread-local read) keeps it off the path of every other call.
inline void ensure_context_current() {
  static PFN_cuCtxGetCurrent_v4000 get_current = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &p, 4000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuCtxGetCurrent", &p, cudaEnableDefault, &q);
#endif
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(p)
                                                                : nullptr;
  }();
  CUcontext ctx = nullptr;
  if (get_current != nullptr && get_current(&ctx) == CUDA_SUCCESS && ctx != nullptr) return;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaSetDevice(dev);
}

// Row-major [rows x cols] matrix of 2-byte elements, leading dimension `ld` (elements).
// Box = box_rows x box_cols; with SWIZZLE_128B, box_cols * 2 must be 128 (one swizzle row).
// Returns false (and prints the CUresult) on failure.
inline bool make_tma_2d(CUtensorMap* map, CUtensorMapDataType dtype, const void* base,
                        uint64_t rows, uint64_t cols, uint64_t ld, uint32_t box_rows,
                        uint32_t box_cols,
                        CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B,
                        CUtensorMapL2promotion l2 = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  auto fn = tensor_map_encode_tiled_fn();
  if (!fn) return false;
  ensure_context_current();
  const uint64_t elem = 2;
  cuuint64_t dims[2] = {cols, rows};          // innermost first
  cuuint64_t strides[1] = {ld * elem};        // bytes, for dims 1..rank-1; multiple of 16
  cuuint32_t box[2] = {box_cols, box_rows};   // each <= 256
  cuuint32_t estr[2] = {1, 1};
  CUresult r = fn(map, dtype, 2, const_cast<void*>(base), dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "tma_host: cuTensorMapEncodeTiled failed (CUresult %d)\n",
                 static_cast<int>(r));
    return false;
  }
  return true;
}

// 4D view (innermost first) dims[0..3] of 2-byte elements with byte strides for dims 1..3
// (multiples of 16), box box[0..3], 128-byte swizzle (box[0] * 2 == 128).  Used for BSHD
// attention tensors as (dim, row, head, batch).  Returns false (and prints) on failure.
inline bool make_tma_4d(CUtensorMap* map, CUtensorMapDataType dtype, const void* base,
                        const uint64_t (&dims)[4], const uint64_t (&byte_strides)[3],
                        const uint32_t (&box)[4],
                        CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B,
                        CUtensorMapL2promotion l2 = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  auto fn = tensor_map_encode_tiled_fn();
  if (!fn) return false;
  ensure_context_current();
  cuuint64_t d[4] = {dims[0], dims[1], dims[2], dims[3]};
  cuuint64_t st[3] = {byte_strides[0], byte_strides[1], byte_strides[2]};
  cuuint32_t bx[4] = {box[0], box[1], box[2], box[3]};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  CUresult r = fn(map, dtype, 4, const_cast<void*>(base), d, st, bx, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "tma_host: cuTensorMapEncodeTiled (4d) failed (CUresult %d)\n",
                 static_cast<int>(r));
    return false;
  }
  return true;
}

template <typename T>
constexpr CUtensorMapDataType tma_dtype() {
  return std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// (dim, row, head, batch) map of a BSHD-strided bf16 / fp16 tensor, box (box_cols, rows, 1, 1): the
// sm90 forward's and backward's; box_cols 64 (128-byte rows, 128B swizzle) or 32 (64B swizzle).
// Extent-1 dims get a harmless stride (the copy engine never steps them) so any view of them
// encodes.
template <typename T>
inline bool make_attn_map(CUtensorMap* map, const void* base, int d, int rows, int heads, int batch,
                          int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows,
                          int box_cols = 64) {
  const uint64_t e = sizeof(T);
  const uint64_t rs = static_cast<uint64_t>(row_stride) * e;
  uint64_t hs = static_cast<uint64_t>(head_stride) * e, bs = static_cast<uint64_t>(batch_stride) * e;
  if (heads == 1) hs = rs;
  if (batch == 1) bs = rs;
  const uint64_t dims[4] = {static_cast<uint64_t>(d), static_cast<uint64_t>(rows), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(batch)};
  const uint64_t strides[3] = {rs, hs, bs};
  const uint32_t box[4] = {static_cast<uint32_t>(box_cols), static_cast<uint32_t>(box_rows), 1, 1};
  return make_tma_4d(map, tma_dtype<T>(), base, dims, strides, box,
                     box_cols == 64 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B);
}

}  // namespace orchard::sm90
