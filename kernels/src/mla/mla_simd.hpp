// Thin 8-lane fp32 vector API used by the MLA tile operations (mla_ops_impl.hpp).
// MlaVecGeneric is plain C++ (the compiler vectorises what it can); MlaVecAvx2 is
// AVX2 + FMA + F16C and only exists in translation units built with those flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

#include "ringattn/dtype.hpp"

namespace ringattn::detail::mla {

// fp8 e4m3 byte -> fp32 through fp16: the byte's bits shifted into an fp16 are the
// same number times 2^-8 (bias 15 instead of 7, subnormals included), so
// value = half(((b & 0x80) << 8) | ((b & 0x7f) << 7)) * 256 exactly. (0x7f / 0xff,
// the e4m3 NaN codes, decode to +-480; NaN never appears in quantised data.)
inline constexpr float kFp8ViaHalfScale = 256.0f;

struct MlaVecGeneric {
  static constexpr int kLanes = 8;
  struct V {
    float x[8];
  };
  static V zero() { return set1(0.0f); }
  static V set1(float a) {
    V v;
    for (float& e : v.x) e = a;
    return v;
  }
  static V load(const float* p) {
    V v;
    std::memcpy(v.x, p, sizeof v.x);
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, v.x, sizeof v.x); }
  static V load_bf16(const std::uint8_t* p) {
    V v;
    for (int i = 0; i < 8; ++i) {
      std::uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      v.x[i] = bf16_to_f32(h);
    }
    return v;
  }
  // 8 e4m3 bytes -> fp32 values (exact).
  static V load_fp8(const std::uint8_t* p) {
    V v;
    for (int i = 0; i < 8; ++i) v.x[i] = fp8e4m3_to_f32(p[i]);
    return v;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < 8; ++i) c.x[i] += a.x[i] * b.x[i];
    return c;
  }
  static V mul(V a, V b) {
    for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
    return a;
  }
  static V max(V a, V b) {
    for (int i = 0; i < 8; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
    return a;
  }
  static V add(V a, V b) {
    for (int i = 0; i < 8; ++i) a.x[i] += b.x[i];
    return a;
  }
  static float reduce_add(V v) {
    float s = 0.0f;
    for (float e : v.x) s += e;
    return s;
  }
  static float reduce_max(V v) {
    float s = v.x[0];
    for (float e : v.x) s = e > s ? e : s;
    return s;
  }
  // exp(x - m) with exp(-inf) = 0.
  static V exp_sub(V x, float m) {
    for (float& e : x.x) e = std::exp(e - m);
    return x;
  }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct MlaVecAvx2 {
  static constexpr int kLanes = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load_bf16(const std::uint8_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load_fp8(const std::uint8_t* p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
    const __m128i mag = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7);
    const __m256 h = _mm256_cvtph_ps(_mm_or_si128(sign, mag));
    return _mm256_mul_ps(h, _mm256_set1_ps(kFp8ViaHalfScale));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float reduce_add(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float reduce_max(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // exp(x - m), Cephes-style: 2^n * p(r) with r = y - n ln2 in [-ln2/2, ln2/2],
  // degree-6 polynomial (about 1 ulp); inputs below -87.3 (including -inf) give 0.
  static V exp_sub(V x, float m) {
    const V y0 = _mm256_sub_ps(x, _mm256_set1_ps(m));
    const V tiny = _mm256_cmp_ps(y0, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    const V y = _mm256_max_ps(_mm256_min_ps(y0, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const V n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(tiny, res);
  }
};
#endif

}  // namespace ringattn::detail::mla
