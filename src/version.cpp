#include "ringattn/version.hpp"

// The build defines RINGATTN_VERSION_STRING from project(VERSION) in the top-level
// CMakeLists.txt (src/CMakeLists.txt), so the library, the CLI and the Python
// package report one version.
#ifndef RINGATTN_VERSION_STRING
#error "RINGATTN_VERSION_STRING is not defined (src/CMakeLists.txt sets it)"
#endif

namespace ringattn {

const char* version() { return RINGATTN_VERSION_STRING; }

}  // namespace ringattn
