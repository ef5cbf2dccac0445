// orchard._metal_emulator (tests only): runs the Metal kernels on the emulated execution
// model (tests/metal) over raw host pointers, for the test stand-in of
// torch.mps.compile_shader that lets the Python MPS path run end to end on CPU tensors.
// Built with a subset of head-dim buckets (python/CMakeLists.txt).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulated_kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_metal_emulator, m) {
  m.doc() = "Test-only: Orchard's Metal kernels on an emulated Metal execution model (CPU).";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const orchard::metal_emu::EmulationError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  m.def(
      "variants",
      [] {
        std::vector<std::string> names;
        for (const auto& [name, kernels] : orchard::metal_emu::emulated_variants()) names.push_back(name);
        return names;
      },
      "Variant names this build can emulate.");
  m.def(
      "run",
      [](const std::string& variant, const std::string& kernel, std::uint32_t groups,
         std::uint32_t threads_per_group, const std::vector<std::uintptr_t>& pointers) {
        std::vector<void*> buffers;
        for (std::uintptr_t p : pointers) buffers.push_back(reinterpret_cast<void*>(p));
        nb::gil_scoped_release release;
        orchard::metal_emu::run_emulated(variant, kernel, groups, threads_per_group, buffers);
      },
      "variant"_a, "kernel"_a, "groups"_a, "threads_per_group"_a, "pointers"_a,
      "Runs one kernel over `groups` threadgroups with buffers bound in argument order.");
}
