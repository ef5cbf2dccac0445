// The C++ core as a table of function pointers, handed by orchard._C to the stable-ABI
// torch op library (orchard/_C_torch.so, torch_ops.cpp) at import. One copy of the core
// per process: the debug log's call numbers, the staging logs and the (large) CUDA kernels
// live once, in orchard._C, and _C_torch.so stays a thin adapter that links nothing.
//
// Both libraries are built from the same tree by the same compiler (one wheel), so the
// argument structs cross as they are; `abi` and the struct sizes guard against mixing
// files of two builds. Errors never unwind across: each entry returns -1 when it
// succeeded, else the orchard::ErrorKind of the error, with its message in `error`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "orchard/attention.h"
#include "orchard/kvcache.h"

namespace orchard::binding {

inline constexpr std::uint32_t kCoreApiVersion = 2;  // 2: the decode entries

struct CoreApi {
  std::uint32_t abi = kCoreApiVersion;
  std::uint32_t forward_args_size = sizeof(ForwardArgs);
  std::uint32_t backward_args_size = sizeof(BackwardArgs);
  std::uint32_t options_size = sizeof(AttentionOptions);
  std::uint32_t decode_args_size = sizeof(DecodeArgs);
  int (*forward)(const ForwardArgs& args, std::string& error) = nullptr;
  int (*backward)(const BackwardArgs& args, std::string& error) = nullptr;
  // Writes the byte count to `bytes`.
  int (*backward_workspace_bytes)(const BackwardArgs& args, std::size_t& bytes, std::string& error) = nullptr;
  // flash_attn_with_kvcache (orchard/kvcache.h): the split plan (workspace size), then the call.
  int (*kvcache_plan)(const DecodeArgs& args, DecodePlan& plan, std::string& error) = nullptr;
  int (*kvcache_forward)(const DecodeArgs& args, std::string& error) = nullptr;
};

}  // namespace orchard::binding
