#pragma once

namespace ringattn {

// Library version string, e.g. "0.1.0"; ranks compare it before the first ring step.
const char* version();

}  // namespace ringattn
