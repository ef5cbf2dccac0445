// CPU implementation of BackendOps::copy_strided.
#pragma once

#include "core/backend.h"

namespace orchard::cpu {

// Copies shape[0..4) elements of element_size 1, 2, 4 or 8 bytes between
// arbitrarily strided (element strides, may be 0 or negative) host buffers.
void copy_strided(const detail::StridedCopy& copy);

}  // namespace orchard::cpu
