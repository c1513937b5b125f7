// fp8 e4m3 q/k/v with q_descale / k_descale / v_descale (docs/semantics.md "fp8 e4m3
// q/k/v", attention_params.hpp Fp8Descale) against the float64 reference on every
// backend: the reference dequantises the e4m3 inputs exactly in double and multiplies
// them by the [b, h_k] descales.
//   - dense and varlen forward: GQA / MQA / MHA, causal, local window, soft cap, sinks,
//     random descales per (batch element, KV head), broadcast descales (batch stride
//     0), no descales, fp32 and bf16 outputs, head dims with vector tails;
//   - KV cache: dense and paged caches with k_new / v_new appended in e4m3 (the cache
//     bytes must equal the new rows' bytes), leftpad, cache_batch_idx, long decode with
//     split-KV, varlen queries;
//   - decode shapes of the fp8 decode engine of cpu-avx512-bf16 / cpu-amx (vdpbf16ps;
//     its bar adds test::p_rounding_atol: P rounded to bf16): GQA 1 / 4 / 6 / 8, head
//     dims 32 .. 256 with tails, odd key counts, paged caches, windows, soft cap, sinks;
//   - every finite e4m3 value decodes exactly (one key: the output is v itself);
//   - bad input: descales on 16-bit storage, fp8 output, NaN / inf descale, rotary
//     with fp8, each naming the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
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

constexpr DType kFp8 = DType::kFP8E4M3;

// Descale pattern of a case.
enum class Descales { kNone, kRandom, kBroadcast, kOnlyV };

// Random descales [b, h_k] in [0.25, 2) (and their batch stride) for one case.
struct DescaleSet {
  std::vector<float> q, k, v;
  std::int64_t stride = 0;

  void make(Descales mode, int b, int h_k, std::mt19937_64& rng) {
    if (mode == Descales::kNone) return;
    std::uniform_real_distribution<float> dist(0.25f, 2.0f);
    const int rows = mode == Descales::kBroadcast ? 1 : b;
    stride = mode == Descales::kBroadcast ? 0 : h_k;
    for (auto* x : {&q, &k, &v}) {
      x->resize(static_cast<std::size_t>(rows) * h_k);
      for (float& e : *x) e = dist(rng);
    }
    if (mode == Descales::kOnlyV) q.clear(), k.clear();
  }
  // Largest v descale (1 without): the bound of p_rounding_atol is over dequantised v.
  double v_max() const {
    double m = v.empty() ? 1.0 : 0.0;
    for (float x : v) m = std::max(m, double{x});
    return m;
  }
  void apply(Fp8Descale& ds) const {
    ds.q = q.empty() ? nullptr : q.data();
    ds.k = k.empty() ? nullptr : k.data();
    ds.v = v.empty() ? nullptr : v.data();
    ds.q_batch_stride = ds.k_batch_stride = ds.v_batch_stride = stride;
  }
};

// ---- dense and varlen forward ----

struct Fp8Case {
  std::string name;
  int b = 2, s_q = 7, s_k = 150, h = 6, h_k = 2, d = 64, d_v = 64;
  std::vector<int> q_lens, k_lens;  // varlen segments (both set) or empty
  bool causal = false;
  int window_left = -1;
  float softcap = 0.0f;
  bool sinks = false;
  DType out_dtype = DType::kBF16;
  Descales descales = Descales::kRandom;
};

std::ostream& operator<<(std::ostream& os, const Fp8Case& c) { return os << c.name; }

std::vector<Fp8Case> fwd_cases() {
  std::vector<Fp8Case> cs;
  Fp8Case c;
  c.name = "gqa_causal_bf16";
  c.causal = true;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "mqa_fp32_out";
  c.h_k = 1;
  c.out_dtype = DType::kF32;
  c.s_q = 1;
  c.s_k = 700;  // decode kernel with split-KV
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "mha_window_softcap";
  c.h_k = 6;
  c.causal = true;
  c.window_left = 40;
  c.softcap = 15.0f;
  c.s_q = 300;  // prefill kernel, several query blocks
  c.s_k = 333;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "tails_d40_dv24_broadcast";
  c.d = 40;
  c.d_v = 24;
  c.descales = Descales::kBroadcast;
  c.out_dtype = DType::kF32;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "decode_tails_d40_dv24";  // decode: q . k and P V tails (40 / 24 of 64 columns)
  c.d = 40;
  c.d_v = 24;
  c.s_q = 1;
  c.s_k = 99;
  c.h = 8;
  c.h_k = 2;
  c.out_dtype = DType::kF32;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "no_descale_sinks";
  c.descales = Descales::kNone;
  c.sinks = true;
  c.b = 3;
  c.s_q = 2;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "d128_prefill_only_v_descale";
  c.d = c.d_v = 128;
  c.s_q = 128;
  c.s_k = 128;
  c.h = 8;
  c.causal = true;
  c.descales = Descales::kOnlyV;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "varlen_causal";
  c.q_lens = {5, 0, 40, 1};
  c.k_lens = {9, 3, 40, 200};
  c.b = 4;
  c.causal = true;
  cs.push_back(c);
  c = Fp8Case{};
  c.name = "varlen_empty_keys_fp32";
  c.q_lens = {3, 4};
  c.k_lens = {0, 77};
  c.h_k = 1;
  c.out_dtype = DType::kF32;
  cs.push_back(c);
  return cs;
}

class Fp8Forward : public ::testing::TestWithParam<std::tuple<Fp8Case, std::string>> {};

TEST_P(Fp8Forward, MatchesFloat64Reference) {
  const auto& [c, backend] = GetParam();
  std::mt19937_64 rng(case_seed("fp8_" + c.name));
  const bool varlen = !c.q_lens.empty();
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  for (int n : c.q_lens) cu_q.push_back(cu_q.back() + n);
  for (int n : c.k_lens) cu_k.push_back(cu_k.back() + n);
  int max_q = c.s_q, max_k = c.s_k;
  if (varlen) {
    max_q = *std::max_element(c.q_lens.begin(), c.q_lens.end());
    max_k = *std::max_element(c.k_lens.begin(), c.k_lens.end());
  }
  // Varlen tensors [total, heads, dim] carry a leading 1 to keep the stride layout.
  const std::int64_t qb = varlen ? 1 : c.b, kb = qb;
  const std::int64_t qs = varlen ? cu_q.back() : c.s_q, ks = varlen ? cu_k.back() : c.s_k;
  Tensor q = make_tensor(kFp8, {qb, qs, c.h, c.d}, 8);
  Tensor k = make_tensor(kFp8, {kb, ks, c.h_k, c.d});
  Tensor v = make_tensor(kFp8, {kb, ks, c.h_k, c.d_v}, 16);
  Tensor out = make_tensor(c.out_dtype, {qb, qs, c.h, c.d_v});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng, 2.0);
  std::vector<float> lse(static_cast<std::size_t>(qb * qs * c.h));
  DescaleSet ds;
  ds.make(c.descales, c.b, c.h_k, rng);
  const std::vector<float> sinks = test_sinks(c.h);

  FwdParams p;
  p.dtype = kFp8;
  p.out_dtype = c.out_dtype;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  set_strides(p, q, k, v, out);
  p.b = c.b;
  p.s_q = max_q;
  p.s_k = max_k;
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  if (varlen) {
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  }
  p.mask.causal = c.causal;
  p.mask.window_left = c.window_left;
  p.mask.softcap = c.softcap;
  if (c.sinks) p.mask.sinks = sinks.data();
  ds.apply(p.descale);

  const RefResult ref = reference_forward(p, RefPrecision::kF64);
  const RefResult low = reference_forward(p, RefPrecision::kF32);
  const Engine engine(EngineOptions{backend, 0});
  out.poison();
  poison(lse);
  engine.forward(p);
  const std::vector<std::int64_t> out_dims{qb, qs, c.h, c.d_v};
  const std::vector<std::int64_t> lse_dims =
      varlen ? std::vector<std::int64_t>{c.h, qs} : std::vector<std::int64_t>{c.b, c.h, c.s_q};
  EXPECT_TRUE(check_pt_rule(c.name + " out", out.to_double(), ref.out, low.out, out_dims,
                            c.out_dtype, p_rounding_atol(backend, kFp8, v) * ds.v_max()));
  EXPECT_TRUE(
      check_lse(c.name + " lse", std::vector<double>(lse.begin(), lse.end()), ref.lse, lse_dims));
}

INSTANTIATE_TEST_SUITE_P(Grid, Fp8Forward,
                         ::testing::Combine(::testing::ValuesIn(fwd_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// ---- KV cache ----

struct Fp8KvCase {
  KvCase kv;
  Descales descales = Descales::kRandom;
};

std::ostream& operator<<(std::ostream& os, const Fp8KvCase& c) { return os << c.kv.name; }

Fp8KvCase kv_case(const std::string& name, int h, int h_k, int d, int s_q, int s_new,
                  std::vector<int> seqlens, int page_size, DType out_dtype) {
  Fp8KvCase c;
  c.kv.name = sanitize_name("fp8_" + name);
  c.kv.dtype = kFp8;
  c.kv.out_dtype = out_dtype;
  c.kv.h = h;
  c.kv.h_k = h_k;
  c.kv.d = c.kv.d_v = d;
  c.kv.s_q = s_q;
  c.kv.s_new = s_new;
  c.kv.seqlens = std::move(seqlens);
  c.kv.page_size = page_size;
  return c;
}

std::vector<Fp8KvCase> kv_cases() {
  std::vector<Fp8KvCase> cs;
  auto c = kv_case("paged_append_decode", 8, 2, 64, 1, 1, {300, 0, 77}, 16, DType::kBF16);
  c.kv.leftpad = {10, 0, 0};
  cs.push_back(c);
  c = kv_case("paged_ps1_causal", 6, 6, 32, 3, 3, {7, 12}, 1, DType::kF32);
  c.kv.causal = true;
  cs.push_back(c);
  c = kv_case("dense_batch_idx_window", 6, 1, 64, 4, 4, {40, 9}, 0, DType::kBF16);
  c.kv.b_cache = 3;
  c.kv.batch_idx = {2, 0};
  c.kv.causal = true;
  c.kv.window_left = 12;
  cs.push_back(c);
  c = kv_case("long_decode_split_gqa", 32, 8, 128, 1, 1, {3000}, 0, DType::kF32);
  c.descales = Descales::kBroadcast;
  cs.push_back(c);
  c = kv_case("softcap_sinks_no_descale", 6, 2, 64, 2, 2, {129, 64}, 64, DType::kBF16);
  c.kv.softcap = 15.0f;
  c.kv.sinks = test_sinks(6);
  c.descales = Descales::kNone;
  cs.push_back(c);
  c = kv_case("varlen_chunked_prefill", 6, 2, 64, 0, 0, {100, 0, 37}, 16, DType::kBF16);
  c.kv.q_lens = {7, 3, 1};
  c.kv.new_lens = {7, 3, 1};
  c.kv.causal = true;
  cs.push_back(c);
  c = kv_case("prefill_d128", 8, 2, 128, 96, 96, {200}, 128, DType::kF32);
  c.kv.causal = true;
  cs.push_back(c);
  // Decode shapes of the fp8 decode engine (cpu-avx512-bf16 / cpu-amx): GQA 4 at d = 128
  // with an odd key count (a last tile with an odd number of keys, paged), GQA 8 with a
  // window, soft cap and sinks, 12 rows per KV head (s_q = 2, group 6) at d = 256, MHA
  // at d = 32 (one half-filled 64-column chunk).
  c = kv_case("decode_gqa4_d128_paged_odd", 32, 8, 128, 1, 1, {1000, 32}, 16, DType::kF32);
  cs.push_back(c);
  c = kv_case("decode_gqa8_window_softcap_sinks", 16, 2, 64, 1, 1, {500}, 0, DType::kBF16);
  c.kv.window_left = 100;
  c.kv.softcap = 20.0f;
  c.kv.sinks = test_sinks(16);
  cs.push_back(c);
  c = kv_case("decode_sq2_group6_d256", 12, 2, 256, 2, 2, {201}, 32, DType::kF32);
  c.kv.causal = true;
  cs.push_back(c);
  // GQA 4 (the engine's 4-row score block over pairs of keys) at d = 80: two 32-value
  // steps and a masked 16-value tail, paged with a leftpad.
  c = kv_case("decode_gqa4_d80_tail", 8, 2, 80, 1, 1, {333, 90}, 16, DType::kBF16);
  c.kv.leftpad = {5, 0};
  cs.push_back(c);
  c = kv_case("decode_mha_d32", 4, 4, 32, 1, 0, {70, 3}, 0, DType::kF32);
  c.descales = Descales::kOnlyV;
  cs.push_back(c);
  return cs;
}

class Fp8KvCache : public ::testing::TestWithParam<std::tuple<Fp8KvCase, std::string>> {};

TEST_P(Fp8KvCache, MatchesFloat64ReferenceAndAppendsBytes) {
  const auto& [c, backend] = GetParam();
  KvProblem pr = make_kv_problem(c.kv);
  std::mt19937_64 rng(case_seed("fp8_descale_" + c.kv.name));
  DescaleSet ds;
  ds.make(c.descales, pr.p.b, pr.p.h_k, rng);
  ds.apply(pr.p.descale);
  const RefResult ref = reference_kvcache(pr.p, RefPrecision::kF64);
  const RefResult low = reference_kvcache(pr.p, RefPrecision::kF32);
  std::vector<unsigned char> k_expected = pr.k_cache.bytes;
  std::vector<unsigned char> v_expected = pr.v_cache.bytes;
  reference_kvcache_append(pr.p, k_expected.data(), v_expected.data());

  const Engine engine(EngineOptions{backend, 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward_kvcache(pr.p);
  EXPECT_TRUE(check_pt_rule(c.kv.name + " out", pr.out.to_double(), ref.out, low.out, pr.out_dims,
                            c.kv.out_dtype, p_rounding_atol(backend, pr) * ds.v_max()));
  EXPECT_TRUE(check_lse(c.kv.name + " lse", std::vector<double>(pr.lse.begin(), pr.lse.end()),
                        ref.lse, pr.lse_dims));
  // The appended rows are e4m3 bytes copied as they are; nothing else changes.
  EXPECT_TRUE(pr.k_cache.bytes == k_expected) << c.kv.name << ": k_cache bytes " << seed_note();
  EXPECT_TRUE(pr.v_cache.bytes == v_expected) << c.kv.name << ": v_cache bytes " << seed_note();
}

INSTANTIATE_TEST_SUITE_P(Grid, Fp8KvCache,
                         ::testing::Combine(::testing::ValuesIn(kv_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).kv.name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// ---- exact decoding of every finite e4m3 value ----

// 32 batch elements, one key each, d = d_v = 8 (the vector tail paths): softmax over a
// single key is exactly 1, so the fp32 output row is the dequantised v row itself.
// Together the rows hold all 256 bytes, the two NaN codes (0x7f, 0xff) replaced by 0.
class Fp8Decode : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp8Decode, EveryFiniteValueIsExact) {
  const int b = 32, d = 8, h = 2, h_k = 1;
  std::vector<std::uint8_t> q(static_cast<std::size_t>(b) * h * d, 0x38);  // 1.0
  std::vector<std::uint8_t> k(static_cast<std::size_t>(b) * d, 0x30);      // 0.5
  std::vector<std::uint8_t> v(static_cast<std::size_t>(b) * d);
  for (int i = 0; i < b * d; ++i) v[i] = (i & 0x7f) == 0x7f ? 0 : static_cast<std::uint8_t>(i);
  std::vector<float> out(static_cast<std::size_t>(b) * h * d), lse(static_cast<std::size_t>(b) * h);
  FwdParams p;
  p.dtype = kFp8;
  p.out_dtype = DType::kF32;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.b = b;
  p.s_q = p.s_k = 1;
  p.h = h;
  p.h_k = h_k;
  p.d = p.d_v = d;
  set_contiguous_strides(p);
  const Engine engine(EngineOptions{GetParam(), 0});
  engine.forward(p);
  for (int bi = 0; bi < b; ++bi)
    for (int hh = 0; hh < h; ++hh) {
      // score = 8 * 1.0 * 0.5 / sqrt(8): the LSE of one key is its score.
      EXPECT_NEAR(lse[static_cast<std::size_t>(bi) * h + hh], 4.0 / std::sqrt(8.0), 1e-6);
      for (int c = 0; c < d; ++c) {
        const std::uint8_t byte = v[static_cast<std::size_t>(bi) * d + c];
        ASSERT_EQ(out[(static_cast<std::size_t>(bi) * h + hh) * d + c], fp8e4m3_to_f32(byte))
            << "byte 0x" << std::hex << int{byte};
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Backends, Fp8Decode, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

// ---- bad input ----

void expect_invalid(const std::string& what, const std::function<void()>& call,
                    const std::vector<std::string>& needles) {
  SCOPED_TRACE(what);
  try {
    call();
    ADD_FAILURE() << what << ": no exception thrown";
  } catch (const InvalidArgument& e) {
    for (const auto& n : needles)
      EXPECT_NE(e.message().find(n), std::string::npos)
          << what << ": message does not mention '" << n << "': " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected InvalidArgument, got: " << e.what();
  }
}

TEST(Fp8Validation, NamesTheArgument) {
  KvCase c = kv_case("validation", 6, 2, 32, 1, 1, {20, 5}, 0, DType::kBF16).kv;
  const Engine engine(EngineOptions{"reference", 1});
  {
    KvProblem pr = make_kv_problem(c);
    std::vector<float> ds(4, 1.0f);
    pr.p.descale.k = ds.data();
    pr.p.descale.k_batch_stride = 2;
    engine.forward_kvcache(pr.p);  // the valid call runs
    ds[3] = std::numeric_limits<float>::quiet_NaN();
    expect_invalid("NaN descale", [&] { engine.forward_kvcache(pr.p); },
                   {"k_descale[1, 1]", "nan", "finite"});
    ds[3] = std::numeric_limits<float>::infinity();
    expect_invalid("inf descale", [&] { engine.forward_kvcache(pr.p); }, {"k_descale[1, 1]"});
    ds[3] = 1.0f;
    pr.p.descale.k_batch_stride = 1;
    expect_invalid("overlapping descale rows", [&] { engine.forward_kvcache(pr.p); },
                   {"k_descale", "batch stride 1", "h_k=2"});
    pr.p.descale.k_batch_stride = 2;
    pr.p.out_dtype = kFp8;
    expect_invalid("fp8 output", [&] { engine.forward_kvcache(pr.p); }, {"out_dtype", "fp8"});
  }
  {
    KvCase c16 = c;
    c16.dtype = c16.out_dtype = DType::kBF16;
    KvProblem pr = make_kv_problem(c16);
    std::vector<float> ds(4, 1.0f);
    pr.p.descale.q = ds.data();
    pr.p.descale.q_batch_stride = 2;
    expect_invalid("descale on bf16", [&] { engine.forward_kvcache(pr.p); },
                   {"q_descale", "only fp8", "bf16"});
  }
  {
    KvCase cr = c;
    cr.rotary = 1;
    KvProblem pr = make_kv_problem(cr);
    expect_invalid("rotary with fp8", [&] { engine.forward_kvcache(pr.p); }, {"rotary", "fp8"});
  }
  {
    // Dense forward: descales with fp32 storage.
    Tensor q = make_tensor(DType::kF32, {1, 2, 2, 8}), k = make_tensor(DType::kF32, {1, 3, 1, 8});
    Tensor out = make_tensor(DType::kF32, {1, 2, 2, 8});
    std::mt19937_64 rng(3);
    fill_normal(q, rng);
    fill_normal(k, rng);
    FwdParams p;
    p.q = q.data();
    p.k = p.v = k.data();
    p.out = out.data();
    p.b = 1;
    p.s_q = 2;
    p.s_k = 3;
    p.h = 2;
    p.h_k = 1;
    p.d = p.d_v = 8;
    set_contiguous_strides(p);
    const float one = 1.0f;
    p.descale.v = &one;
    expect_invalid("descale on fp32", [&] { engine.forward(p); },
                   {"v_descale", "only fp8", "fp32"});
  }
}

}  // namespace
}  // namespace ringattn::test
