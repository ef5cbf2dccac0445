// Per-thread, grow-only buffers for a call's staged K / V (and the backward's
// Q, dO, dQ slots and their written-row flags). Allocated and freed per call, glibc handed the pages back
// and the next call faulted them in again whenever the call alternated with
// torch's: 480-2016 minor faults per call at s512-2k (getrusage around 50
// calls, 2 threads, Zen 4 box; ~0 faults per call back to back). Buffers up to
// kKeepBytes stay with the calling thread (at most one per StageSlot); larger ones
// are allocated per call. kKeepBytes is the stage budget (g_stage_budget_bytes,
// kernel_common.h): at 32 MiB the bf16 backward's fp32 stage at b1 h8 s1k d128
// (34 MB: its dQ slots) was fresh memory on every call, ~8000 page faults, and
// keeping it ran that backward 1.26x faster (s2k d128: bf16 1.16x, fp32 1.07x;
// session 18, 2 threads). The price: a thread that ran a large call holds up to
// 3 x 64 MiB (and the dQ row flags, 1 / (4 dp) of the dQ slots) until it exits.
//
// The buffers start on a cache line (cache_aligned.h): the AMX tiles read staged K / V in
// 64-byte rows.
//
// Nothing here is zeroed: the kernels write every element they read. Tests
// check that with ORCHARD_CPU_POISON_STAGE=1, which fills each buffer with
// 0xFF bytes (NaN as fp32, fp64 and bf16) on every acquisition.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "backends/cpu/cache_aligned.h"

namespace orchard::cpu {

enum class StageSlot { kForward = 0, kBackward = 1, kBackward16 = 2, kBackwardDqRows = 3, kCount = 4 };

class StageBuffer {
 public:
  static constexpr std::size_t kKeepBytes = std::size_t(64) << 20;

  StageBuffer(StageSlot slot, std::size_t bytes) {
    bytes = std::max<std::size_t>(bytes, 64);
    Kept& k = kept()[static_cast<int>(slot)];
    if (bytes <= kKeepBytes) {
      if (k.bytes < bytes) {
        k.data = make_cache_aligned_bytes(bytes);
        k.bytes = bytes;
      }
      data_ = k.data.get();
    } else {
      own_ = make_cache_aligned_bytes(bytes);
      data_ = own_.get();
    }
    if (poison()) std::memset(data_, 0xFF, bytes);
  }
  StageBuffer(const StageBuffer&) = delete;
  StageBuffer& operator=(const StageBuffer&) = delete;

  template <class T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }

  // ORCHARD_CPU_POISON_STAGE=1 (read once): fill reused buffers with NaN / 0xFF.
  static bool poison() {
    static const bool on = [] {
      const char* e = std::getenv("ORCHARD_CPU_POISON_STAGE");
      return e && e[0] == '1';
    }();
    return on;
  }

 private:
  struct Kept {
    CacheAlignedBytes data;
    std::size_t bytes = 0;
  };
  static Kept* kept() {
    thread_local Kept k[static_cast<int>(StageSlot::kCount)];
    return k;
  }
  std::byte* data_ = nullptr;
  CacheAlignedBytes own_;
};

}  // namespace orchard::cpu
