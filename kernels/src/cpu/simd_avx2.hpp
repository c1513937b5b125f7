// Thin vector API, AVX2 + FMA + F16C flavour (8 fp32 lanes). Include only from
// translation units compiled with -mavx2 -mfma -mf16c (files named *_avx2.cpp).
// simd_scalar.hpp and simd_avx512.hpp define the same functions, so kernel bodies
// (flash_fwd_tile.hpp) are written once as templates over this struct.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_math.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

struct SimdAvx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx2";
  // Register blocking of the GEMM micro-kernels: kRows rows x kVecs vectors of
  // accumulators (6 x 2 = 12 of the 16 ymm registers, 2 for B, 1 for the broadcast).
  static constexpr int kRows = 6;
  static constexpr int kVecs = 2;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const f16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // kLanes e4m3 bytes (low half of `b`) -> fp32 values / 256 (exact; simd_math.hpp).
  static V widen_fp8(__m128i b) {
    const __m128i w = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7),
                                    _mm_set1_epi16(static_cast<short>(0xbfff)));
    return _mm256_cvtph_ps(w);
  }
  static V load(const fp8e4m3_t* p) {
    return widen_fp8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  // kLanes e4m3 bytes -> fp32 values (exact, through fp16: see kFp8ViaHalfScale).
  static V load_fp8(const std::uint8_t* p) {
    return _mm256_mul_ps(load(reinterpret_cast<const fp8e4m3_t*>(p)),
                         _mm256_set1_ps(kFp8ViaHalfScale));
  }
  // Loads the first n (< kLanes) elements, zero in the other lanes.
  template <class T>
  static V load_partial(const T* p, int n) {
    alignas(32) T buf[kLanes] = {};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return load(buf);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static V copysign(V mag, V sgn) {
    const V s = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sgn));
  }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  // a < b ? x : y
  static V select_lt(V a, V b, V x, V y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral-valued n in [-126, 127].
  static V pow2i(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static float reduce_add(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Transposed horizontal sum of kLanes vectors: lane i of the result = sum of the
  // lanes of v[i]. A tree of hadd steps: 8 dot products cost 7 shuffles + adds
  // instead of 8 separate reduce_add chains.
  static V reduce_add_lanes(const V* v) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // ab = [sum4 low halves of v0..v3 | sum4 high halves of v0..v3], cd likewise.
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                         _mm256_permute2f128_ps(ab, cd, 0x31));
  }
  static float reduce_max(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V exp(V x) { return simd_exp<SimdAvx2>(x); }
  static V tanh(V x) { return simd_tanh<SimdAvx2>(x); }
};

}  // namespace ringattn::detail::cpu
