// Helpers shared by the kernel test grids: strided host tensors in any storage
// dtype, random fills, NaN poisoning, reading results back as double, and the
// tolerance check of docs/semantics.md section 6 (the "pt" rule).
//
// Random inputs are fresh on every run: the base seed comes from the environment
// variable RINGATTN_TEST_SEED when set, otherwise from std::random_device, and
// every failure message prints it so that a failing run can be replayed.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "ringattn/attention_params.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"

namespace ringattn::test {

// Base seed of this process (printed in every failure message).
inline std::uint64_t base_seed() {
  static const std::uint64_t seed = [] {
    if (const char* env = std::getenv("RINGATTN_TEST_SEED")) {
      return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 10));
    }
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }();
  return seed;
}

// Seed for one named case: the same case gets the same inputs on every backend
// within a run, different cases get independent inputs.
inline std::uint64_t case_seed(const std::string& name) {
  return base_seed() ^ (std::hash<std::string>{}(name)*0x9e3779b97f4a7c15ull);
}

inline std::string seed_note() {
  return "(replay with RINGATTN_TEST_SEED=" + std::to_string(base_seed()) + ")";
}

// gtest parameter names allow only [A-Za-z0-9_].
inline std::string sanitize_name(std::string s) {
  for (char& c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return s;
}

// Backends this machine can run, as gtest parameter values.
inline std::vector<std::string> test_backends() { return available_backends(); }

// A strided tensor in host memory. Strides are in elements; the storage covers the
// whole strided extent, and every element not inside the logical shape (padding)
// holds NaN so that a kernel reading padding produces NaN and fails the check.
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  std::vector<unsigned char> bytes;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  std::int64_t storage_elems() const {
    return static_cast<std::int64_t>(bytes.size() / dtype_size(dtype));
  }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  std::int64_t stride(std::size_t i) const { return strides.at(i); }

  // Element offset of logical (row-major) index `flat`.
  std::int64_t offset_of(std::int64_t flat) const {
    std::int64_t off = 0;
    for (std::size_t i = shape.size(); i-- > 0;) {
      const std::int64_t idx = flat % shape[i];
      flat /= shape[i];
      off += idx * strides[i];
    }
    return off;
  }
  double get_at(std::int64_t off) const { return load_as_f32(bytes.data(), off, dtype); }
  void set_at(std::int64_t off, double v) {
    store_from_f32(bytes.data(), off, dtype, static_cast<float>(v));
  }
  // Value at logical index `flat`, as double.
  double get(std::int64_t flat) const { return get_at(offset_of(flat)); }

  // All storage (padding too) set to NaN.
  void poison() {
    for (std::int64_t i = 0; i < storage_elems(); ++i) {
      store_from_f32(bytes.data(), i, dtype, std::numeric_limits<float>::quiet_NaN());
    }
  }

  // Logical elements as double, row-major.
  std::vector<double> to_double() const {
    std::vector<double> out(static_cast<std::size_t>(numel()));
    for (std::int64_t i = 0; i < numel(); ++i) out[i] = get(i);
    return out;
  }
};

// Strides of a dense call from its [b, s, h, x] tensors (padded or not): q, k, v, out.
inline void set_strides(FwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out) {
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
}

// Tensor of `shape`, row-major, with the second-to-last dim's stride padded by
// `pad` elements (pad = 0: contiguous). The whole storage starts as NaN.
inline Tensor make_tensor(DType dtype, std::vector<std::int64_t> shape, std::int64_t pad = 0) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.strides.assign(t.shape.size(), 1);
  std::int64_t extent = 1;
  for (std::size_t i = t.shape.size(); i-- > 0;) {
    t.strides[i] = extent;
    std::int64_t len = t.shape[i];
    if (i + 1 == t.shape.size() && t.shape.size() >= 2) len += pad;
    extent *= std::max<std::int64_t>(len, 1);
  }
  t.bytes.resize(static_cast<std::size_t>(extent) * dtype_size(dtype));
  t.poison();
  return t;
}

// Fills the logical elements with N(0, sigma^2) values rounded to the storage dtype.
inline void fill_normal(Tensor& t, std::mt19937_64& rng, double sigma = 1.0) {
  std::normal_distribution<double> dist(0.0, sigma);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set_at(t.offset_of(i), dist(rng));
}

inline void poison(std::vector<float>& v) {
  std::fill(v.begin(), v.end(), std::numeric_limits<float>::quiet_NaN());
}

// Decomposes a flat row-major index into "[i0, i1, ...]".
inline std::string index_string(std::int64_t flat, const std::vector<std::int64_t>& dims) {
  std::vector<std::int64_t> idx(dims.size());
  for (std::size_t i = dims.size(); i-- > 0;) {
    idx[i] = dims[i] > 0 ? flat % dims[i] : 0;
    flat = dims[i] > 0 ? flat / dims[i] : 0;
  }
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < idx.size(); ++i) os << (i ? ", " : "") << idx[i];
  os << "]";
  return os.str();
}

// Absolute tolerance for outputs stored in `out_dtype` with values of magnitude up
// to `ref_max`: fp32 accumulation error (~1e-5 relative) on top of the pt bar.
inline double output_atol(DType out_dtype, double ref_max) {
  const double mag = std::max(1.0, ref_max);
  switch (out_dtype) {
    case DType::kF32:
      return 1e-5 * mag;
    case DType::kBF16:
      return 1e-5 * mag + std::ldexp(mag, -10);
    case DType::kF16:
      return 1e-5 * mag + std::ldexp(mag, -13);
    default:
      return 1e-3 * mag;
  }
}

// Backends that round the softmax weights P to bf16 before P V, as FlashAttention-3
// does: the matrix engines on bf16 storage and the fp8 decode engine on fp8 e4m3
// storage, cpu-amx and cpu-avx512-bf16 (docs/cpu-backend.md). Each weight p_j / l then
// moves by at most 2^-8 relative (round to nearest even), so an output element by at
// most 2^-8 * max|v| over the row's visible values beyond the fp32 bar of the pt rule
// (products of bf16 values are exact in fp32; for fp8, v is the dequantised value, i.e.
// times v_descale). 0 for every other backend and dtype.
inline double p_rounding_atol(const std::string& backend, DType storage, double v_max) {
  const bool engine = backend == "cpu-amx" || backend == "cpu-avx512-bf16";
  // fp8: only cpu-avx512-bf16's vdpbf16ps decode rounds P (cpu-amx runs fp8 in fp32).
  const bool rounds =
      storage == DType::kBF16 || (storage == DType::kFP8E4M3 && backend == "cpu-avx512-bf16");
  return engine && rounds ? std::ldexp(v_max, -8) : 0.0;
}
inline double p_rounding_atol(const std::string& backend, DType storage, const Tensor& v) {
  if (p_rounding_atol(backend, storage, 1.0) == 0.0 || v.shape.empty()) return 0.0;
  double m = 0.0;
  for (double x : v.to_double())
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));  // NaN poison skipped
  return p_rounding_atol(backend, storage, m);
}

// docs/semantics.md section 6, pt rule: max|got - ref| <= 2 * max|lowprec - ref| + atol
// (+ extra_atol: p_rounding_atol of the backend).
// Elements whose reference is NaN are "don't care" (e.g. rows past seqused_q) and
// skipped; any other NaN in `got` (an unwritten, poisoned element) fails. On
// failure the message names the worst element and its index in `dims`.
inline ::testing::AssertionResult check_pt_rule(const std::string& what,
                                                const std::vector<double>& got,
                                                const std::vector<double>& ref,
                                                const std::vector<double>& lowprec,
                                                const std::vector<std::int64_t>& dims,
                                                DType out_dtype, double extra_atol = 0.0) {
  if (got.size() != ref.size() || lowprec.size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": size mismatch " << got.size() << " / "
                                         << ref.size() << " / " << lowprec.size();
  }
  double ref_max = 0.0, low_err = 0.0, err = 0.0;
  std::int64_t worst = -1, nan_at = -1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(ref[i])) continue;
    ref_max = std::max(ref_max, std::fabs(ref[i]));
    low_err = std::max(low_err, std::fabs(lowprec[i] - ref[i]));
    if (!std::isfinite(got[i])) {
      if (nan_at < 0) nan_at = static_cast<std::int64_t>(i);
      continue;
    }
    const double e = std::fabs(got[i] - ref[i]);
    if (worst < 0 || e > err) {
      err = e;
      worst = static_cast<std::int64_t>(i);
    }
  }
  const double tol = 2.0 * low_err + output_atol(out_dtype, ref_max) + extra_atol;
  if (nan_at >= 0) {
    return ::testing::AssertionFailure()
           << what << ": non-finite value " << got[nan_at] << " at " << index_string(nan_at, dims)
           << " (ref " << ref[nan_at] << "; element unwritten or NaN produced) " << seed_note();
  }
  if (err > tol) {
    return ::testing::AssertionFailure()
           << what << ": max|out - ref| = " << err << " > tol " << tol << " (2 * lowprec err "
           << low_err << " + atol) at " << index_string(worst, dims) << ": got " << got[worst]
           << ", ref " << ref[worst] << ", lowprec " << lowprec[worst] << " " << seed_note();
  }
  return ::testing::AssertionSuccess();
}

// LSE check: -inf must match exactly (fully masked rows), finite values within
// 1e-5 relative (fp32). NaN in `ref` = don't care.
inline ::testing::AssertionResult check_lse(const std::string& what, const std::vector<double>& got,
                                            const std::vector<double>& ref,
                                            const std::vector<std::int64_t>& dims,
                                            double rtol = 1e-5) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": size mismatch";
  }
  double worst_ratio = 0.0;
  std::int64_t worst = -1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(ref[i])) continue;
    const auto idx = static_cast<std::int64_t>(i);
    if (std::isinf(ref[i]) || !std::isfinite(got[i])) {
      if (got[i] != ref[i]) {
        return ::testing::AssertionFailure()
               << what << " at " << index_string(idx, dims) << ": got " << got[i] << ", ref "
               << ref[i] << " " << seed_note();
      }
      continue;
    }
    const double tol = rtol * std::max(1.0, std::fabs(ref[i]));
    const double ratio = std::fabs(got[i] - ref[i]) / tol;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = idx;
    }
  }
  if (worst_ratio > 1.0) {
    return ::testing::AssertionFailure()
           << what << ": |lse - ref| beyond " << rtol << " relative at "
           << index_string(worst, dims) << ": got " << got[worst] << ", ref " << ref[worst] << " "
           << seed_note();
  }
  return ::testing::AssertionSuccess();
}

// Two results of the same computation (e.g. different split counts) agree to
// rounding: max|a - b| <= tol_rel * max(1, max|b|); NaN in either fails.
inline ::testing::AssertionResult check_same_to_rounding(const std::string& what,
                                                         const std::vector<double>& a,
                                                         const std::vector<double>& b,
                                                         const std::vector<std::int64_t>& dims,
                                                         double tol_rel) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << what << ": size mismatch";
  double mag = 0.0;
  for (double x : b) {
    if (std::isfinite(x)) mag = std::max(mag, std::fabs(x));
  }
  const double tol = tol_rel * std::max(1.0, mag);
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto idx = static_cast<std::int64_t>(i);
    const bool same_special = (std::isinf(a[i]) || std::isinf(b[i])) && a[i] == b[i];
    if (same_special) continue;
    if (std::isnan(a[i]) || std::isnan(b[i]) || !(std::fabs(a[i] - b[i]) <= tol)) {
      return ::testing::AssertionFailure()
             << what << " at " << index_string(idx, dims) << ": " << a[i] << " vs " << b[i]
             << " (tol " << tol << ") " << seed_note();
    }
  }
  return ::testing::AssertionSuccess();
}

// Attention-sink logits for h heads covering every regime: no sink (-inf), a sink
// that removes everything (+inf), and finite sinks below, near and above typical LSEs.
inline std::vector<float> test_sinks(int h) {
  const float inf = std::numeric_limits<float>::infinity();
  const float pattern[] = {0.5f, -inf, 3.0f, inf, 6.0f, -2.0f, 1.5f, 9.0f};
  std::vector<float> s(static_cast<std::size_t>(h));
  for (int i = 0; i < h; ++i) s[static_cast<std::size_t>(i)] = pattern[i % 8];
  return s;
}

// ---- KV-cache problems (docs/semantics.md section 3), shared by test_kvcache / test_split_kv ----

struct KvCase {
  std::string name;
  DType dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  int h = 6, h_k = 2, d = 32, d_v = 32;
  int s_q = 1;
  int s_new = 0;               // appended rows (0 = none)
  std::vector<int> seqlens;    // [b] cache_seqlens
  std::vector<int> leftpad;    // [b] or empty
  std::vector<int> batch_idx;  // [b] or empty
  int b_cache = 0;             // dense cache rows (0 = b)
  int page_size = 0;           // 0 = dense cache
  int extra_capacity = 5;      // free slots past the longest sequence
  int rotary = 0;              // 0 none, 1 interleaved, 2 half-split
  int rotary_dim = 0;          // 0 = d
  bool causal = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.0f;
  std::vector<float> sinks;  // [h] attention-sink logits or empty
  int chunk = 0;             // attention_chunk (0 = off)
  // attention_chunk positions (MaskParams::chunk_q_pos / chunk_k_pos, [b] each) or empty.
  std::vector<std::int64_t> chunk_q_pos, chunk_k_pos;
  int chunk_stride = 1;
  // Variable lengths (FA3 cu_seqlens_q / cu_seqlens_k_new), [b] each or empty: query rows
  // and new keys per sequence; q / out become [total_q, h, *], k_new / v_new
  // [total_new, h_k, *]; s_q / s_new are then taken as the maxima.
  std::vector<int> q_lens, new_lens;
  std::vector<int> rotary_seqlens;  // [b] FA3 rotary_seqlens or empty
  bool qv = false;                  // FA3 qv [b, s_q, h, d_v] (or [total_q, h, d_v])
  std::int64_t qv_pad = 0;          // extra elements after each qv head vector (NaN)
};

inline std::ostream& operator<<(std::ostream& os, const KvCase& c) { return os << c.name; }

// Inputs of one KV-cache case. Every cache slot that is not valid input (before
// leftpad, past cache_seqlens, unused pages and rows) holds NaN, so reading one
// poisons the output.
struct KvProblem {
  Tensor q, k_cache, v_cache, k_new, v_new, out, qv;
  std::vector<float> lse, cos, sin;
  std::vector<std::int32_t> seqlens, leftpad, batch_idx, page_table, cu_q, cu_new, rot_seqlens;
  std::vector<std::int64_t> chunk_q_pos, chunk_k_pos;
  KvCacheParams p;
  // Dims of out and lse for messages: [b, s_q, h, d_v] / [b, h, s_q], or with varlen
  // queries [1, total_q, h, d_v] / [1, h, total_q].
  std::vector<std::int64_t> out_dims, lse_dims;
};

// p_rounding_atol over the values of a KV cache problem (cache and appended rows).
inline double p_rounding_atol(const std::string& backend, const KvProblem& pr) {
  return std::max(p_rounding_atol(backend, pr.p.dtype, pr.v_cache),
                  p_rounding_atol(backend, pr.p.dtype, pr.v_new));
}

inline KvProblem make_kv_problem(const KvCase& c) {
  KvProblem pr;
  const int b = static_cast<int>(c.seqlens.size());
  std::mt19937_64 rng(case_seed(c.name));
  const bool vq = !c.q_lens.empty(), vk = !c.new_lens.empty();
  const auto new_of = [&](int i) { return vk ? c.new_lens[static_cast<std::size_t>(i)] : c.s_new; };
  int s_q = c.s_q, s_new = c.s_new;
  if (vq) s_q = *std::max_element(c.q_lens.begin(), c.q_lens.end());
  if (vk) s_new = *std::max_element(c.new_lens.begin(), c.new_lens.end());
  int longest = 0;
  for (int i = 0; i < b; ++i) longest = std::max(longest, c.seqlens[i] + new_of(i));
  const int capacity = longest + c.extra_capacity;
  pr.seqlens.assign(c.seqlens.begin(), c.seqlens.end());
  pr.leftpad.assign(c.leftpad.begin(), c.leftpad.end());
  pr.batch_idx.assign(c.batch_idx.begin(), c.batch_idx.end());
  KvCacheParams& p = pr.p;
  const bool paged = c.page_size > 0;
  std::int64_t cache_rows, cache_len;  // dim 0 and 1 of the cache tensors
  if (paged) {
    // Blocks of all sequences, shuffled; the last block is a spare that stays NaN
    // and fills the page-table entries no token uses.
    const int max_pages = (capacity + c.page_size - 1) / c.page_size;
    int needed = 0;
    for (int i = 0; i < b; ++i)
      needed += (c.seqlens[i] + new_of(i) + c.page_size - 1) / c.page_size;
    const int num_blocks = needed + 2;
    std::vector<std::int32_t> pool(static_cast<std::size_t>(num_blocks - 1));
    for (int i = 0; i < num_blocks - 1; ++i) pool[i] = i;
    std::shuffle(pool.begin(), pool.end(), rng);
    pr.page_table.assign(static_cast<std::size_t>(b) * max_pages, num_blocks - 1);
    std::size_t next = 0;
    for (int i = 0; i < b; ++i) {
      const int pages = (c.seqlens[i] + new_of(i) + c.page_size - 1) / c.page_size;
      for (int pg = 0; pg < pages; ++pg) pr.page_table[i * max_pages + pg] = pool[next++];
    }
    cache_rows = num_blocks;
    cache_len = c.page_size;
    p.page_table = pr.page_table.data();
    p.page_table_batch_stride = max_pages;
    p.num_blocks = num_blocks;
    p.page_size = c.page_size;
    p.max_pages = max_pages;
  } else {
    cache_rows = c.b_cache > 0 ? c.b_cache : b;
    cache_len = capacity;
    p.b_cache = static_cast<int>(cache_rows);
    p.s_cache = capacity;
  }
  pr.k_cache = make_tensor(c.dtype, {cache_rows, cache_len, c.h_k, c.d});
  pr.v_cache = make_tensor(c.dtype, {cache_rows, cache_len, c.h_k, c.d_v});
  std::normal_distribution<double> dist(0.0, 1.0);
  for (int i = 0; i < b; ++i) {
    const int row = c.batch_idx.empty() ? i : c.batch_idx[i];
    const int lp = c.leftpad.empty() ? 0 : c.leftpad[i];
    for (int t = lp; t < c.seqlens[i]; ++t) {
      std::int64_t base_k, base_v;
      if (paged) {
        const std::int32_t blk = pr.page_table[row * p.max_pages + t / c.page_size];
        base_k = blk * pr.k_cache.stride(0) + (t % c.page_size) * pr.k_cache.stride(1);
        base_v = blk * pr.v_cache.stride(0) + (t % c.page_size) * pr.v_cache.stride(1);
      } else {
        base_k = row * pr.k_cache.stride(0) + t * pr.k_cache.stride(1);
        base_v = row * pr.v_cache.stride(0) + t * pr.v_cache.stride(1);
      }
      for (std::int64_t e = 0; e < std::int64_t{c.h_k} * c.d; ++e)
        pr.k_cache.set_at(base_k + e, dist(rng));
      for (std::int64_t e = 0; e < std::int64_t{c.h_k} * c.d_v; ++e)
        pr.v_cache.set_at(base_v + e, dist(rng));
    }
  }
  std::int64_t total_q = std::int64_t{b} * s_q, total_new = 0;
  if (vq) {
    pr.cu_q.assign(1, 0);
    for (int n : c.q_lens) pr.cu_q.push_back(pr.cu_q.back() + n);
    total_q = pr.cu_q.back();
    p.cu_seqlens_q = pr.cu_q.data();
  }
  if (vk) {
    pr.cu_new.assign(1, 0);
    for (int n : c.new_lens) pr.cu_new.push_back(pr.cu_new.back() + n);
    total_new = pr.cu_new.back();
    p.cu_seqlens_k_new = pr.cu_new.data();
  }
  // Varlen tensors are [total, heads, dim]: a leading dim of 1 keeps the stride layout.
  pr.q =
      vq ? make_tensor(c.dtype, {1, total_q, c.h, c.d}) : make_tensor(c.dtype, {b, s_q, c.h, c.d});
  fill_normal(pr.q, rng);
  if (s_new > 0) {
    pr.k_new = vk ? make_tensor(c.dtype, {1, total_new, c.h_k, c.d})
                  : make_tensor(c.dtype, {b, s_new, c.h_k, c.d});
    pr.v_new = vk ? make_tensor(c.dtype, {1, total_new, c.h_k, c.d_v})
                  : make_tensor(c.dtype, {b, s_new, c.h_k, c.d_v});
    fill_normal(pr.k_new, rng);
    fill_normal(pr.v_new, rng);
    p.k_new = pr.k_new.data();
    p.v_new = pr.v_new.data();
    p.k_new_batch_stride = pr.k_new.stride(0);
    p.k_new_row_stride = pr.k_new.stride(1);
    p.k_new_head_stride = pr.k_new.stride(2);
    p.v_new_batch_stride = pr.v_new.stride(0);
    p.v_new_row_stride = pr.v_new.stride(1);
    p.v_new_head_stride = pr.v_new.stride(2);
  }
  pr.out = vq ? make_tensor(c.out_dtype, {1, total_q, c.h, c.d_v})
              : make_tensor(c.out_dtype, {b, s_q, c.h, c.d_v});
  pr.lse.assign(static_cast<std::size_t>(total_q) * c.h, 0.0f);
  pr.out_dims = vq ? std::vector<std::int64_t>{1, total_q, c.h, c.d_v}
                   : std::vector<std::int64_t>{b, s_q, c.h, c.d_v};
  pr.lse_dims =
      vq ? std::vector<std::int64_t>{1, c.h, total_q} : std::vector<std::int64_t>{b, c.h, s_q};
  if (c.rotary != 0) {
    // Standard RoPE tables: angle(pos, i) = pos * 10000^(-2i / rotary_dim).
    const int rd = c.rotary_dim > 0 ? c.rotary_dim : c.d;
    int rot_extra = 0;  // rotary_seqlens may point past the cache
    for (int r : c.rotary_seqlens) rot_extra = std::max(rot_extra, r);
    const int s_rot = capacity + s_q + rot_extra;
    pr.cos.resize(static_cast<std::size_t>(s_rot) * rd / 2);
    pr.sin.resize(pr.cos.size());
    for (int pos = 0; pos < s_rot; ++pos) {
      for (int i = 0; i < rd / 2; ++i) {
        const double ang = pos * std::pow(10000.0, -2.0 * i / rd);
        pr.cos[static_cast<std::size_t>(pos) * (rd / 2) + i] = static_cast<float>(std::cos(ang));
        pr.sin[static_cast<std::size_t>(pos) * (rd / 2) + i] = static_cast<float>(std::sin(ang));
      }
    }
    p.rotary_cos = pr.cos.data();
    p.rotary_sin = pr.sin.data();
    p.rotary_dim = rd;
    p.s_rotary = s_rot;
    p.rotary_interleaved = c.rotary == 1;
    if (!c.rotary_seqlens.empty()) {
      pr.rot_seqlens.assign(c.rotary_seqlens.begin(), c.rotary_seqlens.end());
      p.rotary_seqlens = pr.rot_seqlens.data();
    }
  }
  p.dtype = c.dtype;
  p.out_dtype = c.out_dtype;
  p.q = pr.q.data();
  p.k_cache = pr.k_cache.data();
  p.v_cache = pr.v_cache.data();
  p.out = pr.out.data();
  p.lse = pr.lse.data();
  p.q_batch_stride = pr.q.stride(0);
  p.q_row_stride = pr.q.stride(1);
  p.q_head_stride = pr.q.stride(2);
  p.k_cache_batch_stride = pr.k_cache.stride(0);
  p.k_cache_row_stride = pr.k_cache.stride(1);
  p.k_cache_head_stride = pr.k_cache.stride(2);
  p.v_cache_batch_stride = pr.v_cache.stride(0);
  p.v_cache_row_stride = pr.v_cache.stride(1);
  p.v_cache_head_stride = pr.v_cache.stride(2);
  p.out_batch_stride = pr.out.stride(0);
  p.out_row_stride = pr.out.stride(1);
  p.out_head_stride = pr.out.stride(2);
  p.b = b;
  p.s_q = s_q;
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  p.s_new = s_new;
  p.cache_seqlens = pr.seqlens.data();
  p.cache_leftpad = pr.leftpad.empty() ? nullptr : pr.leftpad.data();
  p.cache_batch_idx = pr.batch_idx.empty() ? nullptr : pr.batch_idx.data();
  p.mask.causal = c.causal;
  p.mask.window_left = c.window_left;
  p.mask.window_right = c.window_right;
  p.mask.softcap = c.softcap;
  p.mask.sinks = c.sinks.empty() ? nullptr : c.sinks.data();
  p.mask.attention_chunk = c.chunk;
  pr.chunk_q_pos = c.chunk_q_pos;
  pr.chunk_k_pos = c.chunk_k_pos;
  p.mask.chunk_q_pos = pr.chunk_q_pos.empty() ? nullptr : pr.chunk_q_pos.data();
  p.mask.chunk_k_pos = pr.chunk_k_pos.empty() ? nullptr : pr.chunk_k_pos.data();
  p.mask.chunk_stride = c.chunk_stride;
  if (c.qv) {  // drawn last: the other tensors stay those of the case without qv
    pr.qv = vq ? make_tensor(c.dtype, {1, total_q, c.h, c.d_v}, c.qv_pad)
               : make_tensor(c.dtype, {b, s_q, c.h, c.d_v}, c.qv_pad);
    fill_normal(pr.qv, rng);
    p.qv = pr.qv.data();
    p.qv_batch_stride = pr.qv.stride(0);
    p.qv_row_stride = pr.qv.stride(1);
    p.qv_head_stride = pr.qv.stride(2);
  }
  return pr;
}

// Tolerance for one output element of two runs of the same computation that may
// differ in summation order (splits, threads): fp32 rounding plus one unit of the
// out dtype's rounding.
inline double same_to_rounding_rtol(DType out_dtype) {
  switch (out_dtype) {
    case DType::kBF16:
      return std::ldexp(1.0, -7);
    case DType::kF16:
      return std::ldexp(1.0, -10);
    default:
      return 2e-5;
  }
}

}  // namespace ringattn::test
