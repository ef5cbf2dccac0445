// orchard._C._core_api(): the address of the core's function table (core_api.h) for the
// stable-ABI torch op library. Nothing here is used by the DLPack path.
#include "core_api.h"

#include <nanobind/nanobind.h>

#include <exception>

namespace nb = nanobind;

namespace {

template <typename F>
int guarded(F&& f, std::string& error) {
  try {
    f();
    return -1;
  } catch (const orchard::Error& e) {
    error = e.what();
    return static_cast<int>(e.kind());
  } catch (const std::exception& e) {
    error = e.what();
    return static_cast<int>(orchard::ErrorKind::kRuntime);
  }
}

const orchard::binding::CoreApi kApi = [] {
  orchard::binding::CoreApi api;
  api.forward = [](const orchard::ForwardArgs& a, std::string& error) {
    return guarded([&] { orchard::attention_forward(a); }, error);
  };
  api.backward = [](const orchard::BackwardArgs& a, std::string& error) {
    return guarded([&] { orchard::attention_backward(a); }, error);
  };
  api.backward_workspace_bytes = [](const orchard::BackwardArgs& a, std::size_t& bytes, std::string& error) {
    return guarded([&] { bytes = orchard::backward_workspace_bytes(a); }, error);
  };
  api.kvcache_plan = [](const orchard::DecodeArgs& a, orchard::DecodePlan& plan, std::string& error) {
    return guarded([&] { plan = orchard::kvcache_plan(a); }, error);
  };
  api.kvcache_forward = [](const orchard::DecodeArgs& a, std::string& error) {
    return guarded([&] { orchard::attention_with_kvcache(a); }, error);
  };
  return api;
}();

}  // namespace

void register_core_api(nb::module_& m) {
  m.def("_core_api", [] { return reinterpret_cast<std::uintptr_t>(&kApi); },
        "Address of the core's function table (python/binding/core_api.h), for orchard/_C_torch.so.");
}
