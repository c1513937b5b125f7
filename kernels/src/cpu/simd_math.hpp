// Transcendentals written once over the thin vector API (S = SimdAvx2, SimdAvx512,
// SimdScalar): the functions below only call S's primitives.
#pragma once

#include <cstdint>

namespace ringattn::detail::cpu {

// fp8 e4m3 byte -> fp32 through fp16 (load_fp8 of the vector structs): the byte's bits
// shifted into an fp16 are the same number times 2^-8 (bias 15 instead of 7,
// subnormals included), so value = half(((b & 0x80) << 8) | ((b & 0x7f) << 7)) * 256
// exactly. (0x7f / 0xff, the e4m3 NaN codes, decode to +-480; NaN never appears in
// quantised data.)
//
// The attention kernels (FlashFwd<S, fp8e4m3_t>, flash_fwd_tile.hpp) load e4m3 q/k/v
// with S::load(const fp8e4m3_t*), which stops at the fp16 conversion: it returns
// value / 256. The kernel folds the 256 into its per-head descale factors (256 * 256
// for q . k into the score scale, 256 for V into the output factor), so the inner
// loops pay no multiply. In 16-bit lanes the bits are formed as
//   w = (int16(int8(b)) << 7) & 0xbfff
// (sign extension puts the sign in bits 14 and 15 after the shift; the mask keeps
// bit 15), which equals ((b & 0x80) << 8) | ((b & 0x7f) << 7).
inline constexpr float kFp8ViaHalfScale = 256.0f;

// fp16 bits of e4m3 byte b (value / 256), the scalar form of the rule above.
inline std::uint16_t fp8_half_bits(std::uint8_t b) {
  return static_cast<std::uint16_t>(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
}

// exp(x) = 2^n * e^r with n = round(x * log2(e)) and r = x - n * ln(2) (Cody-Waite
// split of ln(2)); e^r on |r| <= ln(2)/2 by the degree-7 polynomial of Cephes expf
// (about 1 ulp). x below -87.34 (the smallest normal result), -inf included, gives
// exactly 0, so masked scores never leave a residue.
template <class S>
typename S::V simd_exp(typename S::V x) {
  using V = typename S::V;
  const V lo = S::set1(-87.33654f);
  const V xc = S::min(S::max(x, lo), S::set1(88.0f));
  const V n = S::round(S::mul(xc, S::set1(1.44269504088896341f)));
  V r = S::fma(n, S::set1(-0.693359375f), xc);
  r = S::fma(n, S::set1(2.12194440e-4f), r);
  V y = S::set1(1.9875691500e-4f);
  y = S::fma(y, r, S::set1(1.3981999507e-3f));
  y = S::fma(y, r, S::set1(8.3334519073e-3f));
  y = S::fma(y, r, S::set1(4.1665795894e-2f));
  y = S::fma(y, r, S::set1(1.6666665459e-1f));
  y = S::fma(y, r, S::set1(5.0000001201e-1f));
  y = S::fma(y, S::mul(r, r), S::add(r, S::set1(1.0f)));
  y = S::mul(y, S::pow2i(n));
  return S::select_lt(x, lo, S::zero(), y);
}

// tanh(x): for |x| < 0.625 the odd polynomial of Cephes tanhf (no cancellation near
// 0), otherwise sign(x) * (1 - 2 / (exp(2|x|) + 1)).
template <class S>
typename S::V simd_tanh(typename S::V x) {
  using V = typename S::V;
  const V ax = S::abs(x);
  const V z = S::mul(x, x);
  V p = S::set1(-5.70498872745e-3f);
  p = S::fma(p, z, S::set1(2.06390887954e-2f));
  p = S::fma(p, z, S::set1(-5.37397155531e-2f));
  p = S::fma(p, z, S::set1(1.33314422036e-1f));
  p = S::fma(p, z, S::set1(-3.33332819422e-1f));
  const V small = S::fma(S::mul(p, z), x, x);
  const V e = simd_exp<S>(S::add(ax, ax));
  const V one = S::set1(1.0f);
  const V large = S::copysign(S::sub(one, S::div(S::set1(2.0f), S::add(e, one))), x);
  return S::select_lt(ax, S::set1(0.625f), small, large);
}

}  // namespace ringattn::detail::cpu
