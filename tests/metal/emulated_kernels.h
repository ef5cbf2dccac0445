// The Metal kernels compiled for the emulator: every variant the C++ core can select
// (dtype x head-dim bucket), its exact MSL source built as C++ through the shim
// (generated TUs emulated_<dtype>.cpp), callable by kernel name with untyped buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "emulator_runtime.h"

namespace orchard::metal_emu {

using KernelThunk = void (*)(void* const* buffers, const ThreadIds& ids);

struct EmulatedKernel {
  KernelThunk run = nullptr;
  std::size_t buffer_count = 0;  // kernel arguments before the four thread ids
};

// variant name -> kernel name -> kernel
using VariantRegistry = std::map<std::string, std::map<std::string, EmulatedKernel>>;
const VariantRegistry& emulated_variants();

// Runs `kernel` of `variant` over `groups` threadgroups; throws EmulationError on a
// fault, std::invalid_argument for an unknown variant/kernel or a wrong buffer count.
void run_emulated(const std::string& variant, const std::string& kernel, std::uint32_t groups,
                  std::uint32_t threads_per_group, const std::vector<void*>& buffers);

// Binds a kernel `void f(buffers..., uint group, uint tid, uint sg, uint lane)` to the
// untyped calling convention.
template <class F>
struct KernelCaller;
template <class... A>
struct KernelCaller<void (*)(A...)> {
  static constexpr std::size_t kBuffers = sizeof...(A) - 4;
  template <auto Fn, std::size_t... I>
  static void call(void* const* b, const ThreadIds& t, std::index_sequence<I...>) {
    Fn(static_cast<std::tuple_element_t<I, std::tuple<A...>>>(b[I])..., t.group, t.thread, t.simdgroup, t.lane);
  }
};
template <auto Fn>
void kernel_thunk(void* const* buffers, const ThreadIds& ids) {
  using Caller = KernelCaller<decltype(Fn)>;
  Caller::template call<Fn>(buffers, ids, std::make_index_sequence<Caller::kBuffers>{});
}
template <auto Fn>
EmulatedKernel emulated_kernel() {
  return {&kernel_thunk<Fn>, KernelCaller<decltype(Fn)>::kBuffers};
}

// Filled in by the generated translation units.
void register_fp32(VariantRegistry& registry);
void register_fp16(VariantRegistry& registry);
void register_bf16(VariantRegistry& registry);

}  // namespace orchard::metal_emu
