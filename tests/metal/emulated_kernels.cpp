#include "emulated_kernels.h"

#include <mutex>
#include <stdexcept>

namespace orchard::metal_emu {

const VariantRegistry& emulated_variants() {
  static const VariantRegistry registry = [] {
    VariantRegistry r;
    register_fp32(r);
    register_fp16(r);
    register_bf16(r);
    return r;
  }();
  return registry;
}

void run_emulated(const std::string& variant, const std::string& kernel, std::uint32_t groups,
                  std::uint32_t threads_per_group, const std::vector<void*>& buffers) {
  const auto& all = emulated_variants();
  const auto v = all.find(variant);
  if (v == all.end()) throw std::invalid_argument("metal emulator: no variant " + variant);
  const auto k = v->second.find(kernel);
  if (k == v->second.end()) throw std::invalid_argument("metal emulator: variant " + variant + " has no kernel " + kernel);
  if (buffers.size() != k->second.buffer_count)
    throw std::invalid_argument("metal emulator: " + kernel + " takes " + std::to_string(k->second.buffer_count) +
                                " buffers, got " + std::to_string(buffers.size()));
  const KernelThunk run = k->second.run;
  // Threadgroup memory is a static per kernel (see shim/metal_stdlib): one launch at a time.
  static std::mutex one_launch_at_a_time;
  std::lock_guard lock(one_launch_at_a_time);
  run_grid(groups, threads_per_group, [&](const ThreadIds& ids) { run(buffers.data(), ids); });
}

}  // namespace orchard::metal_emu
