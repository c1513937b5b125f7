// Split-KV (docs/semantics.md section 3): the number of key splits, and a plan from
// Engine::plan_kvcache, change speed only. Every split count must match the
// float64 reference (pt rule) and the unsplit call to rounding, on every backend,
// including more splits than keys and sequences with no keys at all.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "reference_f64.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/engine.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

std::vector<KvCase> split_cases() {
  std::vector<KvCase> cs;
  {
    KvCase c;
    c.name = "decode_paged16_bf16";
    c.dtype = c.out_dtype = DType::kBF16;
    c.h = 6;
    c.h_k = 1;
    c.d = c.d_v = 64;
    c.s_q = 1;
    c.s_new = 1;
    c.seqlens = {900, 3, 0, 257};
    c.page_size = 16;
    cs.push_back(c);
  }
  {
    KvCase c;
    c.name = "causal_dense_fp32";
    c.h = 6;
    c.h_k = 2;
    c.d = c.d_v = 32;
    c.s_q = 4;
    c.s_new = 4;
    c.seqlens = {600, 17};
    c.leftpad = {10, 0};
    c.causal = true;
    cs.push_back(c);
  }
  {
    KvCase c;
    c.name = "local_softcap_fp16";
    c.dtype = c.out_dtype = DType::kF16;
    c.h = 6;
    c.h_k = 6;
    c.d = c.d_v = 32;
    c.s_q = 2;
    c.seqlens = {1500, 40};
    c.page_size = 64;
    c.causal = true;
    c.window_left = 300;
    c.softcap = 15.0f;
    cs.push_back(c);
  }
  {
    // The sink is applied once, after the split merge: every split count and plan
    // must agree with the reference.
    KvCase c;
    c.name = "sinks_decode_fp32";
    c.h = 8;
    c.h_k = 2;
    c.d = c.d_v = 32;
    c.s_q = 2;
    c.s_new = 1;
    c.seqlens = {1200, 5, 0};
    c.page_size = 32;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
  }
  return cs;
}

class SplitKv : public ::testing::TestWithParam<std::tuple<KvCase, std::string>> {};

TEST_P(SplitKv, AnySplitCountAndPlanGiveTheSameResult) {
  const auto& [c, backend] = GetParam();
  KvProblem pr = make_kv_problem(c);
  const RefResult ref = reference_kvcache(pr.p, RefPrecision::kF64);
  const RefResult low = reference_kvcache(pr.p, RefPrecision::kF32);
  Engine engine(EngineOptions{backend, 0});
  const int b = pr.p.b;
  const std::vector<std::int64_t> out_dims{b, c.s_q, c.h, c.d_v};
  const std::vector<std::int64_t> lse_dims{b, c.h, c.s_q};

  // Plan: one entry per sequence, each >= 1.
  const SchedulerMetadata plan = engine.plan_kvcache(pr.p);
  EXPECT_EQ(plan.b, b);
  ASSERT_EQ(plan.num_splits.size(), static_cast<std::size_t>(b));
  for (std::int32_t s : plan.num_splits) EXPECT_GE(s, 1);

  // Repeated calls append the same rows at the same positions, so the caches and
  // the results stay the same from call to call.
  std::vector<double> base_out, base_lse;
  for (const int splits : {1, 2, 3, 7, 64, 0, -1}) {  // -1: use the plan
    KvCacheParams p = pr.p;
    p.num_splits = splits < 0 ? 0 : splits;
    p.plan = splits < 0 ? &plan : nullptr;
    pr.out.poison();
    poison(pr.lse);
    engine.forward_kvcache(p);
    const std::string tag = c.name + (splits < 0 ? " plan" : " splits=" + std::to_string(splits));
    const std::vector<double> out = pr.out.to_double();
    const std::vector<double> lse(pr.lse.begin(), pr.lse.end());
    EXPECT_TRUE(check_pt_rule(tag + " out", out, ref.out, low.out, out_dims, c.out_dtype,
                              p_rounding_atol(backend, pr)));
    EXPECT_TRUE(check_lse(tag + " lse", lse, ref.lse, lse_dims));
    if (splits == 1) {
      base_out = out;
      base_lse = lse;
    } else {
      // Splits round P against their own running max: the P rounding bound twice.
      EXPECT_TRUE(check_same_to_rounding(
          tag + " vs splits=1 (out)", out, base_out, out_dims,
          same_to_rounding_rtol(c.out_dtype) + 2.0 * p_rounding_atol(backend, pr)));
      EXPECT_TRUE(
          check_same_to_rounding(tag + " vs splits=1 (lse)", lse, base_lse, lse_dims, 1e-5));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, SplitKv,
                         ::testing::Combine(::testing::ValuesIn(split_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// Dense forward: num_splits is a hint too.
class SplitKvDense : public ::testing::TestWithParam<std::string> {};

TEST_P(SplitKvDense, DenseForwardSplitsAgree) {
  const int b = 2, s_q = 3, s_k = 700, h = 6, h_k = 2, d = 64;
  std::mt19937_64 rng(case_seed("split_dense"));
  Tensor q = make_tensor(DType::kF32, {b, s_q, h, d});
  Tensor k = make_tensor(DType::kF32, {b, s_k, h_k, d});
  Tensor v = make_tensor(DType::kF32, {b, s_k, h_k, d});
  Tensor out = make_tensor(DType::kF32, {b, s_q, h, d});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  std::vector<float> lse(static_cast<std::size_t>(b) * h * s_q);
  FwdParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  set_strides(p, q, k, v, out);
  p.b = b;
  p.s_q = s_q;
  p.s_k = s_k;
  p.h = h;
  p.h_k = h_k;
  p.d = p.d_v = d;
  p.mask.causal = true;
  p.mask.window_left = 400;
  const RefResult ref = reference_forward(p, RefPrecision::kF64);
  const RefResult low = reference_forward(p, RefPrecision::kF32);
  Engine engine(EngineOptions{GetParam(), 0});
  std::vector<double> base;
  for (const int splits : {1, 4, 0}) {
    p.num_splits = splits;
    out.poison();
    poison(lse);
    engine.forward(p);
    const std::string tag = "dense splits=" + std::to_string(splits);
    const std::vector<double> o = out.to_double();
    EXPECT_TRUE(check_pt_rule(tag, o, ref.out, low.out, {b, s_q, h, d}, DType::kF32));
    EXPECT_TRUE(check_lse(tag + " lse", {lse.begin(), lse.end()}, ref.lse, {b, h, s_q}));
    if (base.empty()) {
      base = o;
    } else {
      EXPECT_TRUE(check_same_to_rounding(tag + " vs 1", o, base, {b, s_q, h, d}, 2e-5));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, SplitKvDense, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

}  // namespace
}  // namespace ringattn::test
