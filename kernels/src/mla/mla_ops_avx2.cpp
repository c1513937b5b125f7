// MLA tile operations for AVX2 + FMA + F16C (built with those flags, reached only
// through ops_for() after run-time detection).
#include "cpu/simd_avx2.hpp"
#include "mla/mla_internal.hpp"
#include "mla/mla_ops_impl.hpp"

namespace ringattn::detail::mla {

const Ops& ops_avx2() {
  static const Ops ops = OpsImpl<cpu::SimdAvx2>::table("avx2");
  return ops;
}

}  // namespace ringattn::detail::mla
