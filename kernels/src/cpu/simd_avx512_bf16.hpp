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
  static void store_pairs(bf16_t* p, P v) { _mm512_storeu_si512(p, v); }
  // The pair vector (lo[i], hi[i]) of two fp32 vectors, each rounded to nearest even.
  static P pack_pairs(V lo, V hi) {
    // cvtne2ps puts bf16(lo) in elements 0..15 and bf16(hi) in 16..31; the permute
    // interleaves them: element 2i <- i, 2i + 1 <- 16 + i.
    const __m512i x = __builtin_bit_cast(__m512i, _mm512_cvtne2ps_pbh(hi, lo));
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, x);
  }
  // dst[2c] = a[c], dst[2c + 1] = b[c] for c < 32: two rows of 32 bf16 -> 32 pairs
  // (two pair vectors), the pair layout of a reduction over the row index.
  static void interleave_rows(const bf16_t* a, const bf16_t* b, bf16_t* dst) {
    const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                        8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(va, hi, vb));
  }
  // dst pair (j, i) = src pair (i, j) for i, j < 16: a 16 x 16 transpose of pairs (32-bit
  // lanes), rows lds / ldd pairs apart. Two unpack stages transpose the 4 x 4 blocks
  // inside each 128-bit lane (r[4g + k], lane c = column 4c + k of rows 4g .. 4g + 3), two
  // 128-bit shuffle stages gather the four lanes of an output row.
  static void transpose_pairs16(const bf16_t* src, std::int64_t lds, bf16_t* dst,
                                std::int64_t ldd) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + 2 * i * lds);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; ++k) {
      const __m512i a_lo = _mm512_shuffle_i32x4(r[k], r[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i a_hi = _mm512_shuffle_i32x4(r[k], r[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i b_lo = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i b_hi = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(3, 2, 3, 2));
      _mm512_storeu_si512(dst + 2 * k * ldd,
                          _mm512_shuffle_i32x4(a_lo, b_lo, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_si512(dst + 2 * (4 + k) * ldd,
                          _mm512_shuffle_i32x4(a_lo, b_lo, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm512_storeu_si512(dst + 2 * (8 + k) * ldd,
                          _mm512_shuffle_i32x4(a_hi, b_hi, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_si512(dst + 2 * (12 + k) * ldd,
                          _mm512_shuffle_i32x4(a_hi, b_hi, _MM_SHUFFLE(3, 1, 3, 1)));
    }
  }
  // 16 fp32 -> 16 bf16 at dst, round to nearest even.
  static void store_bf16(bf16_t* dst, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        __builtin_bit_cast(__m256i, _mm512_cvtneps_pbh(v)));
  }
};

}  // namespace ringattn::detail::cpu
