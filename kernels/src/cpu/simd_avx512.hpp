// Thin vector API, AVX-512 (F, BW, VL, DQ) flavour: 16 fp32 lanes. Include only from
// translation units compiled with the avx512 flags (files named *_avx512.cpp).
// Same functions as simd_avx2.hpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_math.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

struct SimdAvx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr const char* kName = "avx512";
  // Micro-kernel blocking: 8 rows x 2 vectors = 16 of the 32 zmm registers.
  static constexpr int kRows = 8;
  static constexpr int kVecs = 2;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const bf16_t* p) {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // kLanes e4m3 bytes -> fp32 values (exact, through fp16: see kFp8ViaHalfScale).
  static V load_fp8(const std::uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
    const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7);
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(sign, mag)),
                         _mm512_set1_ps(kFp8ViaHalfScale));
  }
  // kLanes e4m3 bytes -> fp32 values / 256 (exact; simd_math.hpp).
  static V widen_fp8(__m128i b) {
    const __m256i w = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                                       _mm256_set1_epi16(static_cast<short>(0xbfff)));
    return _mm512_cvtph_ps(w);
  }
  static V load(const fp8e4m3_t* p) {
    return widen_fp8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Loads the first n (< kLanes) elements, zero in the other lanes (masked load:
  // never touches memory past element n).
  static __mmask16 first_n(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(first_n(n), p); }
  static V load_partial(const bf16_t* p, int n) {
    return widen_bf16(_mm256_maskz_loadu_epi16(first_n(n), p));
  }
  static V load_partial(const f16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_n(n), p));
  }
  static V load_partial(const fp8e4m3_t* p, int n) {
    return widen_fp8(_mm_maskz_loadu_epi8(first_n(n), p));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  // Lanes [g G, (g + 1) G) of v to dst + g ld, for every group g < 16 / G.
  template <int G>
  static void store_groups(float* dst, std::int64_t ld, V v) {
    static_assert(G >= 1 && 16 % G == 0, "whole groups");
    if constexpr (G == 16) {
      _mm512_storeu_ps(dst, v);
    } else if constexpr (G == 8) {
      _mm256_storeu_ps(dst, _mm512_castps512_ps256(v));
      _mm256_storeu_ps(dst + ld, _mm512_extractf32x8_ps(v, 1));
    } else if constexpr (G == 4) {
      _mm_storeu_ps(dst, _mm512_castps512_ps128(v));
      _mm_storeu_ps(dst + ld, _mm512_extractf32x4_ps(v, 1));
      _mm_storeu_ps(dst + 2 * ld, _mm512_extractf32x4_ps(v, 2));
      _mm_storeu_ps(dst + 3 * ld, _mm512_extractf32x4_ps(v, 3));
    } else {
      alignas(64) float t[16];
      _mm512_store_ps(t, v);
      for (int g = 0; g < 16 / G; ++g)
        for (int i = 0; i < G; ++i) dst[g * ld + i] = t[g * G + i];
    }
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V abs(V a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
  static V copysign(V mag, V sgn) {
    const V s = _mm512_set1_ps(-0.0f);
    return _mm512_or_ps(_mm512_andnot_ps(s, mag), _mm512_and_ps(s, sgn));
  }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V select_lt(V a, V b, V x, V y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  static V round(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static V pow2i(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  // Transposed horizontal sum of kLanes vectors: lane i of the result = sum of the
  // lanes of v[i]. Four halving steps (unpack ps, unpack pd, two 128-bit chunk
  // shuffles), 15 shuffle pairs + adds for 16 dot products.
  // Lane 4k + j = the sum of w[j]'s four lanes in 128-bit chunk k, for j < 4.
  static V sum_chunks4(const V* w) {
    // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] for (a, b) = (w0, w1), (w2, w3)
    const V r1 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const V r2 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    return _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(r1), _mm512_castps_pd(r2))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(r1), _mm512_castps_pd(r2))));
  }
  // Chunks 0 + 1 and 2 + 3 of a and b: [a01, a23, b01, b23] (each 4 lanes).
  static V add_chunk_pairs(V a, V b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  static V reduce_add_lanes(const V* v) {
    V u[4];
    for (int i = 0; i < 4; ++i) u[i] = sum_chunks4(v + 4 * i);
    // Sum the four 128-bit chunks: chunk k of the result belongs to u[k].
    const V w01 = add_chunk_pairs(u[0], u[1]);
    const V w23 = add_chunk_pairs(u[2], u[3]);
    return add_chunk_pairs(w01, w23);
  }
  // v[0 .. 15], each holding two partial sums, one per 256-bit half: out[i] lanes [0, 4)
  // = the low-half sums of v[8i .. 8i + 3], [4, 8) their high-half sums, [8, 12) and
  // [12, 16) the same of v[8i + 4 .. 8i + 7]. One level fewer than reduce_add_lanes.
  static void reduce_add_halves(const V* v, V out[2]) {
    V u[4];
    for (int i = 0; i < 4; ++i) u[i] = sum_chunks4(v + 4 * i);
    out[0] = add_chunk_pairs(u[0], u[1]);
    out[1] = add_chunk_pairs(u[2], u[3]);
  }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static V exp(V x) { return simd_exp<SimdAvx512>(x); }
  static V tanh(V x) { return simd_tanh<SimdAvx512>(x); }
};

}  // namespace ringattn::detail::cpu
