// MLA decode (dense paged and sparse) against a float64 reference written here,
// over the MLA grid of docs/semantics.md section 6, for every MLA kernel path this machine
// runs (reference, cpu-scalar, cpu-avx2, and the matrix tiers cpu-avx512-bf16 / cpu-amx,
// whose bf16 path serves bf16 q with a bf16 cache; cpu-amx is skipped where the CPU
// lacks AMX). Unused cache slots hold NaN, outputs are
// poisoned with NaN, inputs are fresh random on every run (RINGATTN_TEST_SEED
// replays a run).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu_features.hpp"
#include "mla/mla_internal.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/mla_params.hpp"
#include "test_util.hpp"

namespace ringattn {
namespace {

std::uint64_t mla_seed() {
  static const std::uint64_t seed = [] {
    if (const char* env = std::getenv("RINGATTN_TEST_SEED"))
      return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 10));
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }();
  return seed;
}

std::string seed_note() {
  return " (replay with RINGATTN_TEST_SEED=" + std::to_string(mla_seed()) + ")";
}

constexpr int D = kMlaHeadDim;
constexpr int DV = kMlaValueDim;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Case {
  int b = 1, s_q = 1, h_q = 1, s_k = 20, page = 64;
  bool causal = false;
  DType q_dtype = DType::kF32;
  DType kv_dtype = DType::kF32;
  MlaCacheLayout layout = MlaCacheLayout::kDense576;
  int topk = 0;  // > 0: sparse
  std::string name() const {
    std::ostringstream os;
    os << "b" << b << "_sq" << s_q << "_h" << h_q << "_sk" << s_k << "_pg" << page
       << (causal ? "_causal" : "") << "_q" << dtype_name(q_dtype) << "_kv" << dtype_name(kv_dtype)
       << (layout == MlaCacheLayout::kFlashMlaFp8Packed656 ? "_packed" : "")
       << (topk > 0 ? "_topk" + std::to_string(topk) : "");
    return os.str();
  }
};

// Everything one decode call needs, plus the dequantised value of every slot.
struct Problem {
  Case c;
  std::vector<std::uint8_t> q;      // [b, s_q, h_q, 576] of q_dtype
  std::vector<double> q_val;        // same values as double
  std::vector<std::uint8_t> cache;  // [num_blocks, page, 576 | 656]
  std::vector<double> slot_val;     // [num_blocks * page, 576] (NaN where unused)
  std::vector<std::int32_t> block_table, seqlens, indices;
  int num_blocks = 0, max_blocks = 0;
  float k_scale = 1.0f;
  MlaDecodeParams params() {
    MlaDecodeParams p;
    p.q_dtype = c.q_dtype;
    p.kv_dtype = c.kv_dtype;
    p.cache_layout = c.layout;
    p.q = q.data();
    p.kv_cache = cache.data();
    p.b = c.b;
    p.s_q = c.s_q;
    p.h_q = c.h_q;
    p.num_blocks = num_blocks;
    p.page_size = c.page;
    p.max_blocks = max_blocks;
    p.block_table = block_table.data();
    p.cache_seqlens = seqlens.data();
    p.causal = c.causal;
    if (c.topk > 0) {
      p.indices = indices.data();
      p.topk = c.topk;
    }
    const float sm = 1.0f / std::sqrt(192.0f);
    if (c.kv_dtype == DType::kFP8E4M3 && c.layout == MlaCacheLayout::kDense576) {
      p.bmm1_scale = sm * k_scale;
      p.bmm2_scale = k_scale;
    } else {
      p.scale = sm;
    }
    return p;
  }
};

void put_value(std::uint8_t* base, std::int64_t i, DType t, float v) {
  store_from_f32(base, i, t, v);
}

Problem make_problem(const Case& c, std::uint64_t salt = 0) {
  Problem pb;
  pb.c = c;
  std::mt19937_64 rng(mla_seed() ^ std::hash<std::string>{}(c.name()) ^ salt);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  // Query.
  const std::int64_t nq = static_cast<std::int64_t>(c.b) * c.s_q * c.h_q * D;
  pb.q.resize(nq * dtype_size(c.q_dtype));
  pb.q_val.resize(nq);
  for (std::int64_t i = 0; i < nq; ++i) {
    put_value(pb.q.data(), i, c.q_dtype, 3.0f * uni(rng));
    pb.q_val[i] = load_as_f32(pb.q.data(), i, c.q_dtype);
  }
  // Lengths: the first sequence has s_k tokens, the others random (>= s_q).
  pb.seqlens.resize(c.b);
  for (int i = 0; i < c.b; ++i) {
    std::uniform_int_distribution<int> len(std::max(c.s_q, c.s_k / 2), c.s_k);
    pb.seqlens[i] = i == 0 ? c.s_k : len(rng);
  }
  pb.max_blocks = (c.s_k + c.page - 1) / c.page + 1;
  int used = 0;
  for (int L : pb.seqlens) used += (L + c.page - 1) / c.page;
  pb.num_blocks = used + 3;
  // Blocks in shuffled order; unused table entries point nowhere valid.
  std::vector<std::int32_t> perm(pb.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  pb.block_table.assign(static_cast<std::size_t>(c.b) * pb.max_blocks, -7);
  int next = 0;
  for (int i = 0; i < c.b; ++i)
    for (int pg = 0; pg < (pb.seqlens[i] + c.page - 1) / c.page; ++pg)
      pb.block_table[static_cast<std::size_t>(i) * pb.max_blocks + pg] = perm[next++];
  // Cache: NaN everywhere, then the valid tokens.
  const bool packed = c.layout == MlaCacheLayout::kFlashMlaFp8Packed656;
  const std::int64_t slots = static_cast<std::int64_t>(pb.num_blocks) * c.page;
  const std::int64_t row_bytes = packed ? kMlaFp8PackedBytes : D * dtype_size(c.kv_dtype);
  pb.cache.resize(slots * row_bytes);
  pb.slot_val.assign(slots * D, std::nan(""));
  for (std::int64_t s = 0; s < slots; ++s) {
    std::uint8_t* t = pb.cache.data() + s * row_bytes;
    if (packed) {
      std::memset(t, 0x7f, kMlaValueDim);
      for (int k = 0; k < 4; ++k) std::memcpy(t + DV + 4 * k, &kNaN, 4);
      for (int k = 0; k < 64; ++k) put_value(t + DV + 16, k, DType::kBF16, kNaN);
    } else {
      for (int k = 0; k < D; ++k) put_value(t, k, c.kv_dtype, kNaN);
    }
  }
  pb.k_scale = 1.0f / 128.0f;
  auto write_token = [&](std::int64_t s) {
    std::uint8_t* t = pb.cache.data() + s * row_bytes;
    double* val = pb.slot_val.data() + s * D;
    float x[D];
    for (float& v : x) v = uni(rng);
    if (packed) {
      for (int tile = 0; tile < 4; ++tile) {
        float amax = 0.0f;
        for (int k = 128 * tile; k < 128 * (tile + 1); ++k) amax = std::max(amax, std::fabs(x[k]));
        const float sc = amax / 448.0f;
        std::memcpy(t + DV + 4 * tile, &sc, 4);
        for (int k = 128 * tile; k < 128 * (tile + 1); ++k) {
          t[k] = f32_to_fp8e4m3(x[k] / sc);
          val[k] = static_cast<double>(fp8e4m3_to_f32(t[k])) * sc;
        }
      }
      for (int k = 0; k < 64; ++k) {
        put_value(t + DV + 16, k, DType::kBF16, x[DV + k]);
        val[DV + k] = load_as_f32(t + DV + 16, k, DType::kBF16);
      }
    } else if (c.kv_dtype == DType::kFP8E4M3) {
      // Dense fp8 holds value / k_scale; the reference dequantises the same bytes.
      for (int k = 0; k < D; ++k) {
        t[k] = f32_to_fp8e4m3(x[k] / pb.k_scale);
        val[k] = static_cast<double>(fp8e4m3_to_f32(t[k])) * pb.k_scale;
      }
    } else {
      for (int k = 0; k < D; ++k) {
        put_value(t, k, c.kv_dtype, x[k]);
        val[k] = load_as_f32(t, k, c.kv_dtype);
      }
    }
  };
  for (int i = 0; i < c.b; ++i)
    for (int j = 0; j < pb.seqlens[i]; ++j)
      write_token(static_cast<std::int64_t>(
                      pb.block_table[static_cast<std::size_t>(i) * pb.max_blocks + j / c.page]) *
                      c.page +
                  j % c.page);
  // Sparse: each query token lists distinct random tokens of its sequence, padded with -1.
  if (c.topk > 0) {
    pb.indices.assign(static_cast<std::size_t>(c.b) * c.s_q * c.topk, -1);
    for (int i = 0; i < c.b; ++i)
      for (int s = 0; s < c.s_q; ++s) {
        std::vector<int> pos(pb.seqlens[i]);
        std::iota(pos.begin(), pos.end(), 0);
        std::shuffle(pos.begin(), pos.end(), rng);
        std::uniform_int_distribution<int> cnt(std::max(1, c.topk / 2), c.topk);
        const int n = std::min<int>(cnt(rng), pb.seqlens[i]);
        std::vector<int> at(c.topk);
        std::iota(at.begin(), at.end(), 0);
        std::shuffle(at.begin(), at.end(), rng);  // padding scattered through the row
        for (int k = 0; k < n; ++k) {
          const int j = pos[k];
          pb.indices[(static_cast<std::size_t>(i) * c.s_q + s) * c.topk + at[k]] =
              pb.block_table[static_cast<std::size_t>(i) * pb.max_blocks + j / c.page] * c.page +
              j % c.page;
        }
      }
  }
  return pb;
}

// float64 reference of docs/semantics.md section 4: [b, s_q, h_q, 512] and [b, h_q, s_q].
void reference(Problem& pb, std::vector<double>& out, std::vector<double>& lse) {
  const Case& c = pb.c;
  // Softmax scale 1/sqrt(192). The dense fp8 cache passes it inside bmm1_scale =
  // sm * k_scale applied to the stored values, i.e. sm on the dequantised values.
  const double sc = 1.0f / std::sqrt(192.0f);
  out.assign(static_cast<std::size_t>(c.b) * c.s_q * c.h_q * DV, 0.0);
  lse.assign(static_cast<std::size_t>(c.b) * c.h_q * c.s_q,
             -std::numeric_limits<double>::infinity());
  std::vector<double> s;
  for (int i = 0; i < c.b; ++i)
    for (int t = 0; t < c.s_q; ++t) {
      std::vector<std::int64_t> keys;
      if (c.topk > 0) {
        for (int k = 0; k < c.topk; ++k) {
          const int v = pb.indices[(static_cast<std::size_t>(i) * c.s_q + t) * c.topk + k];
          if (v >= 0) keys.push_back(v);
        }
      } else {
        const int L = pb.seqlens[i];
        const int n = c.causal ? L - c.s_q + t + 1 : L;
        for (int j = 0; j < n; ++j)
          keys.push_back(
              static_cast<std::int64_t>(
                  pb.block_table[static_cast<std::size_t>(i) * pb.max_blocks + j / c.page]) *
                  c.page +
              j % c.page);
      }
      for (int h = 0; h < c.h_q; ++h) {
        const double* q =
            pb.q_val.data() + ((static_cast<std::int64_t>(i) * c.s_q + t) * c.h_q + h) * D;
        s.assign(keys.size(), 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double* kv = pb.slot_val.data() + keys[j] * D;
          double dot = 0.0;
          for (int k = 0; k < D; ++k) dot += q[k] * kv[k];
          s[j] = dot * sc;
          mx = std::max(mx, s[j]);
        }
        if (keys.empty()) continue;
        double sum = 0.0;
        double* o = out.data() + ((static_cast<std::int64_t>(i) * c.s_q + t) * c.h_q + h) * DV;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double e = std::exp(s[j] - mx);
          sum += e;
          const double* kv = pb.slot_val.data() + keys[j] * D;
          for (int k = 0; k < DV; ++k) o[k] += e * kv[k];
        }
        for (int k = 0; k < DV; ++k) o[k] /= sum;
        lse[(static_cast<std::size_t>(i) * c.h_q + h) * c.s_q + t] = mx + std::log(sum);
      }
    }
}

struct Path {
  std::string name;
  std::function<void(const MlaDecodeParams&)> run;
};

std::vector<Path> decode_paths() {
  std::vector<Path> paths;
  paths.push_back({"reference", [](const MlaDecodeParams& p) {
                     detail::validate(p);
                     detail::mla_decode_reference(p, 2);
                   }});
  paths.push_back({"cpu-scalar", [](const MlaDecodeParams& p) {
                     detail::validate(p);
                     detail::mla_decode_cpu(p, detail::CpuIsa::kScalar, 2);
                   }});
  if (detail::cpu_supports(detail::CpuIsa::kAvx2))
    paths.push_back({"cpu-avx2", [](const MlaDecodeParams& p) {
                       detail::validate(p);
                       detail::mla_decode_cpu(p, detail::CpuIsa::kAvx2, 2);
                     }});
  return paths;
}

// The matrix tiers this CPU runs (their names are the backends').
std::vector<Path> matrix_paths() {
  std::vector<Path> paths;
  for (detail::CpuIsa isa : {detail::CpuIsa::kAvx512Bf16, detail::CpuIsa::kAmx})
    if (detail::cpu_supports(isa))
      paths.push_back(
          {std::string("cpu-") + detail::isa_name(isa), [isa](const MlaDecodeParams& p) {
             detail::validate(p);
             detail::mla_decode_cpu(p, isa, 2);
           }});
  return paths;
}

std::vector<Path> all_paths() {
  std::vector<Path> paths = decode_paths();
  for (Path& p : matrix_paths()) paths.push_back(std::move(p));
  return paths;
}

// Runs p through `run` with poisoned outputs and checks against the reference.
void check_decode(Problem& pb, const Path& path, const std::vector<double>& ref_o,
                  const std::vector<double>& ref_lse, MlaDecodeParams p,
                  DType out_dtype = DType::kF32) {
  const Case& c = pb.c;
  const std::size_t n_out = static_cast<std::size_t>(c.b) * c.s_q * c.h_q * DV;
  std::vector<std::uint8_t> out(n_out * dtype_size(out_dtype));
  for (std::size_t i = 0; i < n_out; ++i) store_from_f32(out.data(), i, out_dtype, kNaN);
  std::vector<float> lse(ref_lse.size(), kNaN);
  p.out = out.data();
  p.out_dtype = out_dtype;
  p.lse = lse.data();
  path.run(p);
  double ref_max = 0.0;
  for (double v : ref_o) ref_max = std::max(ref_max, std::fabs(v));
  // Paths that round P to bf16 (the matrix tiers on bf16 q and cache) add 2^-8 max|v|
  // (test_util.hpp, p_rounding_atol; docs/semantics.md section 6).
  const DType storage = c.q_dtype == DType::kBF16 && c.kv_dtype != DType::kF32 &&
                                c.layout == MlaCacheLayout::kDense576
                            ? DType::kBF16
                            : DType::kF32;
  double v_max = 0.0;
  for (std::size_t i = 0; i < pb.slot_val.size(); ++i)
    if (i % D < DV && std::isfinite(pb.slot_val[i]))
      v_max = std::max(v_max, std::fabs(pb.slot_val[i]));
  const double atol =
      (out_dtype == DType::kF32 ? 2e-5 * std::max(1.0, ref_max) : 8e-3 * std::max(1.0, ref_max)) +
      test::p_rounding_atol(path.name, storage, v_max);
  double worst = 0.0;
  std::size_t worst_i = 0;
  for (std::size_t i = 0; i < n_out; ++i) {
    const double got = load_as_f32(out.data(), i, out_dtype);
    const double err = std::isfinite(got) ? std::fabs(got - ref_o[i]) : 1e30;
    if (err > worst) worst = err, worst_i = i;
  }
  EXPECT_LE(worst, atol) << c.name() << " [" << path.name << "] out max err at flat " << worst_i
                         << seed_note();
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    if (std::isinf(ref_lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0)
          << c.name() << " [" << path.name << "] lse " << i;
      continue;
    }
    ASSERT_NEAR(lse[i], ref_lse[i], 1e-5 * std::max(1.0, std::fabs(ref_lse[i])))
        << c.name() << " [" << path.name << "] lse " << i << seed_note();
  }
}

void run_case(const Case& c) {
  Problem pb = make_problem(c);
  std::vector<double> ro, rl;
  reference(pb, ro, rl);
  for (const Path& path : all_paths()) check_decode(pb, path, ro, rl, pb.params());
}

// docs/semantics.md section 6 MLA row: b {1, 2, 6, 64} x s_q {1, 2, 4} x s_k {20, 140, 4096} x
// h_q {1, 16, 64, 128}, trimmed so the float64 reference stays cheap (rows x keys).
TEST(MlaDecode, SpecGridFp32) {
  for (int b : {1, 2, 6, 64})
    for (int s_q : {1, 2, 4})
      for (int s_k : {20, 140, 4096})
        for (int h : {1, 16, 64, 128}) {
          const double work = static_cast<double>(b) * s_q * h * s_k;
          if (work > 6.0e4) continue;
          Case c;
          c.b = b, c.s_q = s_q, c.s_k = s_k, c.h_q = h;
          c.causal = (b + s_q + h) % 2 == 0;
          c.page = (s_k + h) % 3 == 0 ? 1 : 64;
          run_case(c);
        }
}

// The bf16 path of the matrix tiers (bf16 q and cache) over the SPEC grid b {1, 2} x s_q
// {1, 2, 4} x s_k {20, 140, 4096} x h_q {16, 64, 128}, causal MTP on every other case,
// page 1 or 64, NaN in unused slots, plus sparse indices; the float64 reference stays
// cheap enough by skipping the largest products of rows and keys.
TEST(MlaDecode, SpecGridBf16MatrixTiers) {
  const std::vector<Path> paths = matrix_paths();
  if (paths.empty()) GTEST_SKIP() << "no matrix tier (cpu-avx512-bf16 / cpu-amx) on this CPU";
  auto run = [&](const Case& c) {
    Problem pb = make_problem(c);
    std::vector<double> ro, rl;
    reference(pb, ro, rl);
    for (const Path& path : paths) {
      check_decode(pb, path, ro, rl, pb.params());
      if (c.q_dtype == DType::kBF16) check_decode(pb, path, ro, rl, pb.params(), DType::kBF16);
    }
  };
  for (int b : {1, 2})
    for (int s_q : {1, 2, 4})
      for (int s_k : {20, 140, 4096})
        for (int h : {16, 64, 128}) {
          if (static_cast<double>(b) * s_q * h * s_k > 6e5) continue;
          Case c;
          c.b = b, c.s_q = s_q, c.s_k = s_k, c.h_q = h;
          c.q_dtype = c.kv_dtype = DType::kBF16;
          c.causal = (b + s_q + h / 16) % 2 == 0;
          c.page = (s_k + h) % 3 == 0 ? 1 : 64;
          run(c);
        }
  for (int h : {16, 128}) {
    Case c;
    c.b = 2, c.s_q = 2, c.h_q = h, c.s_k = 700, c.topk = 192, c.page = 64;
    c.q_dtype = c.kv_dtype = DType::kBF16;
    run(c);
  }
  // Few query rows per key list: 8 (bf16 path, rows padded to 16) and 4 (fp32 tiles).
  for (int h : {2, 4}) {
    Case c;
    c.b = 2, c.s_q = 2, c.h_q = h, c.s_k = 300, c.page = 7, c.causal = true;
    c.q_dtype = c.kv_dtype = DType::kBF16;
    run(c);
  }
  // A dense fp8 cache with bf16 q (its rows converted to bf16 exactly).
  for (int h : {16, 128}) {
    Case c;
    c.b = 2, c.s_q = 2, c.h_q = h, c.s_k = 333, c.page = 64, c.causal = true;
    c.q_dtype = DType::kBF16, c.kv_dtype = DType::kFP8E4M3;
    run(c);
  }
  // The fp32 tiles serve fp32 q on these tiers (exact scores).
  Case c;
  c.b = 2, c.s_q = 2, c.h_q = 64, c.s_k = 140, c.kv_dtype = DType::kBF16, c.causal = true;
  run(c);
}

// cpu-amx's MLA decode on the AMX tiles (the same grid as above is also run through
// matrix_paths()): key blocks copied (page 1, sparse) or read in place (page 64), rows
// padded to 32, fp8 rows. Skipped where the CPU (or the OS) lacks AMX.
TEST(MlaDecode, AmxTilesBf16) {
  std::string missing;
  if (!detail::cpu_supports(detail::CpuIsa::kAmx, &missing))
    GTEST_SKIP() << "cpu-amx not available here (missing: " << missing
                 << "); its MLA decode tests run on a CPU with AMX";
  const Path amx{"cpu-amx", [](const MlaDecodeParams& p) {
                   detail::validate(p);
                   detail::mla_decode_cpu(p, detail::CpuIsa::kAmx, 2);
                 }};
  auto run = [&](const Case& c) {
    Problem pb = make_problem(c);
    std::vector<double> ro, rl;
    reference(pb, ro, rl);
    check_decode(pb, amx, ro, rl, pb.params());
    check_decode(pb, amx, ro, rl, pb.params(), DType::kBF16);
    MlaDecodeParams p = pb.params();
    p.num_splits = 3;
    check_decode(pb, amx, ro, rl, p);
  };
  for (int h : {16, 40, 64, 128})
    for (int s_k : {20, 140, 1000})
      for (int page : {1, 64}) {
        Case c;
        c.b = 2, c.s_q = h == 128 ? 2 : 3, c.h_q = h, c.s_k = s_k, c.page = page;
        c.causal = (h + s_k + page) % 2 == 0;
        c.q_dtype = c.kv_dtype = DType::kBF16;
        run(c);
      }
  Case c;
  c.b = 2, c.s_q = 2, c.h_q = 128, c.s_k = 700, c.topk = 192, c.page = 64;
  c.q_dtype = c.kv_dtype = DType::kBF16;
  run(c);
  c.topk = 0, c.kv_dtype = DType::kFP8E4M3, c.causal = true;
  run(c);
}

}  // namespace
namespace detail::mla {
// mla_decode_amx.cpp compiled against unit/amx_emulation/cpu/amx_tiles.hpp (tests/CMakeLists.txt).
void run_unit_amx_emulated(const TokenSource& src, const KeyList& keys, const UnitSpec& u,
                           Workspace& ws, float* o, float* lse, float* max_logit);
}  // namespace detail::mla
namespace {

// The AMX path's layouts and loops on emulated tiles, against the vdpbf16ps path on the
// same unit (the two differ by the bf16 rounding of P against different running maxima:
// at most 2 * 2^-8 * max|v| apart; LSE and max_logit to fp32 rounding): paged keys read in
// place and copied (page 64 / 1), a key list, a split that starts inside a page, causal
// limits and key bitmasks, rows padded to 32, an fp8 cache. Runs where AVX512-BF16 does.
TEST(MlaDecode, AmxLayoutsEmulated) {
  if (!detail::cpu_supports(detail::CpuIsa::kAvx512Bf16))
    GTEST_SKIP() << "needs avx512_bf16 (the vdpbf16ps path it is compared with)";
  using namespace detail::mla;
  std::mt19937_64 rng(mla_seed());
  std::normal_distribution<float> nd;
  struct Unit {
    int h, ntok, page;
    std::int64_t begin, end;
    RowMask::Kind mask;
    bool list, fp8;
  };
  const Unit units[] = {{128, 1, 64, 0, 300, RowMask::Kind::kNone, false, false},
                        {40, 2, 64, 16, 300, RowMask::Kind::kLimit, false, false},
                        {128, 2, 1, 0, 200, RowMask::Kind::kLimit, false, false},
                        {16, 3, 64, 0, 150, RowMask::Kind::kBits, false, false},
                        {64, 1, 64, 0, 260, RowMask::Kind::kNone, true, false},
                        {128, 1, 64, 32, 170, RowMask::Kind::kNone, false, true}};
  for (const Unit& c : units) {
    const int slots = 1024, R = c.ntok * c.h;
    const std::int64_t row_bytes = c.fp8 ? D : 2 * D;
    std::vector<std::uint8_t> cache(static_cast<std::size_t>(slots) * row_bytes);
    double v_max = 0.0;
    for (int s = 0; s < slots; ++s)
      for (int k = 0; k < D; ++k) {
        const float x = nd(rng);
        std::uint8_t* t = cache.data() + s * row_bytes;
        const double v = c.fp8
                             ? (t[k] = f32_to_fp8e4m3(x), fp8e4m3_to_f32(t[k]))
                             : (put_value(t, k, DType::kBF16, x), load_as_f32(t, k, DType::kBF16));
        if (k < DV) v_max = std::max(v_max, std::fabs(v));
      }
    std::vector<std::int32_t> table(slots);
    for (int i = 0; i < slots; ++i) table[i] = c.page == 1 ? (i * 7) % slots : (i * 5) % 16;
    std::vector<std::int64_t> list(slots);
    for (int i = 0; i < slots; ++i) list[i] = (i * 13 + 5) % slots;
    std::vector<float> q(static_cast<std::size_t>(R) * D);
    for (float& x : q) x = bf16_to_f32(f32_to_bf16(0.1f * nd(rng)));
    TokenSource src;
    src.kind = c.fp8 ? SourceKind::kFP8 : SourceKind::kBF16;
    src.base = cache.data();
    src.row_bytes = row_bytes;
    KeyList keys;
    if (c.list) {
      keys.kind = KeyList::Kind::kList;
      keys.list = list.data();
    } else {
      keys.kind = KeyList::Kind::kPaged;
      keys.block_table = table.data();
      keys.page_size = c.page;
    }
    std::vector<std::int64_t> limit(c.ntok);
    for (int t = 0; t < c.ntok; ++t) limit[t] = c.end - c.ntok + t + 1;
    const std::int64_t words = (c.end + 63) / 64;
    std::vector<std::uint64_t> bits(static_cast<std::size_t>(c.ntok * words));
    for (auto& w : bits) w = rng();
    UnitSpec u;
    u.q = q.data(), u.ntok = c.ntok, u.h_q = c.h, u.key_begin = c.begin, u.key_end = c.end;
    u.sc = 0.07f;
    u.mask.kind = c.mask;
    u.mask.limit = limit.data();
    u.mask.bits = bits.data();
    u.mask.words = words;
    Workspace w1, w2;
    std::vector<float> o1(static_cast<std::size_t>(R) * DV), o2(o1.size(), kNaN), l1(R),
        l2(R, kNaN), m1(R), m2(R, kNaN);
    run_unit_dpbf16(src, keys, u, w1, o1.data(), l1.data(), m1.data());
    run_unit_amx_emulated(src, keys, u, w2, o2.data(), l2.data(), m2.data());
    const std::string what = "h" + std::to_string(c.h) + " ntok" + std::to_string(c.ntok) +
                             " page" + std::to_string(c.page) + seed_note();
    const double tol = 2 * std::ldexp(v_max, -8) + 1e-5;
    for (std::size_t i = 0; i < o1.size(); ++i)
      ASSERT_NEAR(o2[i], o1[i], tol) << what << " out " << i;
    for (int r = 0; r < R; ++r) {
      ASSERT_NEAR(l2[r], l1[r], 1e-5 * std::max(1.0f, std::fabs(l1[r]))) << what << " lse " << r;
      ASSERT_NEAR(m2[r], m1[r], 1e-5 * std::max(1.0f, std::fabs(m1[r]))) << what << " max " << r;
    }
  }
}

TEST(MlaDecode, PageSizesAndCausalMtp) {
  for (int page : {1, 4, 7, 64, 128})
    for (bool causal : {false, true}) {
      Case c;
      c.b = 2, c.s_q = 4, c.h_q = 16, c.s_k = 300, c.page = page, c.causal = causal;
      run_case(c);
    }
}

TEST(MlaDecode, CacheDtypes) {
  for (DType kv : {DType::kBF16, DType::kFP8E4M3})
    for (int h : {1, 16, 128}) {
      Case c;
      c.b = 2, c.s_q = 2, c.h_q = h, c.s_k = h == 128 ? 140 : 600, c.kv_dtype = kv, c.causal = true;
      run_case(c);
    }
  for (int h : {1, 64}) {
    Case c;
    c.b = 2, c.s_q = 1, c.h_q = h, c.s_k = 333, c.kv_dtype = DType::kFP8E4M3;
    c.layout = MlaCacheLayout::kFlashMlaFp8Packed656;
    run_case(c);
  }
}

TEST(MlaDecode, Bf16QueryAndOutput) {
  Case c;
  c.b = 2, c.s_q = 2, c.h_q = 16, c.s_k = 140, c.q_dtype = DType::kBF16, c.kv_dtype = DType::kBF16;
  Problem pb = make_problem(c);
  std::vector<double> ro, rl;
  reference(pb, ro, rl);
  for (const Path& path : all_paths()) {
    check_decode(pb, path, ro, rl, pb.params(), DType::kF32);
    check_decode(pb, path, ro, rl, pb.params(), DType::kBF16);
  }
}

// Sparse MLA: (s_k, topk) pairs of docs/semantics.md section 6, -1 padding, distinct indices.
TEST(MlaDecode, Sparse) {
  const int pairs[][2] = {{512, 64}, {1024, 576}, {2046, 2048}};
  for (const auto& pr : pairs)
    for (int h : {16, 128}) {
      Case c;
      c.b = 2, c.s_q = 2, c.h_q = h, c.s_k = pr[0], c.topk = pr[1], c.page = 64;
      if (static_cast<double>(c.b) * c.s_q * h * c.topk > 3.0e5) c.b = 1, c.s_q = 1;
      if (h == 128 && pr[1] == 2048) c.h_q = 64;
      run_case(c);
    }
  Case c;
  c.b = 2, c.s_q = 1, c.h_q = 16, c.s_k = 700, c.topk = 128, c.kv_dtype = DType::kFP8E4M3;
  c.layout = MlaCacheLayout::kFlashMlaFp8Packed656;
  run_case(c);
}

// Split-KV changes speed only: no split, engine plan, and odd fixed splits agree.
TEST(MlaDecode, SplitsAgree) {
  Case c;
  c.b = 1, c.s_q = 2, c.h_q = 16, c.s_k = 5000, c.causal = true, c.kv_dtype = DType::kBF16;
  Problem pb = make_problem(c);
  std::vector<double> ro, rl;
  reference(pb, ro, rl);
  Engine engine(EngineOptions{"reference", 2});
  MlaDecodeParams base = pb.params();
  std::vector<float> dummy_out(static_cast<std::size_t>(c.s_q) * c.h_q * DV);
  base.out = dummy_out.data();
  const SchedulerMetadata plan = engine.plan_mla_decode(base);
  ASSERT_EQ(plan.num_splits.size(), 1u);
  EXPECT_GT(plan.num_splits[0], 1) << "a long single sequence must be split across threads";
  for (const Path& path : all_paths()) {
    if (path.name == "reference") continue;
    for (int ns : {1, 3, 17}) {
      MlaDecodeParams p = base;
      p.num_splits = ns;
      check_decode(pb, path, ro, rl, p);
    }
    MlaDecodeParams p = base;
    p.plan = &plan;
    check_decode(pb, path, ro, rl, p);
  }
}

TEST(MlaDecode, EngineEntryPoint) {
  Case c;
  c.b = 3, c.s_q = 1, c.h_q = 16, c.s_k = 200;
  Problem pb = make_problem(c);
  std::vector<double> ro, rl;
  reference(pb, ro, rl);
  for (const std::string& name : available_backends()) {
    Engine engine(EngineOptions{name, 2});
    check_decode(pb, Path{name, [&](const MlaDecodeParams& p) { engine.mla_decode(p); }}, ro, rl,
                 pb.params());
  }
}

// ---- bad input: clear errors naming the argument ----

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(no InvalidArgument thrown)";
}

TEST(MlaDecode, BadInput) {
  Case c;
  c.b = 2, c.s_q = 2, c.h_q = 16, c.s_k = 100, c.causal = true;
  Problem pb = make_problem(c);
  std::vector<float> out(static_cast<std::size_t>(c.b) * c.s_q * c.h_q * DV);
  auto run = [&](MlaDecodeParams p) {
    p.out = out.data();
    return error_of([&] { detail::validate(p); });
  };
  MlaDecodeParams p = pb.params();
  EXPECT_EQ(run(p), "(no InvalidArgument thrown)");

  p = pb.params();
  p.head_dim = 512;
  EXPECT_NE(run(p).find("last dim must be 576"), std::string::npos) << run(p);

  p = pb.params();
  pb.block_table[1] = pb.num_blocks + 5;
  EXPECT_NE(run(p).find("block_table[0, 1]"), std::string::npos) << run(p);
  pb.block_table[1] = 0;

  // Causal with fewer cached tokens than query tokens is valid (the first rows see
  // nothing; test_mla_features.cpp checks the values).
  p = pb.params();
  std::vector<std::int32_t> short_lens = {1, pb.seqlens[1]};
  p.cache_seqlens = short_lens.data();
  EXPECT_EQ(run(p), "(no InvalidArgument thrown)");

  p = pb.params();
  p.h_q = 129;
  EXPECT_NE(run(p).find("h_q"), std::string::npos);
  p = pb.params();
  p.s_q = kMlaMaxQueryTokens + 1;
  EXPECT_NE(run(p).find("s_q"), std::string::npos);

  p = pb.params();
  p.kv_dtype = DType::kFP8E4M3;
  p.scale = 0.0f;
  EXPECT_NE(run(p).find("bmm1_scale: fp8 cache needs its scale"), std::string::npos) << run(p);
  p.bmm1_scale = 0.1f;
  EXPECT_NE(run(p).find("bmm2_scale: fp8 cache needs its scale"), std::string::npos) << run(p);

  p = pb.params();
  p.causal = false;
  std::vector<std::int32_t> idx(static_cast<std::size_t>(c.b) * c.s_q * 4, -1);
  idx[5] = pb.num_blocks * c.page;  // one past the last slot
  p.indices = idx.data();
  p.topk = 4;
  EXPECT_NE(run(p).find("indices[0, 1, 1]"), std::string::npos) << run(p);
  idx[5] = -2;
  EXPECT_NE(run(p).find("indices[0, 1, 1]"), std::string::npos) << run(p);

  p = pb.params();
  p.cache_layout = MlaCacheLayout::kFlashMlaFp8Packed656;
  EXPECT_NE(run(p).find("656-byte layout holds fp8"), std::string::npos) << run(p);
}

}  // namespace
}  // namespace ringattn
