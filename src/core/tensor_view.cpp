#include "orchard/tensor_view.h"

#include <sstream>

namespace orchard {

std::string TensorView::describe() const {
  if (!defined()) return "<none>";
  std::ostringstream s;
  s << dtype_name(dtype) << "[";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[i];
  s << "] strides [";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << strides[i];
  s << "] " << device_type_name(device.type);
  if (device.type != DeviceType::kCPU) s << ":" << device.index;
  return s.str();
}

TensorView make_contiguous_view(void* data, DType dtype, Device device,
                                std::initializer_list<std::int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t n : shape) v.shape[i++] = n;
  std::int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

}  // namespace orchard
