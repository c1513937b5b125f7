// qv (FA3's extra query part, attention_params.hpp; docs/semantics.md section 7):
// score = scale * (q . k + qv . v), default scale 1/sqrt(d + d_v), against the float64
// reference on every backend:
//   - dense: (s_q, s_k) pairs of docs/semantics.md section 6, MHA / GQA / MQA, head dims with
//     vector-width tails (d or d_v % 16 == 8), fp32 / bf16 / fp16 storage, every mask
//     (causal, windows, softcap, attention_chunk), sinks, key splits, padded strides
//     whose padding (and every output) holds NaN;
//   - varlen, with an empty key segment and seqused_q;
//   - KV cache: dense and paged (page_size 1, 4, 64, 128), appended k/v, leftpad,
//     cache_batch_idx, rotary (qv is not rotated), varlen queries; unused slots NaN;
//   - decode in both tile orders (the decode kernels' own qv pass);
//   - the default scale and bad arguments (d_v over the limit, strides).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "reference_f64.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

struct QvCase {
  std::string name;
  DType dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  int b = 1, s_q = 1, s_k = 1, h = 6, h_k = 6, d = 64, d_v = 128;
  bool causal = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.0f;
  float scale = 0.0f;  // 0 = default 1/sqrt(d + d_v)
  int chunk = 0;
  int num_splits = 0;
  std::int64_t pad = 0;             // extra (NaN) elements after each head vector
  std::vector<float> sinks;         // [h] or empty
  std::vector<int> q_lens, k_lens;  // varlen segment lengths (empty = dense)
  std::vector<int> seqused_q;       // varlen only, [b] or empty
};

std::ostream& operator<<(std::ostream& os, const QvCase& c) { return os << c.name; }

constexpr DType kDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
constexpr int kHeads[][2] = {{6, 6}, {6, 2}, {6, 1}};

QvCase make_case(const std::string& tag, DType dt, int b, int s_q, int s_k, int hi, int d,
                 int d_v) {
  QvCase c;
  c.dtype = c.out_dtype = dt;
  c.b = b;
  c.s_q = s_q;
  c.s_k = s_k;
  c.h = kHeads[hi][0];
  c.h_k = kHeads[hi][1];
  c.d = d;
  c.d_v = d_v;
  std::ostringstream os;
  os << tag << "_" << dtype_name(dt) << "_b" << b << "_" << s_q << "x" << s_k << "_h" << c.h << "k"
     << c.h_k << "_d" << d << "v" << d_v;
  c.name = os.str();
  return c;
}

std::vector<QvCase> qv_cases() {
  std::vector<QvCase> cs;
  // (s_q, s_k) pairs (docs/semantics.md section 6), full and causal, dtype / heads / dims rotating.
  const int pairs[][2] = {{1, 1},   {1, 3},   {2, 1},     {64, 128},  {113, 203}, {128, 217},
                          {239, 1}, {799, 3}, {108, 256}, {384, 256}, {640, 128}, {16, 2000}};
  const int dims[][2] = {{64, 256}, {64, 128}, {32, 64}, {128, 128}, {24, 72}, {8, 256}};
  int idx = 0;
  for (const auto& pr : pairs) {
    for (int causal = 0; causal < 2; ++causal) {
      const int di = (idx + causal) % 6;
      QvCase c = make_case(causal ? "seq_causal" : "seq", kDtypes[(idx + causal) % 3],
                           pr[0] * pr[1] <= 64 * 256 ? 2 : 1, pr[0], pr[1], idx % 3, dims[di][0],
                           dims[di][1]);
      c.causal = causal != 0;
      cs.push_back(c);
    }
    ++idx;
  }
  // Masks, softcap (scale 1 so that the cap bends the scores), attention_chunk, sinks.
  {
    QvCase c = make_case("local", DType::kBF16, 2, 70, 230, 1, 64, 256);
    c.causal = true;
    c.window_left = 17;
    cs.push_back(c);
    c = make_case("window", DType::kF32, 2, 128, 61, 2, 64, 128);
    c.window_left = 8;
    c.window_right = 24;
    cs.push_back(c);
    c = make_case("softcap", DType::kF32, 2, 45, 70, 1, 64, 128);
    c.softcap = 15.0f;
    c.scale = 1.0f;
    cs.push_back(c);
    c = make_case("softcap_causal", DType::kBF16, 1, 90, 150, 2, 32, 256);
    c.softcap = 15.0f;
    c.scale = 0.5f;
    c.causal = true;
    cs.push_back(c);
    c = make_case("chunk", DType::kF16, 2, 70, 230, 1, 64, 128);
    c.chunk = 64;
    c.causal = true;
    cs.push_back(c);
    c = make_case("chunk_decode", DType::kF32, 1, 4, 1500, 2, 64, 256);
    c.chunk = 100;
    cs.push_back(c);
    c = make_case("sinks_splits", DType::kBF16, 2, 3, 900, 1, 64, 128);
    c.sinks = test_sinks(c.h);
    c.num_splits = 3;
    cs.push_back(c);
    c = make_case("splits_prefill", DType::kF32, 1, 100, 700, 0, 32, 64);
    c.num_splits = 4;
    c.causal = true;
    cs.push_back(c);
  }
  // Layouts: padded strides (NaN padding), fp32 output of bf16 storage, explicit scale,
  // no keys (rows 0 / -inf).
  {
    QvCase c = make_case("pad", DType::kF16, 2, 37, 91, 1, 64, 128);
    c.pad = 8;
    c.out_dtype = DType::kF32;
    cs.push_back(c);
    c = make_case("pad_decode", DType::kF32, 2, 2, 300, 2, 24, 40);
    c.pad = 16;
    cs.push_back(c);
    c = make_case("outfp32", DType::kBF16, 2, 50, 50, 0, 64, 256);
    c.out_dtype = DType::kF32;
    cs.push_back(c);
    c = make_case("scale", DType::kF32, 2, 40, 80, 1, 64, 64);
    c.scale = 0.3f;
    cs.push_back(c);
    cs.push_back(make_case("nokeys", DType::kBF16, 2, 5, 0, 1, 64, 128));
  }
  // Varlen: a segment without keys, one without rows, seqused_q.
  {
    QvCase c = make_case("varlen", DType::kF32, 4, 0, 0, 1, 64, 128);
    c.q_lens = {5, 0, 70, 1};
    c.k_lens = {30, 9, 200, 0};
    c.causal = true;
    cs.push_back(c);
    c = make_case("varlen_seqused", DType::kBF16, 3, 0, 0, 2, 32, 256);
    c.q_lens = {40, 3, 17};
    c.k_lens = {100, 64, 17};
    c.seqused_q = {33, 3, 0};
    cs.push_back(c);
  }
  for (QvCase& c : cs) c.name = sanitize_name(c.name);
  return cs;
}

struct QvProblem {
  Tensor q, k, v, qv, out;
  std::vector<float> lse;
  std::vector<std::int32_t> cu_q, cu_k, seqused_q;
  std::vector<std::int64_t> out_dims, lse_dims;
  FwdParams p;
};

QvProblem make_problem(const QvCase& c) {
  QvProblem pr;
  std::mt19937_64 rng(case_seed(c.name));
  FwdParams& p = pr.p;
  const bool varlen = !c.q_lens.empty();
  std::int64_t bq = c.b, rq = c.s_q, bk = c.b, rk = c.s_k;
  p.s_q = c.s_q;
  p.s_k = c.s_k;
  if (varlen) {
    pr.cu_q.assign(1, 0);
    pr.cu_k.assign(1, 0);
    for (int i = 0; i < c.b; ++i) {
      pr.cu_q.push_back(pr.cu_q.back() + c.q_lens[static_cast<std::size_t>(i)]);
      pr.cu_k.push_back(pr.cu_k.back() + c.k_lens[static_cast<std::size_t>(i)]);
      p.s_q = std::max(p.s_q, c.q_lens[static_cast<std::size_t>(i)]);
      p.s_k = std::max(p.s_k, c.k_lens[static_cast<std::size_t>(i)]);
    }
    bq = bk = 1;
    rq = pr.cu_q.back();
    rk = pr.cu_k.back();
    p.cu_seqlens_q = pr.cu_q.data();
    p.cu_seqlens_k = pr.cu_k.data();
    if (!c.seqused_q.empty()) {
      pr.seqused_q.assign(c.seqused_q.begin(), c.seqused_q.end());
      p.seqused_q = pr.seqused_q.data();
    }
  }
  pr.q = make_tensor(c.dtype, {bq, rq, c.h, c.d}, c.pad);
  pr.k = make_tensor(c.dtype, {bk, rk, c.h_k, c.d}, c.pad);
  pr.v = make_tensor(c.dtype, {bk, rk, c.h_k, c.d_v}, c.pad);
  pr.qv = make_tensor(c.dtype, {bq, rq, c.h, c.d_v}, c.pad);
  pr.out = make_tensor(c.out_dtype, {bq, rq, c.h, c.d_v}, c.pad);
  fill_normal(pr.q, rng);
  fill_normal(pr.k, rng);
  fill_normal(pr.v, rng);
  fill_normal(pr.qv, rng);
  pr.lse.assign(static_cast<std::size_t>(bq * rq) * c.h, 0.0f);
  pr.out_dims = {bq, rq, c.h, c.d_v};
  pr.lse_dims =
      varlen ? std::vector<std::int64_t>{c.h, rq} : std::vector<std::int64_t>{bq, c.h, rq};
  p.dtype = c.dtype;
  p.out_dtype = c.out_dtype;
  p.q = pr.q.data();
  p.k = pr.k.data();
  p.v = pr.v.data();
  p.qv = pr.qv.data();
  p.out = pr.out.data();
  p.lse = pr.lse.data();
  const auto strides = [&](const Tensor& t, std::int64_t& bs, std::int64_t& rs, std::int64_t& hs) {
    bs = varlen ? 0 : t.stride(0);
    rs = t.stride(1);
    hs = t.stride(2);
  };
  strides(pr.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(pr.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(pr.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides(pr.qv, p.qv_batch_stride, p.qv_row_stride, p.qv_head_stride);
  strides(pr.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.b = c.b;
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  p.num_splits = c.num_splits;
  p.mask.scale = c.scale;
  p.mask.softcap = c.softcap;
  p.mask.causal = c.causal;
  p.mask.window_left = c.window_left;
  p.mask.window_right = c.window_right;
  p.mask.attention_chunk = c.chunk;
  p.mask.sinks = c.sinks.empty() ? nullptr : c.sinks.data();
  return pr;
}

class QvForward : public ::testing::TestWithParam<std::tuple<QvCase, std::string>> {};

TEST_P(QvForward, MatchesFloat64Reference) {
  const auto& [c, backend] = GetParam();
  QvProblem pr = make_problem(c);
  const CachedForwardRef& r = cached_forward_references(c.name, pr.p);
  const Engine engine(EngineOptions{backend, 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward(pr.p);
  EXPECT_TRUE(check_pt_rule(c.name + " out", pr.out.to_double(), r.ref.out, r.low.out, pr.out_dims,
                            c.out_dtype, p_rounding_atol(backend, c.dtype, pr.v)));
  EXPECT_TRUE(check_lse(c.name + " lse", std::vector<double>(pr.lse.begin(), pr.lse.end()),
                        r.ref.lse, pr.lse_dims));
}

INSTANTIATE_TEST_SUITE_P(Grid, QvForward,
                         ::testing::Combine(::testing::ValuesIn(qv_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// ---- KV cache ----

KvCase kv(const std::string& name, DType dt, int h, int h_k, int d, int d_v, int s_q, int s_new,
          std::vector<int> seqlens, int page_size) {
  KvCase c;
  c.name = name + "_" + dtype_name(dt) + "_h" + std::to_string(h) + "k" + std::to_string(h_k) +
           "_d" + std::to_string(d) + "v" + std::to_string(d_v) + "_ps" + std::to_string(page_size);
  c.dtype = c.out_dtype = dt;
  c.h = h;
  c.h_k = h_k;
  c.d = d;
  c.d_v = d_v;
  c.s_q = s_q;
  c.s_new = s_new;
  c.seqlens = std::move(seqlens);
  c.page_size = page_size;
  c.qv = true;
  return c;
}

std::vector<KvCase> kv_qv_cases() {
  std::vector<KvCase> cs;
  cs.push_back(kv("decode", DType::kF32, 6, 6, 64, 256, 1, 0, {5, 0, 170}, 0));
  cs.push_back(kv("decode_gqa", DType::kBF16, 6, 2, 64, 128, 1, 1, {300, 77}, 1));
  {
    auto c = kv("append_leftpad", DType::kBF16, 6, 2, 32, 64, 4, 4, {10, 33, 0}, 0);
    c.leftpad = {0, 7, 0};
    c.causal = true;
    cs.push_back(c);
    c = kv("batch_idx", DType::kF16, 6, 1, 64, 128, 2, 2, {6, 20}, 0);
    c.b_cache = 4;
    c.batch_idx = {3, 1};
    c.causal = true;
    cs.push_back(c);
    c = kv("paged_leftpad", DType::kF32, 6, 6, 32, 72, 1, 2, {9, 0, 30}, 4);
    c.leftpad = {3, 0, 5};
    c.qv_pad = 8;
    cs.push_back(c);
    c = kv("paged_local", DType::kF16, 6, 6, 64, 64, 5, 5, {100, 64, 1}, 64);
    c.causal = true;
    c.window_left = 30;
    cs.push_back(c);
    c = kv("paged_softcap", DType::kBF16, 6, 2, 64, 256, 1, 1, {300, 129}, 128);
    c.softcap = 15.0f;
    cs.push_back(c);
    c = kv("prefill_paged", DType::kF32, 6, 1, 64, 128, 80, 80, {150, 20}, 64);
    c.causal = true;
    cs.push_back(c);
    c = kv("rotary", DType::kF32, 6, 2, 32, 64, 3, 3, {11, 4}, 0);
    c.rotary = 1;
    c.causal = true;
    c.leftpad = {2, 0};
    cs.push_back(c);
    c = kv("chunk_sinks", DType::kBF16, 6, 2, 64, 128, 8, 8, {300, 20}, 16);
    c.leftpad = {5, 0};
    c.causal = true;
    c.chunk = 64;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    c = kv("long_decode_split", DType::kF16, 6, 2, 64, 256, 1, 1, {3000}, 64);
    cs.push_back(c);
    c = kv("varlen_paged", DType::kBF16, 6, 2, 64, 256, 0, 0, {100, 0, 37, 5}, 16);
    c.q_lens = {7, 3, 1, 0};
    c.new_lens = {7, 3, 1, 0};
    c.causal = true;
    cs.push_back(c);
    c = kv("varlen_q_only", DType::kF32, 6, 6, 32, 32, 0, 2, {300, 64}, 64);
    c.q_lens = {2, 5};
    c.window_left = 40;
    cs.push_back(c);
  }
  for (auto& c : cs) c.name = sanitize_name(c.name);
  return cs;
}

class QvKvCache : public ::testing::TestWithParam<std::tuple<KvCase, std::string>> {};

TEST_P(QvKvCache, MatchesFloat64Reference) {
  const auto& [c, backend] = GetParam();
  KvProblem pr = make_kv_problem(c);
  const RefResult ref = reference_kvcache(pr.p, RefPrecision::kF64);
  const RefResult low = reference_kvcache(pr.p, RefPrecision::kF32);
  const Engine engine(EngineOptions{backend, 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward_kvcache(pr.p);
  EXPECT_TRUE(check_pt_rule(c.name + " out", pr.out.to_double(), ref.out, low.out, pr.out_dims,
                            c.out_dtype, p_rounding_atol(backend, pr)));
  EXPECT_TRUE(check_lse(c.name + " lse", std::vector<double>(pr.lse.begin(), pr.lse.end()), ref.lse,
                        pr.lse_dims));
}

INSTANTIATE_TEST_SUITE_P(Grid, QvKvCache,
                         ::testing::Combine(::testing::ValuesIn(kv_qv_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// ---- properties on every backend ----

class QvProperties : public ::testing::TestWithParam<std::string> {};

// Both decode tile orders (key-major and head-major) run their own qv pass.
TEST_P(QvProperties, DecodeOrdersAgree) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int hi = 0; hi < 3; ++hi) {
      QvCase c = make_case("orders", dt, 2, 2, 700, hi, 64, 256);
      c.name = sanitize_name(c.name);
      SCOPED_TRACE(c.name);
      std::vector<std::vector<double>> outs;
      for (const char* order : {"key-major", "head-major"}) {
        QvProblem pr = make_problem(c);
        const CachedForwardRef& r = cached_forward_references(c.name, pr.p);
        const Engine engine(EngineOptions{GetParam(), 0, order});
        pr.out.poison();
        engine.forward(pr.p);
        outs.push_back(pr.out.to_double());
        EXPECT_TRUE(check_pt_rule(c.name + " " + order, outs.back(), r.ref.out, r.low.out,
                                  pr.out_dims, c.out_dtype, p_rounding_atol(GetParam(), dt, pr.v)));
      }
      EXPECT_TRUE(check_same_to_rounding("key-major vs head-major", outs[0], outs[1],
                                         {2, 2, 6, 256}, same_to_rounding_rtol(dt)));
    }
  }
}

// scale = 0 means 1/sqrt(d + d_v) with qv (not 1/sqrt(d)); with qv = 0 the result is
// the call without qv at that scale.
TEST_P(QvProperties, DefaultScaleCountsQvDims) {
  QvCase c = make_case("default_scale", DType::kF32, 2, 33, 90, 1, 64, 192);
  c.name = sanitize_name(c.name);
  const Engine engine(EngineOptions{GetParam(), 0});
  QvProblem a = make_problem(c);
  engine.forward(a.p);
  QvProblem b = make_problem(c);
  b.p.mask.scale = 1.0f / std::sqrt(64.0f + 192.0f);
  engine.forward(b.p);
  EXPECT_EQ(a.out.to_double(), b.out.to_double());
  EXPECT_EQ(a.lse, b.lse);
  QvProblem wrong = make_problem(c);
  wrong.p.mask.scale = 1.0f / std::sqrt(64.0f);
  engine.forward(wrong.p);
  EXPECT_NE(a.lse, wrong.lse);

  // Zero qv: exactly the call without qv at scale 1/sqrt(d + d_v).
  QvProblem z = make_problem(c);
  for (std::int64_t i = 0; i < z.qv.numel(); ++i) z.qv.set_at(z.qv.offset_of(i), 0.0);
  engine.forward(z.p);
  QvProblem n = make_problem(c);
  n.p.qv = nullptr;
  n.p.mask.scale = 1.0f / std::sqrt(64.0f + 192.0f);
  engine.forward(n.p);
  EXPECT_TRUE(check_same_to_rounding("zero qv vs no qv", z.out.to_double(), n.out.to_double(),
                                     z.out_dims, 1e-5));
}

// A KV-cache call with qv equals the dense call with qv over the same keys.
TEST_P(QvProperties, KvCacheEqualsDense) {
  KvCase c = kv("vs_dense", DType::kF32, 6, 2, 64, 128, 3, 0, {40, 40}, 0);
  c.extra_capacity = 0;
  c.causal = true;
  c.name = sanitize_name(c.name);
  KvProblem pr = make_kv_problem(c);
  const Engine engine(EngineOptions{GetParam(), 0});
  engine.forward_kvcache(pr.p);
  FwdParams f;
  f.q = pr.q.data();
  f.k = pr.k_cache.data();
  f.v = pr.v_cache.data();
  f.qv = pr.qv.data();
  Tensor out = make_tensor(c.dtype, {2, c.s_q, c.h, c.d_v});
  f.out = out.data();
  f.b = 2;
  f.s_q = c.s_q;
  f.s_k = 40;
  f.h = c.h;
  f.h_k = c.h_k;
  f.d = c.d;
  f.d_v = c.d_v;
  set_contiguous_strides(f);
  f.mask.causal = true;
  engine.forward(f);
  EXPECT_TRUE(check_same_to_rounding("kvcache vs dense", pr.out.to_double(), out.to_double(),
                                     {2, c.s_q, c.h, c.d_v}, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(Backends, QvProperties, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

// ---- bad arguments ----

std::string error_of(const FwdParams& p) {
  try {
    Engine(EngineOptions{"reference", 1}).forward(p);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(QvValidation, ValueHeadDimOverTheLimitNamesTheMlaPath) {
  QvCase c = make_case("bad_dv", DType::kBF16, 1, 2, 8, 0, 64, 256);
  QvProblem pr = make_problem(c);
  pr.p.d_v = 512;  // FA3's MLA shape; the tensors are not read
  const std::string msg = error_of(pr.p);
  EXPECT_NE(msg.find("qv: d_v=512"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(kMaxHeadDim)), std::string::npos) << msg;
  EXPECT_NE(msg.find("flash_mla_interface"), std::string::npos) << msg;
  KvCase kc = kv("bad_dv_kv", DType::kF32, 6, 6, 64, 64, 1, 0, {5}, 0);
  KvProblem kp = make_kv_problem(kc);
  kp.p.d_v = 264;
  try {
    Engine(EngineOptions{"reference", 1}).forward_kvcache(kp.p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("qv: d_v=264"), std::string::npos) << e.what();
  }
}

TEST(QvValidation, StridesAreChecked) {
  QvCase c = make_case("bad_stride", DType::kF32, 2, 4, 8, 0, 64, 128);
  QvProblem pr = make_problem(c);
  pr.p.qv_head_stride = 64;  // inside one d_v = 128 row
  const std::string msg = error_of(pr.p);
  EXPECT_NE(msg.find("qv: head stride 64"), std::string::npos) << msg;
  pr = make_problem(c);
  pr.p.qv_row_stride = -1;
  EXPECT_NE(error_of(pr.p).find("qv: row stride must be >= 0"), std::string::npos);
}

TEST(QvValidation, Fp8StorageIsRefused) {
  QvCase c = make_case("fp8_qv", DType::kF32, 1, 2, 8, 0, 64, 64);
  QvProblem pr = make_problem(c);
  pr.p.dtype = DType::kFP8E4M3;  // validation stops before any tensor is read
  const std::string msg = error_of(pr.p);
  EXPECT_NE(msg.find("qv: not supported with fp8"), std::string::npos) << msg;
}

}  // namespace
}  // namespace ringattn::test
