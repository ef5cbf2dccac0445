#include "core/logging.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>

namespace orchard::detail {
namespace {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

std::mutex& log_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

bool debug_log_enabled() { return env_flag("ORCHARD_DEBUG_FLASH_ATN"); }
bool tensor_profile_enabled() { return env_flag("ORCHARD_TENSOR_PROFILE"); }

std::string debug_log_path() {
  std::filesystem::path dir;
  if (const char* d = std::getenv("ORCHARD_LOG_DIR"); d != nullptr && d[0] != '\0') {
    dir = d;
  } else {
    std::error_code ec;
    dir = std::filesystem::temp_directory_path(ec);
    if (ec) dir = "/tmp";
  }
  return (dir / ("orchard_flash_attn_" + std::to_string(::getpid()) + ".log")).string();
}

void debug_log_line(const std::string& line) {
  std::lock_guard<std::mutex> lock(log_mutex());
  // Opened per line so ORCHARD_LOG_DIR changes and fork()ed children are
  // honoured; this path only runs with the debug log on.
  const std::string path = debug_log_path();
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    std::fprintf(stderr, "[orchard] cannot open debug log %s: %s\n", path.c_str(), std::strerror(errno));
    return;
  }
  std::string text = line;
  text.push_back('\n');
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
}

long long next_call_number() {
  static std::atomic<long long> counter{0};
  return ++counter;
}

void tensor_profile_line(const std::string& line) {
  std::lock_guard<std::mutex> lock(log_mutex());
  std::fprintf(stderr, "[orchard tensor] %s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace orchard::detail
