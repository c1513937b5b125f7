// Varlen forward (docs/semantics.md section 2) against the float64 reference on every
// backend: packed segments of different lengths, segments with s_k = 0 (and
// s_q = 0), seqused_q / seqused_k, all mask variants, GQA/MQA, padded strides.
#include <gtest/gtest.h>

#include <algorithm>
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

struct VarlenCase {
  std::string name;
  DType dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  int h = 6, h_k = 6, d = 64, d_v = 64;
  std::vector<int> len_q, len_k;          // segment lengths in the packed tensors
  std::vector<int> seqused_q, seqused_k;  // empty = not set
  bool causal = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.0f;
  std::int64_t pad = 0;
  std::vector<std::int64_t> mask_shift;                // [b] or empty
  std::vector<float> sinks;                            // [h] or empty
  int chunk = 0;                                       // attention_chunk (0 = off)
  std::vector<std::int64_t> chunk_q_pos, chunk_k_pos;  // [b] or empty
  int chunk_stride = 1;
};

std::ostream& operator<<(std::ostream& os, const VarlenCase& c) { return os << c.name; }

VarlenCase base(const std::string& name, DType dt, int h, int h_k, int d, int d_v,
                std::vector<int> lq, std::vector<int> lk) {
  VarlenCase c;
  c.name = name + "_" + dtype_name(dt);
  c.dtype = dt;
  c.out_dtype = dt;
  c.h = h;
  c.h_k = h_k;
  c.d = d;
  c.d_v = d_v;
  c.len_q = std::move(lq);
  c.len_k = std::move(lk);
  return c;
}

std::vector<VarlenCase> varlen_cases() {
  std::vector<VarlenCase> cs;
  cs.push_back(base("full_mha", DType::kF32, 6, 6, 64, 64, {5, 17, 1, 33}, {9, 0, 40, 33}));
  {
    auto c = base("causal_gqa", DType::kBF16, 6, 2, 64, 64, {64, 3, 20, 7}, {128, 3, 0, 2});
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = base("local_mqa", DType::kF16, 6, 1, 128, 128, {113, 1, 70}, {203, 50, 10});
    c.causal = true;
    c.window_left = 23;
    cs.push_back(c);
  }
  {
    auto c = base("window_gqa", DType::kF32, 6, 2, 96, 96, {40, 0, 31}, {41, 12, 80});
    c.window_left = 5;
    c.window_right = 11;
    cs.push_back(c);
  }
  {
    auto c = base("softcap_d192", DType::kBF16, 6, 2, 192, 128, {21, 47}, {0, 90});
    c.softcap = 15.0f;
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = base("causal_d256", DType::kF16, 6, 6, 256, 256, {16, 9}, {16, 30});
    c.causal = true;
    cs.push_back(c);
  }
  {
    // seqused shortens segments: rows past seqused_q are not checked, keys past
    // seqused_k must not be seen; seqused_k = 0 gives empty rows.
    auto c = base("seqused", DType::kF32, 6, 2, 64, 64, {30, 20, 25, 8}, {40, 30, 12, 8});
    c.seqused_q = {30, 10, 0, 8};
    c.seqused_k = {17, 0, 12, 3};
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = base("seqused_full", DType::kBF16, 6, 1, 64, 64, {12, 50}, {64, 70});
    c.seqused_q = {12, 33};
    c.seqused_k = {1, 69};
    cs.push_back(c);
  }
  {
    auto c = base("pad_outfp32", DType::kF16, 6, 2, 64, 64, {19, 1, 44}, {23, 0, 60});
    c.pad = 8;
    c.out_dtype = DType::kF32;
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = base("maskshift", DType::kF32, 6, 6, 64, 64, {16, 16, 16}, {24, 24, 24});
    c.causal = true;
    c.mask_shift = {-20, 3, 50};
    cs.push_back(c);
  }
  {
    auto c = base("all_empty_keys", DType::kBF16, 6, 2, 64, 64, {3, 5}, {0, 0});
    cs.push_back(c);
  }
  {
    auto c = base("long_segments", DType::kBF16, 6, 2, 128, 128, {300, 1, 211}, {700, 513, 211});
    c.causal = true;
    cs.push_back(c);
  }
  {
    // Attention sinks with seqused (rows past seqused_q stay 0 / -inf) and empty segments.
    auto c = base("sinks_seqused", DType::kBF16, 6, 2, 64, 64, {30, 20, 25, 8}, {400, 30, 0, 8});
    c.seqused_q = {30, 10, 25, 8};
    c.seqused_k = {390, 0, 0, 3};
    c.causal = true;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    c = base("sinks_window", DType::kF32, 6, 1, 64, 64, {2, 60}, {900, 61});
    c.window_left = 100;
    c.window_right = 3;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
  }
  {
    // Chunked local attention per segment (chunk grid in each segment's key positions).
    auto c = base("chunk_causal", DType::kF16, 6, 2, 64, 64, {40, 7, 90, 1}, {300, 7, 60, 0});
    c.causal = true;
    c.chunk = 32;
    cs.push_back(c);
    c = base("chunk_window_seqused", DType::kF32, 6, 1, 64, 64, {30, 20}, {100, 65});
    c.window_left = 10;
    c.seqused_k = {90, 65};
    c.chunk = 7;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    // Chunk positions (ring blocks of a longer sequence): rows and keys at global offsets
    // (negative ones too), a diagonal shift for the causal rule apart from them, and a
    // strided block (every 3rd token, a striped ring layout).
    c = base("chunk_positions", DType::kF32, 6, 2, 64, 64, {40, 33, 17}, {50, 20, 64});
    c.causal = true;
    c.mask_shift = {10, 40, -3};
    c.chunk = 16;
    c.chunk_q_pos = {1000, 37, -20};
    c.chunk_k_pos = {990, 0, -25};
    cs.push_back(c);
    c = base("chunk_positions_strided", DType::kBF16, 6, 1, 64, 64, {45, 12}, {45, 70});
    c.window_left = 9;
    c.window_right = 2;
    c.chunk = 20;
    c.chunk_stride = 3;
    c.chunk_q_pos = {2, 100};
    c.chunk_k_pos = {1, 0};
    cs.push_back(c);
  }
  for (auto& c : cs) c.name = sanitize_name(c.name);
  return cs;
}

struct VarlenProblem {
  Tensor q, k, v, out;
  std::vector<float> lse;
  std::vector<std::int32_t> cu_q, cu_k, used_q, used_k;
  std::int64_t total_q = 0;
  FwdParams p;
};

VarlenProblem make_problem(const VarlenCase& c) {
  VarlenProblem pr;
  const int b = static_cast<int>(c.len_q.size());
  pr.cu_q.assign(1, 0);
  pr.cu_k.assign(1, 0);
  for (int i = 0; i < b; ++i) {
    pr.cu_q.push_back(pr.cu_q.back() + c.len_q[i]);
    pr.cu_k.push_back(pr.cu_k.back() + c.len_k[i]);
  }
  pr.total_q = pr.cu_q.back();
  const std::int64_t total_k = pr.cu_k.back();
  std::mt19937_64 rng(case_seed(c.name));
  pr.q = make_tensor(c.dtype, {pr.total_q, c.h, c.d}, c.pad);
  pr.k = make_tensor(c.dtype, {total_k, c.h_k, c.d}, c.pad);
  pr.v = make_tensor(c.dtype, {total_k, c.h_k, c.d_v}, c.pad);
  pr.out = make_tensor(c.out_dtype, {pr.total_q, c.h, c.d_v}, c.pad);
  fill_normal(pr.q, rng);
  fill_normal(pr.k, rng);
  fill_normal(pr.v, rng);
  pr.lse.assign(static_cast<std::size_t>(c.h) * pr.total_q, 0.0f);
  pr.used_q.assign(c.seqused_q.begin(), c.seqused_q.end());
  pr.used_k.assign(c.seqused_k.begin(), c.seqused_k.end());
  FwdParams& p = pr.p;
  p.dtype = c.dtype;
  p.out_dtype = c.out_dtype;
  p.q = pr.q.data();
  p.k = pr.k.data();
  p.v = pr.v.data();
  p.out = pr.out.data();
  p.lse = pr.lse.data();
  p.q_row_stride = pr.q.stride(0);
  p.q_head_stride = pr.q.stride(1);
  p.k_row_stride = pr.k.stride(0);
  p.k_head_stride = pr.k.stride(1);
  p.v_row_stride = pr.v.stride(0);
  p.v_head_stride = pr.v.stride(1);
  p.out_row_stride = pr.out.stride(0);
  p.out_head_stride = pr.out.stride(1);
  p.b = b;
  p.s_q = *std::max_element(c.len_q.begin(), c.len_q.end());
  p.s_k = *std::max_element(c.len_k.begin(), c.len_k.end());
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  p.cu_seqlens_q = pr.cu_q.data();
  p.cu_seqlens_k = pr.cu_k.data();
  p.seqused_q = pr.used_q.empty() ? nullptr : pr.used_q.data();
  p.seqused_k = pr.used_k.empty() ? nullptr : pr.used_k.data();
  p.mask.causal = c.causal;
  p.mask.window_left = c.window_left;
  p.mask.window_right = c.window_right;
  p.mask.softcap = c.softcap;
  p.mask.mask_shift = c.mask_shift.empty() ? nullptr : c.mask_shift.data();
  p.mask.sinks = c.sinks.empty() ? nullptr : c.sinks.data();
  p.mask.attention_chunk = c.chunk;
  p.mask.chunk_q_pos = c.chunk_q_pos.empty() ? nullptr : c.chunk_q_pos.data();
  p.mask.chunk_k_pos = c.chunk_k_pos.empty() ? nullptr : c.chunk_k_pos.data();
  p.mask.chunk_stride = c.chunk_stride;
  return pr;
}

class VarlenForward : public ::testing::TestWithParam<std::tuple<VarlenCase, std::string>> {};

TEST_P(VarlenForward, MatchesFloat64Reference) {
  const auto& [c, backend] = GetParam();
  VarlenProblem pr = make_problem(c);
  const RefResult ref = reference_forward(pr.p, RefPrecision::kF64);
  const RefResult low = reference_forward(pr.p, RefPrecision::kF32);
  Engine engine(EngineOptions{backend, 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward(pr.p);
  EXPECT_TRUE(check_pt_rule(c.name + " out [total_q, h, d_v]", pr.out.to_double(), ref.out, low.out,
                            {pr.total_q, c.h, c.d_v}, c.out_dtype,
                            p_rounding_atol(backend, c.dtype, pr.v)));
  const std::vector<double> lse(pr.lse.begin(), pr.lse.end());
  EXPECT_TRUE(check_lse(c.name + " lse [h, total_q]", lse, ref.lse, {c.h, pr.total_q}));
}

INSTANTIATE_TEST_SUITE_P(Grid, VarlenForward,
                         ::testing::Combine(::testing::ValuesIn(varlen_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// A varlen call over b segments equals b dense calls over the same rows.
class VarlenVsDense : public ::testing::TestWithParam<std::string> {};

TEST_P(VarlenVsDense, EqualsPerSegmentDenseCalls) {
  VarlenCase c = base("vs_dense", DType::kF32, 6, 2, 64, 64, {7, 40, 1}, {30, 40, 9});
  c.causal = true;
  VarlenProblem pr = make_problem(c);
  Engine engine(EngineOptions{GetParam(), 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward(pr.p);
  const std::vector<double> packed = pr.out.to_double();
  for (std::size_t i = 0; i < c.len_q.size(); ++i) {
    FwdParams p = pr.p;
    p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
    p.seqused_q = p.seqused_k = nullptr;
    p.b = 1;
    p.s_q = c.len_q[i];
    p.s_k = c.len_k[i];
    p.q = static_cast<const float*>(pr.q.data()) + pr.cu_q[i] * pr.q.stride(0);
    p.k = static_cast<const float*>(pr.k.data()) + pr.cu_k[i] * pr.k.stride(0);
    p.v = static_cast<const float*>(pr.v.data()) + pr.cu_k[i] * pr.v.stride(0);
    std::vector<float> out(static_cast<std::size_t>(p.s_q) * c.h * c.d_v);
    std::vector<float> lse(static_cast<std::size_t>(c.h) * p.s_q);
    poison(out);
    poison(lse);
    p.out = out.data();
    p.lse = lse.data();
    p.out_row_stride = static_cast<std::int64_t>(c.h) * c.d_v;
    p.out_head_stride = c.d_v;
    engine.forward(p);
    const std::int64_t n = static_cast<std::int64_t>(p.s_q) * c.h * c.d_v;
    const std::vector<double> dense(out.begin(), out.end());
    const std::vector<double> seg(packed.begin() + pr.cu_q[i] * c.h * c.d_v,
                                  packed.begin() + pr.cu_q[i] * c.h * c.d_v + n);
    EXPECT_TRUE(check_same_to_rounding("segment " + std::to_string(i), seg, dense,
                                       {p.s_q, c.h, c.d_v}, 1e-5));
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, VarlenVsDense, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

}  // namespace
}  // namespace ringattn::test
