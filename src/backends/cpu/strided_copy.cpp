// Rank-4 strided element copy for the bridge's staging on the CPU. The
// innermost dimension is copied with memcpy when both sides are contiguous
// there, element by element otherwise.
#include "backends/cpu/strided_copy.h"

#include <cstring>

#include "backends/cpu/kernel_common.h"

namespace orchard::cpu {
namespace {

template <class E>
void copy_typed(const detail::StridedCopy& c) {
  const auto* src = static_cast<const E*>(c.src);
  auto* dst = static_cast<E*>(c.dst);
  const std::int64_t n0 = c.shape[0], n1 = c.shape[1], n2 = c.shape[2], n3 = c.shape[3];
  const bool inner_contig = c.src_strides[3] == 1 && c.dst_strides[3] == 1;
  ORCHARD_OMP("omp parallel for collapse(2) schedule(static) if(n0 * n1 * n2 * n3 > 65536)")
  for (std::int64_t i0 = 0; i0 < n0; ++i0) {
    for (std::int64_t i1 = 0; i1 < n1; ++i1) {
      for (std::int64_t i2 = 0; i2 < n2; ++i2) {
        const E* s = src + i0 * c.src_strides[0] + i1 * c.src_strides[1] + i2 * c.src_strides[2];
        E* d = dst + i0 * c.dst_strides[0] + i1 * c.dst_strides[1] + i2 * c.dst_strides[2];
        if (inner_contig) {
          std::memcpy(d, s, std::size_t(n3) * sizeof(E));
        } else {
          for (std::int64_t i3 = 0; i3 < n3; ++i3) d[i3 * c.dst_strides[3]] = s[i3 * c.src_strides[3]];
        }
      }
    }
  }
}

}  // namespace

void copy_strided(const detail::StridedCopy& c) {
  for (int i = 0; i < 4; ++i)
    if (c.shape[i] <= 0) return;
  switch (c.element_size) {
    case 1: copy_typed<std::uint8_t>(c); break;
    case 2: copy_typed<std::uint16_t>(c); break;
    case 4: copy_typed<std::uint32_t>(c); break;
    case 8: copy_typed<std::uint64_t>(c); break;
    default: break;
  }
}

}  // namespace orchard::cpu
