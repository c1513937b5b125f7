// Runtime CPU feature detection for backend selection.
#pragma once

#include <string>

namespace ringattn::detail {

enum class CpuIsa { kScalar, kAvx2, kAvx512 };

const char* isa_name(CpuIsa isa);

// True when this CPU (and OS) can run code built for `isa`; otherwise `missing`
// receives the names of the absent features, e.g. "avx512f avx512bw".
bool cpu_supports(CpuIsa isa, std::string* missing = nullptr);

CpuIsa best_cpu_isa();

std::string cpu_feature_summary_impl();

}  // namespace ringattn::detail
