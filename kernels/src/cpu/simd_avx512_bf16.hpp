// Thin vector API of the AVX512-BF16 dot-product engine (vdpbf16ps): the AVX-512
// fp32 vocabulary (SimdAvx512) plus vectors of 16 bf16 pairs. Include only from
// translation units compiled with the avx512 and avx512bf16 flags (files named
// *_avx512_bf16.cpp).
//
// A "pair vector" P holds 32 bf16 values, lane i (32 bits) = the pair (x[2i], x[2i+1]).
// dot2(acc, a, b) adds a[2i] * b[2i] + a[2i+1] * b[2i+1] to fp32 lane i of acc: the
// products of two bf16 values are exact in fp32; the instruction treats denormal inputs
// and results as zero and rounds to nearest even (it does not consult MXCSR).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_avx512.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

struct SimdAvx512Bf16 : SimdAvx512 {
  using P = __m512i;  // 32 bf16 = 16 pairs
  static constexpr int kPairLanes = 16;

  static P load_pairs(const bf16_t* p) { return _mm512_loadu_si512(p); }
  // The pair (p[0], p[1]) in every lane.
  static P bcast_pair(const bf16_t* p) {
    std::int32_t x;
    __builtin_memcpy(&x, p, 4);
    return _mm512_set1_epi32(x);
  }
  static V dot2(V acc, P a, P b) {
    return _mm512_dpbf16_ps(acc, __builtin_bit_cast(__m512bh, a), __builtin_bit_cast(__m512bh, b));
  }
  // 16 fp32 -> 16 bf16 at dst, round to nearest even.
  static void store_bf16(bf16_t* dst, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        __builtin_bit_cast(__m256i, _mm512_cvtneps_pbh(v)));
  }
};

}  // namespace ringattn::detail::cpu
