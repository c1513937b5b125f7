// Thin vector API, portable flavour: one fp32 lane, plain C++ (the compiler may still
// vectorise the loops around it). Same functions as simd_avx2.hpp / simd_avx512.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/simd_math.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

struct SimdScalar {
  using V = float;
  static constexpr int kLanes = 1;
  static constexpr const char* kName = "scalar";
  // Micro-kernel blocking: 4 rows x 4 columns of scalar accumulators.
  static constexpr int kRows = 4;
  static constexpr int kVecs = 4;

  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const bf16_t* p) { return bf16_to_f32(p->bits); }
  static V load(const f16_t* p) { return f16_to_f32(p->bits); }
  // e4m3 -> value / 256 through the fp16 bits, as the vector flavours (simd_math.hpp).
  static V load(const fp8e4m3_t* p) { return f16_to_f32(fp8_half_bits(p->bits)); }
  static V load_fp8(const std::uint8_t* p) { return fp8e4m3_to_f32(*p); }
  template <class T>
  static V load_partial(const T* p, int n) {
    return n > 0 ? load(p) : 0.0f;
  }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V abs(V a) { return std::fabs(a); }
  static V copysign(V mag, V sgn) { return std::copysign(mag, sgn); }
  static V div(V a, V b) { return a / b; }
  static V select_lt(V a, V b, V x, V y) { return a < b ? x : y; }
  static V round(V a) { return std::nearbyint(a); }
  static V pow2i(V n) {
    const std::uint32_t u = static_cast<std::uint32_t>(static_cast<int>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static float reduce_add(V v) { return v; }
  // Transposed horizontal sum of kLanes vectors (one lane: the value itself).
  static V reduce_add_lanes(const V* v) { return v[0]; }
  static float reduce_max(V v) { return v; }
  static V exp(V x) { return simd_exp<SimdScalar>(x); }
  static V tanh(V x) { return simd_tanh<SimdScalar>(x); }
};

}  // namespace ringattn::detail::cpu
