// The two diagnostics switched by environment variables:
//   ORCHARD_DEBUG_FLASH_ATN=1  one line per kernel call, appended to
//                              $ORCHARD_LOG_DIR (default: the system temp dir)
//                              /orchard_flash_attn_<pid>.log
//   ORCHARD_TENSOR_PROFILE=1   one line per tensor per call on stderr: shape,
//                              strides, memory kind, zero-copy or staged (why).
// Both are read on every call (a getenv), so they can be toggled at run time;
// when off nothing else is done.
#pragma once

#include <string>

namespace orchard::detail {

bool debug_log_enabled();
bool tensor_profile_enabled();

// Appends one line (a '\n' is added) to the debug log; thread-safe.
void debug_log_line(const std::string& line);
// Path of this process's debug log file.
std::string debug_log_path();
// Monotonic call number shared by forward and backward calls.
long long next_call_number();

// Writes one tensor-profile line to stderr; thread-safe.
void tensor_profile_line(const std::string& line);

}  // namespace orchard::detail
