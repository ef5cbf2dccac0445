// The two diagnostics switched by environment variables:
//   ORCHARD_DEBUG_FLASH_ATN=1  one line per kernel call, appended to
//                              $ORCHARD_LOG_DIR (default: the system temp dir)
//                              /orchard_flash_attn_<pid>.log
//   ORCHARD_TENSOR_PROFILE=1   one line per tensor per call on stderr: shape,
//                              strides, memory kind, zero-copy or staged (why).
// Both are read on every call (a getenv), so they can be toggled at run time;
// when off nothing else is done.
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

namespace orchard::detail {

bool debug_log_enabled();
bool tensor_profile_enabled();

// Appends one line (a '\n' is added) to the debug log; thread-safe.
void debug_log_line(const std::string& line);
// Path of this process's debug log file.
std::string debug_log_path();
// Monotonic call number shared by forward and backward calls.
long long next_call_number();

// Builds a log line without iostreams. On the H200 machine's builds, std::ostringstream's
// numeric insertion crashed inside the extension (SIGSEGV in basic_ostream::_M_insert<long>,
// cuda-gdb backtrace, 2026-11-30) for every CUDA caller with the debug log on, while
// std::to_string / snprintf work everywhere; numbers here go through those.
class LogLine {
 public:
  LogLine& operator<<(const char* s) { text_ += s; return *this; }
  LogLine& operator<<(const std::string& s) { text_ += s; return *this; }
  LogLine& operator<<(char c) { text_.push_back(c); return *this; }
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>, int> = 0>
  LogLine& operator<<(T v) { text_ += std::to_string(v); return *this; }
  template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
  LogLine& operator<<(T v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));  // what ostream's default prints
    text_ += buf;
    return *this;
  }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

// Writes one tensor-profile line to stderr; thread-safe.
void tensor_profile_line(const std::string& line);

}  // namespace orchard::detail
