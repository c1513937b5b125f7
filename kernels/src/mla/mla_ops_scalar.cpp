// Portable MLA tile operations (plain C++; the "cpu-scalar" backend).
#include "cpu/simd_scalar.hpp"
#include "mla/mla_internal.hpp"
#include "mla/mla_ops_impl.hpp"

namespace ringattn::detail::mla {

const Ops& ops_scalar() {
  static const Ops ops = OpsImpl<cpu::SimdScalar>::table("scalar");
  return ops;
}

const Ops& ops_for(CpuIsa isa) {
  // AVX-512 machines run the AVX2 tiles: the decode is bound by memory (small h_q)
  // or by FMA throughput with 12 live accumulators, which AVX2 already keeps busy.
  // The matrix tiers (cpu-amx, cpu-avx512-bf16) run them too where their bf16 path
  // does not apply (decode_uses_bf16_path).
  if (isa != CpuIsa::kScalar) return ops_avx2();
  return ops_scalar();
}

}  // namespace ringattn::detail::mla
