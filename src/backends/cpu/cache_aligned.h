// Cache-line (64-byte) aligned storage for the CPU kernels' tiles and staged operands.
// std::vector and new[] give malloc's 16-byte alignment, and glibc's mmap'd blocks (128 KiB
// and up, e.g. a 128 x 256 fp32 score tile) start 16 bytes past a page: every 64-byte AMX
// tile row and AVX-512 vector then straddles two cache lines. Measured (session 19, one core
// of the AMX box, 128 x 256 tile, all operands 16 bytes off vs aligned): S = Q K^T 7.4 / 4.1
// us at d64 and 11.2 / 5.6 at d128, O += P V 6.4 / 2.6 and 13.2 / 5.7 us.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace orchard::cpu {

inline constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheAlignedAllocator {
  using value_type = T;
  CacheAlignedAllocator() = default;
  template <class U>
  CacheAlignedAllocator(const CacheAlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kCacheLine}); }
  template <class U>
  bool operator==(const CacheAlignedAllocator<U>&) const {
    return true;
  }
};

template <class T>
using CacheAlignedVector = std::vector<T, CacheAlignedAllocator<T>>;

// n bytes at a 64-byte boundary, freed with the matching aligned delete.
struct CacheAlignedDelete {
  void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{kCacheLine}); }
};
using CacheAlignedBytes = std::unique_ptr<std::byte[], CacheAlignedDelete>;
inline CacheAlignedBytes make_cache_aligned_bytes(std::size_t n) {
  return CacheAlignedBytes(new (std::align_val_t{kCacheLine}) std::byte[n]);
}

}  // namespace orchard::cpu
