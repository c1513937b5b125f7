// TEMPORARY placeholder: the optimised CPU backend replaces this file.
#include "backend.hpp"

namespace ringattn::detail {
std::unique_ptr<Backend> make_cpu_backend(CpuIsa) { return make_reference_backend(); }
}  // namespace ringattn::detail
