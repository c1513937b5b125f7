// KV-cache forward (docs/semantics.md section 3) against the float64 reference on every
// backend: dense and paged caches (page_size 1, 4, 64, 128), cache_batch_idx,
// leftpad, in-place append of k_new/v_new, rotary embedding (interleaved and
// half-split), mask variants and empty sequences. Unused cache slots hold NaN.
// After each call the caches must equal the expected append exactly: appended
// slots bit-exact (within one rounding of the storage dtype when rotary is on,
// since the rotation may be computed with FMA), every other slot untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "reference_f64.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/engine.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

KvCase kv(const std::string& name, DType dt, int h, int h_k, int d, int s_q, int s_new,
          std::vector<int> seqlens, int page_size) {
  KvCase c;
  c.name = name + "_" + dtype_name(dt) + "_h" + std::to_string(h) + "k" + std::to_string(h_k) +
           "_ps" + std::to_string(page_size);
  c.dtype = dt;
  c.out_dtype = dt;
  c.h = h;
  c.h_k = h_k;
  c.d = d;
  c.d_v = d;
  c.s_q = s_q;
  c.s_new = s_new;
  c.seqlens = std::move(seqlens);
  c.page_size = page_size;
  return c;
}

std::vector<KvCase> kv_cases() {
  std::vector<KvCase> cs;
  cs.push_back(kv("decode_empty_seq", DType::kF32, 6, 6, 32, 1, 0, {5, 0, 17}, 0));
  {
    auto c = kv("append_leftpad", DType::kBF16, 6, 2, 32, 4, 4, {10, 33, 0}, 0);
    c.leftpad = {0, 7, 0};
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = kv("batch_idx", DType::kF16, 6, 1, 32, 2, 2, {6, 20}, 0);
    c.b_cache = 4;
    c.batch_idx = {3, 1};
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = kv("batch_idx_decode", DType::kF32, 6, 2, 32, 1, 0, {9, 9, 4}, 0);
    c.b_cache = 3;
    c.batch_idx = {2, 2, 0};  // read-only sharing of a cache row is legal
    cs.push_back(c);
  }
  {
    auto c = kv("paged", DType::kF32, 6, 2, 32, 3, 3, {7, 12}, 1);
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = kv("paged_leftpad", DType::kBF16, 6, 6, 32, 1, 2, {9, 0, 30}, 4);
    c.leftpad = {3, 0, 5};
    cs.push_back(c);
  }
  {
    auto c = kv("paged_local", DType::kF16, 6, 6, 64, 5, 5, {100, 64, 1}, 64);
    c.causal = true;
    c.window_left = 30;
    cs.push_back(c);
  }
  {
    auto c = kv("paged_softcap", DType::kBF16, 6, 2, 32, 1, 1, {300, 129}, 128);
    c.softcap = 15.0f;
    cs.push_back(c);
  }
  {
    auto c = kv("rotary_interleaved", DType::kF32, 6, 2, 32, 3, 3, {11, 4}, 0);
    c.rotary = 1;
    c.causal = true;
    c.leftpad = {2, 0};
    cs.push_back(c);
  }
  {
    // Not causal, no window: all q rows rotate at the first new position.
    auto c = kv("rotary_half_partial", DType::kBF16, 6, 1, 32, 2, 2, {13, 6}, 4);
    c.rotary = 2;
    c.rotary_dim = 16;
    cs.push_back(c);
  }
  {
    auto c = kv("rotary_half_window", DType::kF16, 6, 6, 32, 4, 4, {25, 3}, 0);
    c.rotary = 2;
    c.window_left = 8;
    cs.push_back(c);
  }
  {
    auto c = kv("rotary_interleaved_paged", DType::kBF16, 6, 2, 64, 1, 1, {40, 77}, 64);
    c.rotary = 1;
    c.rotary_dim = 32;
    c.leftpad = {4, 70};
    c.causal = true;
    cs.push_back(c);
  }
  {
    // s_q > s_k for sequence 0 (bottom-right causal leaves its first rows empty).
    auto c = kv("sq_gt_sk", DType::kF32, 6, 2, 32, 6, 2, {0, 3}, 0);
    c.causal = true;
    cs.push_back(c);
  }
  {
    auto c = kv("outfp32", DType::kBF16, 6, 2, 64, 1, 0, {1000, 517}, 0);
    c.out_dtype = DType::kF32;
    cs.push_back(c);
  }
  cs.push_back(kv("long_decode", DType::kF16, 6, 2, 64, 1, 1, {4000}, 64));
  {
    // Attention sinks: paged decode with leftpad and an empty sequence, causal chunk
    // with s_q > s_k for one sequence (its first rows see no key).
    auto c = kv("sinks_paged", DType::kBF16, 6, 2, 64, 1, 1, {900, 0, 77}, 16);
    c.leftpad = {10, 0, 0};
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    c = kv("sinks_causal", DType::kF32, 6, 1, 32, 5, 2, {0, 300}, 0);
    c.causal = true;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
  }
  {
    // Chunked local attention against a cache: paged chunked prefill (the chunk grid is
    // in key positions after leftpad), rotary (chunk makes q rows follow the new keys'
    // positions, as a local mask does in FA3).
    auto c = kv("chunk_paged", DType::kBF16, 6, 2, 64, 8, 8, {300, 20}, 16);
    c.leftpad = {5, 0};
    c.causal = true;
    c.chunk = 64;
    cs.push_back(c);
    c = kv("chunk_rotary", DType::kF32, 6, 6, 32, 4, 4, {50, 9}, 0);
    c.rotary = 2;
    c.chunk = 16;
    cs.push_back(c);
    c = kv("chunk_decode_split", DType::kF16, 6, 1, 64, 1, 1, {2000}, 64);
    c.chunk = 700;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    // Chunk positions (a cache shard of a longer sequence, as distributed decode and
    // sessions pass them): rows and keys at global offsets, one sequence strided.
    c = kv("chunk_positions_paged", DType::kF32, 6, 2, 32, 5, 3, {90, 40}, 8);
    c.causal = true;
    c.chunk = 24;
    c.chunk_q_pos = {1000, -7};
    c.chunk_k_pos = {950, -50};
    cs.push_back(c);
    c = kv("chunk_positions_strided", DType::kBF16, 6, 6, 32, 4, 0, {70}, 0);
    c.chunk = 10;
    c.chunk_q_pos = {203};
    c.chunk_k_pos = {1};
    c.chunk_stride = 3;
    cs.push_back(c);
  }
  {
    // Variable query lengths and new-key counts per sequence (FA3 cu_seqlens_q /
    // cu_seqlens_k_new): chunked prefill against a paged cache, sequences with 0 rows,
    // 0 new keys, decode (1 row) next to prefill; causal, rotary, leftpad, chunk, sinks.
    auto c = kv("varlen_paged_causal", DType::kBF16, 6, 2, 64, 0, 0, {100, 0, 37, 5}, 16);
    c.q_lens = {7, 3, 1, 0};
    c.new_lens = {7, 3, 1, 0};
    c.causal = true;
    cs.push_back(c);
    c = kv("varlen_dense_rotary", DType::kF32, 6, 6, 32, 0, 0, {20, 9, 50}, 0);
    c.q_lens = {4, 1, 9};
    c.new_lens = {4, 0, 9};
    c.leftpad = {3, 0, 10};
    c.rotary = 1;
    c.causal = true;
    cs.push_back(c);
    c = kv("varlen_q_only_window_sinks", DType::kF16, 6, 1, 64, 0, 2, {300, 64}, 64);
    c.q_lens = {2, 5};
    c.window_left = 40;
    c.sinks = test_sinks(c.h);
    cs.push_back(c);
    // rotary_seqlens (FA3): rotary positions from their own offsets, not cache_seqlens,
    // with varlen queries and paged appends.
    c = kv("rotary_seqlens_varlen", DType::kBF16, 6, 2, 64, 0, 0, {30, 0, 12}, 8);
    c.q_lens = {3, 2, 1};
    c.new_lens = {3, 2, 1};
    c.rotary = 1;
    c.rotary_seqlens = {5, 40, 0};
    c.causal = true;
    cs.push_back(c);
    c = kv("rotary_seqlens_dense", DType::kF32, 6, 6, 32, 2, 2, {20, 7}, 0);
    c.rotary = 2;
    c.rotary_dim = 16;
    c.rotary_seqlens = {0, 15};
    cs.push_back(c);
    c = kv("varlen_new_only_chunk", DType::kF32, 6, 2, 32, 3, 0, {60, 4}, 0);
    c.new_lens = {3, 1};
    c.causal = true;
    c.chunk = 16;
    cs.push_back(c);
  }
  for (auto& c : cs) c.name = sanitize_name(c.name);
  return cs;
}

// Compares a cache after the call with the expected one element by element:
// bytes must match, except that with rotary on an appended k value may differ
// by one rounding of the storage dtype.
::testing::AssertionResult check_cache(const std::string& what, const Tensor& got,
                                       const std::vector<unsigned char>& expected,
                                       bool allow_rounding) {
  const std::size_t es = dtype_size(got.dtype);
  const double eps = got.dtype == DType::kF32    ? std::ldexp(1.0, -22)
                     : got.dtype == DType::kBF16 ? std::ldexp(1.0, -7)
                                                 : std::ldexp(1.0, -10);
  int bad = 0;
  std::ostringstream os;
  for (std::int64_t i = 0; i < got.storage_elems(); ++i) {
    if (std::memcmp(&got.bytes[i * es], &expected[i * es], es) == 0) continue;
    const double g = load_as_f32(got.bytes.data(), i, got.dtype);
    const double e = load_as_f32(expected.data(), i, got.dtype);
    if (allow_rounding && std::isfinite(g) && std::isfinite(e) &&
        std::fabs(g - e) <= eps * std::fabs(e) + 1e-6) {
      continue;
    }
    if (bad++ < 3) os << "\n  element offset " << i << ": got " << g << ", expected " << e;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " cache elements differ from the "
                                       << "expected append" << os.str() << " " << seed_note();
}

class KvCacheForward : public ::testing::TestWithParam<std::tuple<KvCase, std::string>> {};

TEST_P(KvCacheForward, MatchesFloat64ReferenceAndAppendsExactly) {
  const auto& [c, backend] = GetParam();
  KvProblem pr = make_kv_problem(c);
  const RefResult ref = reference_kvcache(pr.p, RefPrecision::kF64);
  const RefResult low = reference_kvcache(pr.p, RefPrecision::kF32);
  std::vector<unsigned char> k_expected = pr.k_cache.bytes;
  std::vector<unsigned char> v_expected = pr.v_cache.bytes;
  reference_kvcache_append(pr.p, k_expected.data(), v_expected.data());

  Engine engine(EngineOptions{backend, 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward_kvcache(pr.p);
  const int b = pr.p.b;
  (void)b;
  EXPECT_TRUE(check_pt_rule(c.name + " out", pr.out.to_double(), ref.out, low.out, pr.out_dims,
                            c.out_dtype, p_rounding_atol(backend, pr)));
  const std::vector<double> lse(pr.lse.begin(), pr.lse.end());
  EXPECT_TRUE(check_lse(c.name + " lse", lse, ref.lse, pr.lse_dims));
  EXPECT_TRUE(check_cache(c.name + " k_cache", pr.k_cache, k_expected, c.rotary != 0));
  EXPECT_TRUE(check_cache(c.name + " v_cache", pr.v_cache, v_expected, false));
}

INSTANTIATE_TEST_SUITE_P(Grid, KvCacheForward,
                         ::testing::Combine(::testing::ValuesIn(kv_cases()),
                                            ::testing::ValuesIn(test_backends())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  sanitize_name(std::get<1>(info.param));
                         });

// A KV-cache call without append equals the dense forward over the cached keys.
class KvCacheVsDense : public ::testing::TestWithParam<std::string> {};

TEST_P(KvCacheVsDense, DenseCacheEqualsDenseForward) {
  KvCase c = kv("vs_dense", DType::kF32, 6, 2, 32, 3, 0, {20, 20}, 0);
  c.extra_capacity = 0;
  c.causal = true;
  c.name = sanitize_name(c.name);
  KvProblem pr = make_kv_problem(c);
  Engine engine(EngineOptions{GetParam(), 0});
  pr.out.poison();
  poison(pr.lse);
  engine.forward_kvcache(pr.p);
  const std::vector<double> from_cache = pr.out.to_double();

  FwdParams f;
  f.dtype = f.out_dtype = c.dtype;
  f.q = pr.q.data();
  f.k = pr.k_cache.data();
  f.v = pr.v_cache.data();
  Tensor out = make_tensor(c.dtype, {2, c.s_q, c.h, c.d_v});
  f.out = out.data();
  f.q_batch_stride = pr.q.stride(0);
  f.q_row_stride = pr.q.stride(1);
  f.q_head_stride = pr.q.stride(2);
  f.k_batch_stride = pr.k_cache.stride(0);
  f.k_row_stride = pr.k_cache.stride(1);
  f.k_head_stride = pr.k_cache.stride(2);
  f.v_batch_stride = pr.v_cache.stride(0);
  f.v_row_stride = pr.v_cache.stride(1);
  f.v_head_stride = pr.v_cache.stride(2);
  f.out_batch_stride = out.stride(0);
  f.out_row_stride = out.stride(1);
  f.out_head_stride = out.stride(2);
  f.b = 2;
  f.s_q = c.s_q;
  f.s_k = 20;
  f.h = c.h;
  f.h_k = c.h_k;
  f.d = c.d;
  f.d_v = c.d_v;
  f.mask.causal = true;
  engine.forward(f);
  EXPECT_TRUE(check_same_to_rounding("kvcache vs dense", from_cache, out.to_double(),
                                     {2, c.s_q, c.h, c.d_v}, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(Backends, KvCacheVsDense, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

}  // namespace
}  // namespace ringattn::test
