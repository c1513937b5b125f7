// Thin vector API of the fp8 decode engine (decode_fp8_dpbf16.hpp): the AVX512-BF16
// vocabulary (SimdAvx512Bf16) plus the exact e4m3 -> bf16 conversion, which looks the
// bytes up with vpermi2b (AVX512_VBMI). Include only from translation units compiled with
// the avx512, avx512bf16 and avx512vbmi flags (files named *_avx512_bf16_vbmi.cpp); every
// CPU with AVX512_BF16 except Cooper Lake has VBMI, and cpu_backend.cpp runs this path
// only where CPUID reports it.
#pragma once

#include <immintrin.h>

#include <array>
#include <cstdint>

#include "cpu/simd_avx512_bf16.hpp"
#include "ringattn/dtype.hpp"

namespace ringattn::detail::cpu {

struct SimdAvx512Bf16Vbmi : SimdAvx512Bf16 {
  using Bytes = __m512i;  // 64 e4m3 bytes
  using SimdAvx512Bf16::bcast_pair;
  // The pair at p (32 bits) in every lane.
  static P bcast_pair(const std::uint32_t* p) { return _mm512_set1_epi32(static_cast<int>(*p)); }

  // ---- fp8 e4m3 -> bf16 (exact) ----
  //
  // Every e4m3 value, subnormals included, is a bf16 value (3 mantissa bits, exponents
  // 2^-9 .. 2^8), and so is value / 256, which is what these conversions return (the
  // 256 of the kernels' e4m3 loads, simd_math.hpp kFp8ViaHalfScale; the smallest
  // subnormal becomes 2^-17, a normal bf16, so vdpbf16ps never sees a denormal). The two
  // bytes of the bf16 are looked up by the 7-bit magnitude in two 128-entry byte tables
  // (vpermi2b: 7 index bits over two 64-byte registers) and the sign bit is or-ed into
  // the high byte; unpacking the low and high bytes gives the 16-bit values. 64 values
  // cost 2 lookups, 1 ternary-logic or and 2 unpacks. The NaN codes 0x7f / 0xff give
  // +-480 (as the fp32 loads of simd_avx512.hpp).
  struct Fp8Tables {
    __m512i lo0, lo1, hi0, hi1;  // bytes of bf16(value(m) / 256), m = 0..63 and 64..127
  };
  static constexpr std::uint16_t fp8_bf16_bits(unsigned m) {  // magnitude m < 128
    const unsigned e = m >> 3, f = m & 7u;
    if (e > 0) return static_cast<std::uint16_t>(((e + 112u) << 7) | (f << 4));  // 2^(e-15)
    if (f == 0) return 0;
    const unsigned k = f >= 4 ? 2u : f >= 2 ? 1u : 0u;  // f = 2^k (1 + r): value f * 2^-17
    return static_cast<std::uint16_t>(((110u + k) << 7) | ((f - (1u << k)) << (7u - k)));
  }
  struct Fp8TableBytes {
    alignas(64) std::uint8_t lo[128], hi[128];
  };
  static constexpr Fp8TableBytes fp8_table_bytes() {
    Fp8TableBytes t{};
    for (unsigned m = 0; m < 128; ++m) {
      t.lo[m] = static_cast<std::uint8_t>(fp8_bf16_bits(m) & 0xffu);
      t.hi[m] = static_cast<std::uint8_t>(fp8_bf16_bits(m) >> 8);
    }
    return t;
  }
  static Fp8Tables fp8_tables() {
    static constexpr Fp8TableBytes kBytes = fp8_table_bytes();
    return {_mm512_load_si512(kBytes.lo), _mm512_load_si512(kBytes.lo + 64),
            _mm512_load_si512(kBytes.hi), _mm512_load_si512(kBytes.hi + 64)};
  }
  // 64 e4m3 bytes (n of them, n <= 64; the other bytes read as 0 and never touched).
  static __m512i load_fp8_bytes(const fp8e4m3_t* p) { return _mm512_loadu_si512(p); }
  static __m512i load_fp8_bytes(const fp8e4m3_t* p, int n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, p);
  }
  // 32 e4m3 bytes of a in the low 256 bits, 32 of b in the high (n of each, n <= 32; the
  // other bytes read as 0): fp8_to_bf16 then keeps a's values in the low halves of its
  // two pair vectors and b's in the high halves.
  static __m512i load_fp8_halves(const fp8e4m3_t* a, const fp8e4m3_t* b) {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
  }
  static __m512i load_fp8_halves(const fp8e4m3_t* a, const fp8e4m3_t* b, int n) {
    const __mmask32 m = n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(m, a)),
                              _mm256_maskz_loadu_epi8(m, b), 1);
  }
  // The bf16 bytes of the 64 e4m3 bytes x: low bytes into lo, high bytes (sign included)
  // into hi, element by element.
  static void fp8_bf16_bytes(const Fp8Tables& t, __m512i x, __m512i& lo, __m512i& hi) {
    lo = _mm512_permutex2var_epi8(t.lo0, x, t.lo1);
    const __m512i h = _mm512_permutex2var_epi8(t.hi0, x, t.hi1);
    hi = _mm512_ternarylogic_epi32(h, x, _mm512_set1_epi8(static_cast<char>(0x80)),
                                   0xf8);  // h | (x & c)
  }
  // 64 e4m3 values x[0..63] -> two pair vectors (32 bf16 each) in unpack order: 128-bit
  // lane l of a holds x[16 l .. 16 l + 7], of b x[16 l + 8 .. 16 l + 15]. A dot product
  // is the same in any order, so a q row and a K row converted alike match.
  static void fp8_to_bf16(const Fp8Tables& t, __m512i x, P& a, P& b) {
    __m512i lo, hi;
    fp8_bf16_bytes(t, x, lo, hi);
    a = _mm512_unpacklo_epi8(lo, hi);
    b = _mm512_unpackhi_epi8(lo, hi);
  }
  // Two rows of 64 e4m3 values (x, y) -> four pair vectors, out[i] = the pairs
  // (x[c], y[c]) for c = 16 i .. 16 i + 15 in order: the pair layout of a dot product over
  // two keys (x the even key). A byte permute first interleaves x and y so that the
  // unpacks of fp8_to_bf16 land the columns in order: byte 2t + u of 128-bit lane l of
  // the first interleave is column 4 l + t of row u (t < 4), byte 8 + 2t + u column
  // 16 + 4 l + t; the second interleave the same 32 columns further.
  static void fp8_pairs(const Fp8Tables& t, __m512i x, __m512i y, P out[4]) {
    alignas(64) static constexpr std::array<std::uint8_t, 128> kIdx = [] {
      std::array<std::uint8_t, 128> idx{};
      for (int half = 0; half < 2; ++half)
        for (int l = 0; l < 4; ++l)
          for (int pos = 0; pos < 16; ++pos) {
            const int t4 = (pos & 7) >> 1, u = pos & 1;
            const int col = 32 * half + (pos < 8 ? 0 : 16) + 4 * l + t4;
            idx[static_cast<std::size_t>(64 * half + 16 * l + pos)] =
                static_cast<std::uint8_t>(64 * u + col);
          }
      return idx;
    }();
    const __m512i i0 = _mm512_load_si512(kIdx.data());
    const __m512i i1 = _mm512_load_si512(kIdx.data() + 64);
    fp8_to_bf16(t, _mm512_permutex2var_epi8(x, i0, y), out[0], out[1]);
    fp8_to_bf16(t, _mm512_permutex2var_epi8(x, i1, y), out[2], out[3]);
  }
};

}  // namespace ringattn::detail::cpu
