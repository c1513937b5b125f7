// Storage dtypes and scalar conversions. Accumulation is always fp32 (or fp64 in
// the test reference); these types describe how tensors sit in memory.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>

#include "ringattn/error.hpp"

namespace ringattn {

enum class DType : std::uint8_t {
  kF32,      // IEEE binary32
  kBF16,     // bfloat16 (upper half of binary32), round-to-nearest-even on store
  kF16,      // IEEE binary16
  kFP8E4M3,  // OCP fp8 e4m3fn (bias 7, max 448, no inf, 0x7f/0xff = NaN): MLA, q/k/v
};

inline constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kFP8E4M3:
      return 1;
  }
  return 0;
}

inline constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kFP8E4M3:
      return "fp8";
  }
  return "?";
}

// Parses "fp32" | "bf16" | "fp16" | "fp8" (also "float32", "bfloat16", "float16", "e4m3").
inline DType parse_dtype(std::string_view s, std::string_view what = "dtype") {
  if (s == "fp32" || s == "float32" || s == "f32") return DType::kF32;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  if (s == "fp16" || s == "float16" || s == "f16") return DType::kF16;
  if (s == "fp8" || s == "e4m3" || s == "fp8_e4m3") return DType::kFP8E4M3;
  RA_THROW(InvalidArgument,
           what << ": unknown dtype '" << s << "' (expected fp32, bf16, fp16 or fp8)");
}

// ---- scalar conversions (SIMD paths have their own vector versions) ----

struct bf16_t {
  std::uint16_t bits;
};
struct f16_t {
  std::uint16_t bits;
};
struct fp8e4m3_t {
  std::uint8_t bits;
};

inline float bf16_to_f32(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                         // round to nearest even
  return static_cast<std::uint16_t>(u >> 16);
}

inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline std::uint16_t f32_to_f16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in fp16
    // value = abs_f * 2^24 rounded to nearest even, in units of 2^-24
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // 2^24
    const auto r = static_cast<std::uint16_t>(std::nearbyint(scaled));
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t exp = (abs >> 23) - 127 + 15;
  std::uint32_t man = abs & 0x7fffffu;
  std::uint32_t h = (exp << 10) | (man >> 13);
  const std::uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // nearest even (may carry into exp)
  return static_cast<std::uint16_t>(sign | h);
}

// fp8 e4m3fn -> fp32 (exact).
inline float fp8e4m3_to_f32(std::uint8_t b) {
  const float sign = (b & 0x80u) ? -1.0f : 1.0f;
  const int exp = (b >> 3) & 0xf;
  const int man = b & 0x7;
  if (exp == 0xf && man == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  return sign * std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
}

// fp32 -> fp8 e4m3fn, round to nearest even, saturating to +-448 (NaN stays NaN).
inline std::uint8_t f32_to_fp8e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const std::uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  float a = std::fabs(f);
  if (a >= 448.0f) return static_cast<std::uint8_t>(sign | 0x7e);
  if (a == 0.0f) return sign;
  // Find the nearest representable value by scanning exponent bands (values are few).
  int e;
  std::frexp(a, &e);    // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1 + 7;  // biased exponent for 1.xxx form
  if (exp < 1) {        // subnormal range: step 2^-9
    const float q = std::nearbyint(a * 512.0f);
    if (q >= 8.0f) return static_cast<std::uint8_t>(sign | 0x08);  // rounds up to min normal
    return static_cast<std::uint8_t>(sign | static_cast<std::uint8_t>(q));
  }
  const float step = std::ldexp(1.0f, exp - 7 - 3);
  float q = std::nearbyint(a / step);  // in [8, 16]
  if (q >= 16.0f) {
    q = 8.0f;
    ++exp;
  }
  if (exp > 15 || (exp == 15 && q > 14.0f)) return static_cast<std::uint8_t>(sign | 0x7e);
  return static_cast<std::uint8_t>(sign | (exp << 3) | (static_cast<int>(q) - 8));
}

// Loads element i of a tensor of storage type t as fp32 (slow path for references
// and validation; kernels use vector loads).
inline float load_as_f32(const void* base, std::int64_t i, DType t) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(base)[i];
    case DType::kBF16:
      return bf16_to_f32(static_cast<const std::uint16_t*>(base)[i]);
    case DType::kF16:
      return f16_to_f32(static_cast<const std::uint16_t*>(base)[i]);
    case DType::kFP8E4M3:
      return fp8e4m3_to_f32(static_cast<const std::uint8_t*>(base)[i]);
  }
  return 0.0f;
}

inline void store_from_f32(void* base, std::int64_t i, DType t, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(base)[i] = v;
      break;
    case DType::kBF16:
      static_cast<std::uint16_t*>(base)[i] = f32_to_bf16(v);
      break;
    case DType::kF16:
      static_cast<std::uint16_t*>(base)[i] = f32_to_f16(v);
      break;
    case DType::kFP8E4M3:
      static_cast<std::uint8_t*>(base)[i] = f32_to_fp8e4m3(v);
      break;
  }
}

}  // namespace ringattn
