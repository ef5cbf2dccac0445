// Built instead of the CUDA backend when CUDA is off.
#include "core/backend.h"

namespace orchard::detail {
const BackendOps* cuda_backend() { return nullptr; }
}  // namespace orchard::detail
