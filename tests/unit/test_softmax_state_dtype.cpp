// SoftmaxState merge rules (docs/semantics.md section 5) and scalar dtype conversions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "ringattn/dtype.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(SoftmaxState, EmptyMergesAsIdentity) {
  SoftmaxState a, b;
  const auto s = a.merge(b);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(s.self, 0.0f);
  EXPECT_EQ(s.other, 0.0f);
  EXPECT_EQ(a.lse(), -kInf);
  EXPECT_EQ(a.inv_sum(), 0.0f);
}

TEST(SoftmaxState, PlusInfLseIsEmpty) {
  EXPECT_TRUE(SoftmaxState::from_lse(kInf).empty());
  EXPECT_TRUE(SoftmaxState::from_lse(-kInf).empty());
  SoftmaxState a = SoftmaxState::from_lse(1.5f);
  const auto s = a.merge(SoftmaxState::from_lse(kInf));
  EXPECT_FLOAT_EQ(a.lse(), 1.5f);
  EXPECT_EQ(s.self, 1.0f);
  EXPECT_EQ(s.other, 0.0f);
}

TEST(SoftmaxState, MergeMatchesLogSumExp) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-30.0f, 30.0f);
  for (int t = 0; t < 100; ++t) {
    const float la = u(rng), lb = u(rng);
    SoftmaxState a = SoftmaxState::from_lse(la);
    a.merge(SoftmaxState::from_lse(lb));
    const double ref =
        std::log(std::exp(static_cast<double>(la)) + std::exp(static_cast<double>(lb)));
    EXPECT_NEAR(a.lse(), ref, 1e-5 * std::max(1.0, std::fabs(ref)));
  }
}

TEST(Dtype, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even -> 1.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256.0f)), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
}

TEST(Dtype, F16RoundTripAllFiniteValues) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = f16_to_f32(bits);
    if (std::isnan(f)) continue;
    EXPECT_EQ(f32_to_f16(f), bits) << "bits " << h;
  }
  EXPECT_EQ(f16_to_f32(f32_to_f16(65504.0f)), 65504.0f);
  EXPECT_EQ(f16_to_f32(f32_to_f16(1e6f)), kInf);
}

TEST(Dtype, Fp8E4m3RoundTripAllValues) {
  for (int b = 0; b < 256; ++b) {
    const float f = fp8e4m3_to_f32(static_cast<std::uint8_t>(b));
    if (std::isnan(f)) continue;
    const std::uint8_t back = f32_to_fp8e4m3(f);
    if (f == 0.0f) {
      EXPECT_EQ(fp8e4m3_to_f32(back), 0.0f);
      continue;
    }
    EXPECT_EQ(back, b) << "value " << f;
  }
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(f32_to_fp8e4m3(1000.0f)), 448.0f);
}

}  // namespace
}  // namespace ringattn
