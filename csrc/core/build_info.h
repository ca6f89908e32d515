// What the compiled kernel cores were built with; reported by `python -m metamixer_fast.info`.
#pragma once

#include <string>

namespace metamixer::core {

inline std::string compiler_string() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown compiler";
#endif
}

}  // namespace metamixer::core
