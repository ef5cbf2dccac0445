// Exceptions thrown by Orchard. Every message starts with the op name
// ("orchard.flash_attn: ...") so users can tell which call failed.
#pragma once

#include <stdexcept>
#include <string>

namespace orchard {

enum class ErrorKind { kInvalidArgument, kNotImplemented, kRuntime };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace orchard
