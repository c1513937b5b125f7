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
  // The first n (< 32) bf16 values, zero in the others (never reads past element n).
  static P load_pairs_partial(const bf16_t* p, int n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((std::uint64_t{1} << n) - 1u), p);
  }
  static P zero_pairs() { return _mm512_setzero_si512(); }
  // The pair (p[0], p[1]) in every lane.
  static P bcast_pair(const bf16_t* p) {
    std::int32_t x;
    __builtin_memcpy(&x, p, 4);
    return _mm512_set1_epi32(x);
  }
  static V dot2(V acc, P a, P b) {
    return _mm512_dpbf16_ps(acc, __builtin_bit_cast(__m512bh, a), __builtin_bit_cast(__m512bh, b));
  }
  // Pairs along a second axis: rows a and b (32 values each) -> lo = (a[c], b[c]) for
  // c in [0, 16), hi = the same for c in [16, 32).
  static void interleave(P a, P b, P& lo, P& hi) {
    const __m512i il = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                        8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i ih = _mm512_add_epi16(il, _mm512_set1_epi16(16));
    lo = _mm512_permutex2var_epi16(a, il, b);
    hi = _mm512_permutex2var_epi16(a, ih, b);
  }
  // 16 fp32 -> 16 bf16 at dst, round to nearest even.
  static void store_bf16(bf16_t* dst, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        __builtin_bit_cast(__m256i, _mm512_cvtneps_pbh(v)));
  }
};

}  // namespace ringattn::detail::cpu
