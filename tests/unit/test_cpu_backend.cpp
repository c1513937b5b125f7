// The optimised CPU backends (cpu-avx512 / cpu-avx2 / cpu-scalar, whichever this
// machine runs) against the "reference" backend on fresh random inputs: dense, varlen
// (empty segments, seqused), KV cache (paged, append, leftpad, rotary, batch index),
// split-KV (forced and planned), every dtype, GQA/MQA, masks and soft cap.
// Outputs are poisoned with NaN so that an unwritten element fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ringattn/contiguous_params.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<std::string> cpu_backends() {
  std::vector<std::string> out;
  for (const std::string& n : available_backends())
    if (n.rfind("cpu-", 0) == 0) out.push_back(n);
  return out;
}

// Both fp32 decode tile orders run on every machine (EngineOptions::decode_order).
const char* const kDecodeOrders[] = {"key-major", "head-major"};

// Random tensor stored as `t` (fp32 or 16-bit), n elements.
std::vector<std::uint8_t> random_tensor(std::size_t n, DType t, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::uint8_t> buf(n * dtype_size(t));
  for (std::size_t i = 0; i < n; ++i)
    store_from_f32(buf.data(), static_cast<std::int64_t>(i), t, nd(rng));
  return buf;
}

// max |a - b| relative to max(1, max |b|); NaN anywhere (other than in both) fails.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, double tol,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  double scale = 1.0;
  for (float x : b)
    if (std::isfinite(x)) scale = std::max(scale, static_cast<double>(std::fabs(x)));
  double worst = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;  // covers matching +-inf
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!(d <= worst)) {
      worst = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
      at = i;
    }
  }
  EXPECT_LE(worst / scale, tol) << what << ": element " << at << " got " << a[at] << " want "
                                << b[at];
}

// The matrix engines (cpu-amx, cpu-avx512-bf16) round the softmax weights P to bf16
// before P V on bf16 storage (as FlashAttention-3): each weight moves by at most 2^-8
// relative, the output by at most 2^-8 max|v| (test::p_rounding_atol). Returns `tol`
// widened by that for such runs.
double with_p_rounding(double tol, const std::string& be, DType t,
                       std::initializer_list<const std::vector<std::uint8_t>*> values) {
  if ((be != "cpu-amx" && be != "cpu-avx512-bf16") || t != DType::kBF16) return tol;
  double m = 0.0;
  for (const auto* v : values)
    for (std::size_t i = 0; i < v->size() / dtype_size(t); ++i)
      m = std::max(
          m,
          std::fabs(static_cast<double>(load_as_f32(v->data(), static_cast<std::int64_t>(i), t))));
  return tol + std::ldexp(m, -8);
}

std::vector<float> to_f32(const std::vector<std::uint8_t>& buf, DType t) {
  const std::size_t n = buf.size() / dtype_size(t);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i)
    out[i] = load_as_f32(buf.data(), static_cast<std::int64_t>(i), t);
  return out;
}

struct DenseCase {
  int b, s_q, s_k, h, h_k, d, d_v;
  DType dtype;
  bool causal;
  int w_left, w_right;
  float softcap;
  int num_splits;
  DType out_dtype;
};

std::string describe(const DenseCase& c) {
  return "b" + std::to_string(c.b) + " s_q" + std::to_string(c.s_q) + " s_k" +
         std::to_string(c.s_k) + " h" + std::to_string(c.h) + "/" + std::to_string(c.h_k) + " d" +
         std::to_string(c.d) + "/" + std::to_string(c.d_v) + " " + dtype_name(c.dtype) +
         (c.causal ? " causal" : "") + " w(" + std::to_string(c.w_left) + "," +
         std::to_string(c.w_right) + ") cap" + std::to_string(static_cast<int>(c.softcap)) +
         " splits" + std::to_string(c.num_splits);
}

// Dense FwdParams for case c over contiguous q [b, s_q, h, d], k [b, s_k, h_k, d],
// v [b, s_k, h_k, d_v] and out [b, s_q, h, d_v] (out/lse pointers left to the caller).
FwdParams dense_params(const DenseCase& c, const void* q, const void* k, const void* v) {
  FwdParams p;
  p.dtype = c.dtype;
  p.out_dtype = c.out_dtype;
  p.q = q;
  p.k = k;
  p.v = v;
  p.b = c.b;
  p.s_q = c.s_q;
  p.s_k = c.s_k;
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  set_contiguous_strides(p);
  p.mask.causal = c.causal;
  p.mask.window_left = c.w_left;
  p.mask.window_right = c.w_right;
  p.mask.softcap = c.softcap;
  p.num_splits = c.num_splits;
  return p;
}

// Dense forward of every cpu backend vs reference.
void check_dense(const DenseCase& c, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const auto q = random_tensor(static_cast<std::size_t>(c.b) * c.s_q * c.h * c.d, c.dtype, rng);
  const auto k = random_tensor(static_cast<std::size_t>(c.b) * c.s_k * c.h_k * c.d, c.dtype, rng);
  const auto v = random_tensor(static_cast<std::size_t>(c.b) * c.s_k * c.h_k * c.d_v, c.dtype, rng);
  FwdParams p = dense_params(c, q.data(), k.data(), v.data());

  const std::size_t n_out = static_cast<std::size_t>(c.b) * c.s_q * c.h * c.d_v;
  const std::size_t n_lse = static_cast<std::size_t>(c.b) * c.h * c.s_q;
  auto run = [&](const std::string& backend, const std::string& order, int splits, int threads,
                 std::vector<float>& out, std::vector<float>& lse) {
    std::vector<std::uint8_t> out_raw(n_out * dtype_size(c.out_dtype), 0xff);  // NaN poison
    lse.assign(n_lse, kNaN);
    p.out = out_raw.data();
    p.lse = lse.data();
    p.num_splits = splits;
    Engine(EngineOptions{backend, threads, order}).forward(p);
    out = to_f32(out_raw, c.out_dtype);
  };
  std::vector<float> ref_out, ref_lse;
  run("reference", "auto", 0, 2, ref_out, ref_lse);
  const double tol = c.out_dtype == DType::kF32 ? 2e-5 : 1e-2;
  for (const std::string& be : cpu_backends()) {
    for (const char* order : kDecodeOrders) {
      for (int threads : {1, 2}) {
        std::vector<float> out, lse;
        run(be, order, c.num_splits, threads, out, lse);
        const std::string what =
            be + " " + order + " threads" + std::to_string(threads) + " " + describe(c);
        expect_close(out, ref_out, with_p_rounding(tol, be, c.dtype, {&v}), what + " out");
        expect_close(lse, ref_lse, 1e-5, what + " lse");
      }
    }
  }
}

TEST(CpuBackend, DecodeOrderOption) {
  for (const std::string& be : cpu_backends()) {
    EXPECT_EQ(Engine(EngineOptions{be, 1, "key-major"}).decode_order(), "key-major");
    EXPECT_EQ(Engine(EngineOptions{be, 1, "head-major"}).decode_order(), "head-major");
    const std::string chosen = Engine(EngineOptions{be, 1}).decode_order();
    EXPECT_TRUE(chosen == "key-major" || chosen == "head-major") << chosen;
  }
  EXPECT_EQ(Engine(EngineOptions{"reference", 1}).decode_order(), "none");
  try {
    Engine(EngineOptions{"cpu", 1, "diagonal"});
    ADD_FAILURE() << "decode_order 'diagonal' was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("decode_order: unknown order 'diagonal'"),
              std::string::npos)
        << e.what();
  }
}

TEST(CpuBackend, NamesAndSelection) {
  for (const std::string& be : cpu_backends())
    EXPECT_EQ(Engine(EngineOptions{be, 1}).backend_name(), be);
  EXPECT_EQ(Engine(EngineOptions{"cpu-scalar", 1}).backend_name(), "cpu-scalar");
}

TEST(CpuBackend, DenseGrid) {
  const DenseCase cases[] = {
      {1, 1, 1, 6, 6, 64, 64, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},
      {2, 1, 3, 6, 2, 64, 64, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {1, 2, 1, 6, 1, 64, 64, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {1, 113, 203, 6, 2, 128, 128, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {2, 128, 217, 6, 6, 96, 96, DType::kF32, false, 17, 9, 15.0f, 0, DType::kF32},
      {1, 239, 1, 6, 1, 192, 128, DType::kBF16, false, -1, -1, 0.0f, 0, DType::kF32},
      {1, 64, 128, 6, 2, 256, 256, DType::kF16, true, 30, -1, 15.0f, 0, DType::kF32},
      {1, 799, 3, 6, 2, 64, 64, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {1, 384, 256, 6, 2, 72, 40, DType::kBF16, true, -1, -1, 0.0f, 0, DType::kBF16},
      {1, 16, 2000, 6, 2, 128, 128, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},
      {2, 4, 700, 6, 6, 136, 56, DType::kF16, true, -1, -1, 15.0f, 3, DType::kF16},
      {3, 1, 1500, 8, 2, 128, 128, DType::kBF16, false, 600, -1, 0.0f, 0, DType::kF32},
      {1, 300, 900, 4, 2, 64, 64, DType::kF32, true, -1, -1, 0.0f, 4, DType::kF32},
  };
  std::uint32_t seed = 100;
  for (const DenseCase& c : cases) check_dense(c, seed++);
}

// Decode kernel (at most 16 rows per KV head): every row count per head (s_q x group)
// from 1 to 16, including the non-powers of two that the score kernel splits into
// power-of-two chunks, head dims with a vector tail, one or several KV heads per task,
// key counts that leave a partial last tile (padded key pointers).
TEST(CpuBackend, DecodeRowShapes) {
  const DenseCase cases[] = {
      {1, 1, 37, 8, 8, 64, 64, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},      // 1 row
      {1, 1, 300, 6, 2, 72, 72, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},     // 3 rows
      {1, 1, 517, 10, 2, 136, 136, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},  // 5
      {1, 2, 129, 6, 2, 128, 64, DType::kBF16, true, -1, -1, 0.0f, 0, DType::kF32},    // 6 rows
      {1, 1, 1000, 7, 1, 40, 40, DType::kF16, false, -1, -1, 15.0f, 0, DType::kF32},   // 7
      {1, 3, 250, 8, 2, 128, 128, DType::kF32, true, 100, -1, 0.0f, 0, DType::kF32},   // 12
      {2, 4, 333, 16, 4, 128, 128, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},   // 16
      {1, 1, 4099, 32, 8, 128, 128, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},
      {1, 1, 2050, 32, 8, 128, 128, DType::kBF16, false, -1, -1, 0.0f, 5, DType::kF32},
      // P V in wide column blocks (<= 4 rows per head) with vector tails and a split:
      {1, 1, 200, 4, 2, 96, 40, DType::kF32, false, -1, -1, 0.0f, 0, DType::kF32},    // 2 rows
      {1, 1, 170, 8, 2, 72, 200, DType::kF16, true, -1, -1, 0.0f, 3, DType::kF32},    // 4 rows
      {1, 1, 90, 2, 2, 64, 136, DType::kBF16, false, -1, -1, 0.0f, 0, DType::kBF16},  // 1 row
  };
  std::uint32_t seed = 500;
  for (const DenseCase& c : cases) check_dense(c, seed++);
}

// Prefill diagonal tiles: row blocks that need only part of a masked key tile (causal,
// causal + left window, top-left rows that see nothing when s_q > s_k, a query block
// that does not start on a tile boundary).
TEST(CpuBackend, PrefillDiagonalSubTiles) {
  const DenseCase cases[] = {
      {1, 150, 170, 6, 2, 64, 64, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {1, 200, 100, 4, 1, 128, 128, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32},
      {1, 257, 257, 8, 2, 96, 96, DType::kBF16, true, 40, -1, 0.0f, 0, DType::kF32},
      {1, 130, 300, 4, 4, 64, 64, DType::kF16, false, 20, 7, 15.0f, 0, DType::kF32},
  };
  std::uint32_t seed = 600;
  for (const DenseCase& c : cases) check_dense(c, seed++);
}

TEST(CpuBackend, VarlenEmptySegmentsAndSeqused) {
  std::mt19937 rng(7);
  const int h = 6, h_k = 2, d = 64, d_v = 64;
  const std::vector<std::int32_t> cu_q = {0, 5, 5, 140, 141, 300};
  const std::vector<std::int32_t> cu_k = {0, 0, 40, 200, 210, 500};
  const std::vector<std::int32_t> used_q = {5, 0, 120, 1, 150};
  const std::vector<std::int32_t> used_k = {0, 40, 160, 7, 250};
  const int b = 5, total_q = cu_q.back(), total_k = cu_k.back();
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (bool seqused : {false, true}) {
      const auto q = random_tensor(static_cast<std::size_t>(total_q) * h * d, dt, rng);
      const auto k = random_tensor(static_cast<std::size_t>(total_k) * h_k * d, dt, rng);
      const auto v = random_tensor(static_cast<std::size_t>(total_k) * h_k * d_v, dt, rng);
      FwdParams p;
      p.dtype = dt;
      p.q = q.data();
      p.k = k.data();
      p.v = v.data();
      p.b = b;
      p.s_q = 160;
      p.s_k = 290;
      p.h = h;
      p.h_k = h_k;
      p.d = d;
      p.d_v = d_v;
      p.cu_seqlens_q = cu_q.data();
      p.cu_seqlens_k = cu_k.data();
      set_contiguous_strides(p);
      if (seqused) {
        p.seqused_q = used_q.data();
        p.seqused_k = used_k.data();
      }
      p.mask.causal = true;
      auto run = [&](const std::string& be, std::vector<float>& out, std::vector<float>& lse) {
        out.assign(static_cast<std::size_t>(total_q) * h * d_v, kNaN);
        lse.assign(static_cast<std::size_t>(h) * total_q, kNaN);
        p.out = out.data();
        p.lse = lse.data();
        Engine(EngineOptions{be, 2}).forward(p);
      };
      std::vector<float> ref_out, ref_lse;
      run("reference", ref_out, ref_lse);
      for (const std::string& be : cpu_backends()) {
        std::vector<float> out, lse;
        run(be, out, lse);
        expect_close(out, ref_out, with_p_rounding(2e-5, be, dt, {&v}), be + " varlen out");
        expect_close(lse, ref_lse, 1e-5, be + " varlen lse");
      }
    }
  }
}

// KV cache: paged (page sizes 1, 4, 64) or dense with cache_batch_idx, leftpad, appended
// k/v, rotary; plain call, forced splits and a plan from plan_kvcache.
void check_kvcache(int page_size, bool rotary, DType dt, int s_q, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const int b = 3, h = 8, h_k = 2, d = 64, d_v = 64, s_new = 3, s_cache = 160;
  const std::vector<std::int32_t> seqlens = {150, 0, 77};
  const std::vector<std::int32_t> leftpad = {10, 0, 3};
  const std::vector<std::int32_t> batch_idx = {2, 0, 1};
  const bool paged = page_size > 0;
  const int max_pages = paged ? (s_cache + page_size - 1) / page_size : 0;
  const int num_blocks = paged ? b * max_pages + 2 : 0;
  const std::size_t cache_rows = paged ? static_cast<std::size_t>(num_blocks) * page_size
                                       : static_cast<std::size_t>(b) * s_cache;
  std::vector<std::int32_t> page_table;
  if (paged) {  // a shuffled block assignment
    std::vector<std::int32_t> blocks(static_cast<std::size_t>(num_blocks));
    for (int i = 0; i < num_blocks; ++i) blocks[static_cast<std::size_t>(i)] = i;
    std::shuffle(blocks.begin(), blocks.end(), rng);
    page_table.assign(blocks.begin(), blocks.begin() + b * max_pages);
  }
  const auto q = random_tensor(static_cast<std::size_t>(b) * s_q * h * d, dt, rng);
  auto k_cache0 = random_tensor(cache_rows * h_k * d, dt, rng);
  auto v_cache0 = random_tensor(cache_rows * h_k * d_v, dt, rng);
  const auto k_new = random_tensor(static_cast<std::size_t>(b) * s_new * h_k * d, dt, rng);
  const auto v_new = random_tensor(static_cast<std::size_t>(b) * s_new * h_k * d_v, dt, rng);
  std::vector<float> cos_t, sin_t;
  const int rot_dim = 32, s_rot = s_cache + 64;
  if (rotary) {
    for (int pos = 0; pos < s_rot; ++pos)
      for (int i = 0; i < rot_dim / 2; ++i) {
        const double th = pos * std::pow(10000.0, -2.0 * i / rot_dim);
        cos_t.push_back(static_cast<float>(std::cos(th)));
        sin_t.push_back(static_cast<float>(std::sin(th)));
      }
  }

  KvCacheParams p;
  p.dtype = dt;
  p.q = q.data();
  p.k_new = k_new.data();
  p.v_new = v_new.data();
  p.b = b;
  p.s_q = s_q;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.d_v = d_v;
  p.s_new = s_new;
  if (paged) {
    p.page_table = page_table.data();
    p.num_blocks = num_blocks;
    p.page_size = page_size;
    p.max_pages = max_pages;
  } else {
    p.b_cache = b;
    p.s_cache = s_cache;
    p.cache_batch_idx = batch_idx.data();
  }
  set_contiguous_strides(p);
  p.cache_seqlens = seqlens.data();
  p.cache_leftpad = leftpad.data();
  if (rotary) {
    p.rotary_cos = cos_t.data();
    p.rotary_sin = sin_t.data();
    p.rotary_dim = rot_dim;
    p.s_rotary = s_rot;
  }
  p.mask.causal = true;

  struct Result {
    std::vector<float> out, lse;
    std::vector<std::uint8_t> k_cache, v_cache;
  };
  auto run = [&](const std::string& be, const std::string& order, int splits, bool use_plan) {
    Result r{std::vector<float>(static_cast<std::size_t>(b) * s_q * h * d_v, kNaN),
             std::vector<float>(static_cast<std::size_t>(b) * h * s_q, kNaN), k_cache0, v_cache0};
    KvCacheParams pp = p;
    pp.k_cache = r.k_cache.data();
    pp.v_cache = r.v_cache.data();
    pp.out = r.out.data();
    pp.lse = r.lse.data();
    pp.num_splits = splits;
    const Engine engine(EngineOptions{be, 2, order});
    SchedulerMetadata plan;
    if (use_plan) {
      plan = engine.plan_kvcache(pp);
      EXPECT_EQ(plan.num_splits.size(), static_cast<std::size_t>(b));
      for (std::int32_t n : plan.num_splits) EXPECT_GE(n, 1);
      pp.plan = &plan;
    }
    engine.forward_kvcache(pp);
    return r;
  };
  const Result ref = run("reference", "auto", 0, false);
  for (const std::string& be : cpu_backends()) {
    for (int mode = 0; mode < 6; ++mode) {
      const char* order = kDecodeOrders[mode / 3];
      const Result r = run(be, order, mode % 3 == 1 ? 3 : 0, mode % 3 == 2);
      const std::string what = be + " " + order + " page" + std::to_string(page_size) +
                               (rotary ? " rotary" : "") + " s_q" + std::to_string(s_q) + " mode" +
                               std::to_string(mode);
      expect_close(r.out, ref.out, with_p_rounding(2e-5, be, dt, {&v_cache0, &v_new}),
                   what + " out");
      expect_close(r.lse, ref.lse, 1e-5, what + " lse");
      EXPECT_EQ(r.k_cache, ref.k_cache) << what << " appended k_cache differs";
      EXPECT_EQ(r.v_cache, ref.v_cache) << what << " appended v_cache differs";
    }
  }
}

TEST(CpuBackend, KvCachePagedDecode) {
  check_kvcache(1, false, DType::kF32, 1, 11);
  check_kvcache(4, true, DType::kBF16, 1, 12);
  check_kvcache(64, false, DType::kF16, 2, 13);
}

TEST(CpuBackend, KvCacheDenseBatchIdxPrefill) {
  check_kvcache(0, true, DType::kF32, 40, 14);
  check_kvcache(0, false, DType::kBF16, 1, 15);
}

TEST(CpuBackend, PlanUsesEveryThreadForDecode) {
  // One long sequence, one KV head: only key splits can feed several threads.
  const int s_cache = 32768, d = 64;
  std::vector<std::int32_t> seqlens = {s_cache};
  std::vector<std::uint16_t> q(4 * d), cache(static_cast<std::size_t>(s_cache) * d), out(4 * d);
  KvCacheParams p;
  p.dtype = p.out_dtype = DType::kBF16;
  p.b = 1;
  p.s_q = 1;
  p.h = 4;
  p.h_k = 1;
  p.d = p.d_v = d;
  p.q = q.data();
  p.k_cache = p.v_cache = cache.data();
  p.out = out.data();
  p.q_head_stride = p.out_head_stride = d;
  p.q_row_stride = p.q_batch_stride = p.out_row_stride = p.out_batch_stride = 4 * d;
  p.k_cache_head_stride = p.v_cache_head_stride = d;
  p.k_cache_row_stride = p.v_cache_row_stride = d;
  p.k_cache_batch_stride = p.v_cache_batch_stride = std::int64_t{s_cache} * d;
  p.cache_seqlens = seqlens.data();
  p.b_cache = 1;
  p.s_cache = s_cache;
  const SchedulerMetadata plan = Engine(EngineOptions{"cpu", 8}).plan_kvcache(p);
  ASSERT_EQ(plan.num_splits.size(), 1u);
  EXPECT_GE(plan.num_splits[0], 8);
}

// FwdParams::progress: the hook runs on the calling thread only, while the kernel works
// (prefill and decode shapes, 1 and 2 threads, every backend) and changes nothing in
// the results (bit-identical to the same call without it).
TEST(CpuBackend, ProgressHookRunsOnCallerAndChangesNothing) {
  std::vector<std::string> backends = cpu_backends();
  backends.push_back("reference");
  std::mt19937 rng(7);
  for (const int s_q : {1, 300}) {
    const int s_k = 700, h = 4, h_k = 2, d = 64;
    const auto q = random_tensor(static_cast<std::size_t>(s_q) * h * d, DType::kF32, rng);
    const auto k = random_tensor(static_cast<std::size_t>(s_k) * h_k * d, DType::kF32, rng);
    const auto v = random_tensor(static_cast<std::size_t>(s_k) * h_k * d, DType::kF32, rng);
    for (const std::string& be : backends)
      for (const int threads : {1, 2}) {
        SCOPED_TRACE(be + " s_q=" + std::to_string(s_q) + " threads=" + std::to_string(threads));
        FwdParams p = dense_params(
            {1, s_q, s_k, h, h_k, d, d, DType::kF32, true, -1, -1, 0.0f, 0, DType::kF32}, q.data(),
            k.data(), v.data());
        std::vector<float> plain(static_cast<std::size_t>(s_q) * h * d, kNaN), hooked = plain;
        std::vector<float> lse_plain(static_cast<std::size_t>(h) * s_q, kNaN),
            lse_hooked = lse_plain;
        const Engine engine(EngineOptions{be, threads});
        p.out = plain.data();
        p.lse = lse_plain.data();
        engine.forward(p);
        struct Count {
          int calls = 0;
          std::thread::id caller = std::this_thread::get_id();
          bool other_thread = false;
        } count;
        p.progress.fn = [](void* ctx) {
          auto* c = static_cast<Count*>(ctx);
          ++c->calls;
          if (std::this_thread::get_id() != c->caller) c->other_thread = true;
        };
        p.progress.ctx = &count;
        p.progress.interval_us = 0;
        p.out = hooked.data();
        p.lse = lse_hooked.data();
        engine.forward(p);
        // With 2 threads the other thread may take every work item of a tiny problem.
        if (threads == 1) {
          EXPECT_GT(count.calls, 0);
        }
        EXPECT_FALSE(count.other_thread);
        EXPECT_EQ(0, std::memcmp(plain.data(), hooked.data(), plain.size() * sizeof(float)));
        EXPECT_EQ(
            0, std::memcmp(lse_plain.data(), lse_hooked.data(), lse_plain.size() * sizeof(float)));
      }
  }
}

// One engine shared by several threads: the backend's scratch pool hands each call its
// own buffers (packed K/V, split partials), so concurrent prefill and split-KV decode
// calls of different sizes give exactly the single-threaded results.
TEST(CpuBackend, SharedEngineConcurrentCallsGetOwnScratch) {
  struct Problem {
    int s_q, s_k;
    std::vector<std::uint8_t> q, k, v;
    std::vector<float> expect;
  };
  const int h = 4, h_k = 2, d = 64;
  std::mt19937 rng(11);
  std::vector<Problem> probs;
  for (const auto& [s_q, s_k] : std::vector<std::pair<int, int>>{{300, 700}, {1, 5000}, {500, 260}})
    probs.push_back({s_q,
                     s_k,
                     random_tensor(static_cast<std::size_t>(s_q) * h * d, DType::kF32, rng),
                     random_tensor(static_cast<std::size_t>(s_k) * h_k * d, DType::kF32, rng),
                     random_tensor(static_cast<std::size_t>(s_k) * h_k * d, DType::kF32, rng),
                     {}});
  const Engine engine(EngineOptions{"cpu", 1});
  const auto run = [&](const Problem& pr, std::vector<float>& out) {
    FwdParams p = dense_params({1, pr.s_q, pr.s_k, h, h_k, d, d, DType::kF32, false, -1, -1, 0.0f,
                                pr.s_q == 1 ? 6 : 0, DType::kF32},
                               pr.q.data(), pr.k.data(), pr.v.data());
    out.assign(static_cast<std::size_t>(pr.s_q) * h * d, kNaN);
    p.out = out.data();
    engine.forward(p);
  };
  for (Problem& pr : probs) run(pr, pr.expect);
  std::vector<int> mismatches(6, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < 6; ++t)
    pool.emplace_back([&, t] {
      std::vector<float> out;
      for (int it = 0; it < 10; ++it) {
        const Problem& pr = probs[static_cast<std::size_t>((t + it) % 3)];
        run(pr, out);
        if (std::memcmp(out.data(), pr.expect.data(), out.size() * sizeof(float)) != 0)
          ++mismatches[static_cast<std::size_t>(t)];
      }
    });
  for (std::thread& th : pool) th.join();
  for (int t = 0; t < 6; ++t)
    EXPECT_EQ(mismatches[static_cast<std::size_t>(t)], 0) << "thread " << t;
}

}  // namespace
}  // namespace ringattn
