// Sparse MLA prefill: the three paths (dense causal, masked dense, sparse gather)
// and the automatic rule, against a float64 reference written here; all paths must
// agree to rounding. Also the un-absorbed MLA prefill shape (d_qk 192, d_v 128) on
// the dense kernel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu_features.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn {
namespace {

constexpr int D = kMlaHeadDim;
constexpr int DV = kMlaValueDim;

std::uint64_t prefill_seed() {
  static const std::uint64_t seed = [] {
    if (const char* env = std::getenv("RINGATTN_TEST_SEED"))
      return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 10));
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }();
  return seed;
}

std::string note() {
  return " (replay with RINGATTN_TEST_SEED=" + std::to_string(prefill_seed()) + ")";
}

struct Prefill {
  DType dtype = DType::kF32;
  int h_q = 16, topk = 64;
  std::vector<std::int32_t> cu;
  std::vector<std::uint8_t> q, kv;
  std::vector<double> qd, kvd;
  std::vector<std::int32_t> idx;
  int total() const { return cu.back(); }
  MlaSparsePrefillParams params(float* out, float* lse) const {
    MlaSparsePrefillParams p;
    p.dtype = dtype;
    p.q = q.data();
    p.kv = kv.data();
    p.cu_seqlens = cu.data();
    p.indices = idx.data();
    p.out = out;
    p.lse = lse;
    p.b = static_cast<int>(cu.size()) - 1;
    p.total = total();
    p.h_q = h_q;
    p.topk = topk;
    p.scale = 1.0f / std::sqrt(192.0f);
    return p;
  }
};

// Rows whose causal range fits in topk list all of it (what the DSA indexer does);
// longer rows list topk distinct random causal keys. -1 padding scattered.
// partial: rows list only about 3/4 of what they could (an indexer that drops keys).
Prefill make_prefill(const std::vector<int>& lens, int h_q, int topk, DType dt, std::uint64_t salt,
                     bool partial = false) {
  Prefill pf;
  pf.dtype = dt;
  pf.h_q = h_q;
  pf.topk = topk;
  pf.cu.push_back(0);
  for (int L : lens) pf.cu.push_back(pf.cu.back() + L);
  std::mt19937_64 rng(prefill_seed() ^ salt);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int total = pf.total();
  auto fill = [&](std::vector<std::uint8_t>& raw, std::vector<double>& val, std::int64_t n,
                  float amp) {
    raw.resize(n * dtype_size(dt));
    val.resize(n);
    for (std::int64_t i = 0; i < n; ++i) {
      store_from_f32(raw.data(), i, dt, amp * uni(rng));
      val[i] = load_as_f32(raw.data(), i, dt);
    }
  };
  fill(pf.q, pf.qd, static_cast<std::int64_t>(total) * h_q * D, 3.0f);
  fill(pf.kv, pf.kvd, static_cast<std::int64_t>(total) * D, 1.0f);
  pf.idx.assign(static_cast<std::size_t>(total) * topk, -1);
  for (std::size_t i = 0; i + 1 < pf.cu.size(); ++i)
    for (int r = 0; r < lens[i]; ++r) {
      std::vector<int> keys(r + 1);
      std::iota(keys.begin(), keys.end(), 0);
      std::shuffle(keys.begin(), keys.end(), rng);
      keys.resize(std::min(topk, r + 1));
      if (partial) keys.resize(std::max<std::size_t>(1, keys.size() * 3 / 4));
      std::vector<int> at(topk);
      std::iota(at.begin(), at.end(), 0);
      std::shuffle(at.begin(), at.end(), rng);
      for (std::size_t k = 0; k < keys.size(); ++k)
        pf.idx[static_cast<std::size_t>(pf.cu[i] + r) * topk + at[k]] = keys[k];
    }
  return pf;
}

void reference(const Prefill& pf, std::vector<double>& out, std::vector<double>& lse) {
  const int total = pf.total();
  const double sc = 1.0f / std::sqrt(192.0f);
  out.assign(static_cast<std::size_t>(total) * pf.h_q * DV, 0.0);
  lse.assign(static_cast<std::size_t>(pf.h_q) * total, -std::numeric_limits<double>::infinity());
  for (std::size_t i = 0; i + 1 < pf.cu.size(); ++i)
    for (int t = pf.cu[i]; t < pf.cu[i + 1]; ++t) {
      std::vector<int> keys;
      for (int k = 0; k < pf.topk; ++k) {
        const int v = pf.idx[static_cast<std::size_t>(t) * pf.topk + k];
        if (v >= 0) keys.push_back(pf.cu[i] + v);
      }
      for (int h = 0; h < pf.h_q; ++h) {
        const double* q = pf.qd.data() + (static_cast<std::int64_t>(t) * pf.h_q + h) * D;
        std::vector<double> s(keys.size());
        double mx = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < keys.size(); ++j) {
          double dot = 0.0;
          for (int c = 0; c < D; ++c)
            dot += q[c] * pf.kvd[static_cast<std::int64_t>(keys[j]) * D + c];
          s[j] = dot * sc;
          mx = std::max(mx, s[j]);
        }
        if (keys.empty()) continue;
        double sum = 0.0;
        double* o = out.data() + (static_cast<std::int64_t>(t) * pf.h_q + h) * DV;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double e = std::exp(s[j] - mx);
          sum += e;
          for (int c = 0; c < DV; ++c)
            o[c] += e * pf.kvd[static_cast<std::int64_t>(keys[j]) * D + c];
        }
        for (int c = 0; c < DV; ++c) o[c] /= sum;
        lse[static_cast<std::size_t>(h) * total + t] = mx + std::log(sum);
      }
    }
}

std::vector<detail::CpuIsa> isas() {
  std::vector<detail::CpuIsa> v{detail::CpuIsa::kScalar};
  if (detail::cpu_supports(detail::CpuIsa::kAvx2)) v.push_back(detail::CpuIsa::kAvx2);
  return v;
}

// Runs every path (and auto) on every ISA plus the reference, checks each against
// the float64 reference, and returns the path auto chose.
MlaPrefillPath check_all_paths(const Prefill& pf, bool dense_causal_valid) {
  std::vector<double> ro, rl;
  reference(pf, ro, rl);
  const int total = pf.total();
  double ref_max = 0.0;
  for (double v : ro) ref_max = std::max(ref_max, std::fabs(v));
  std::vector<float> out(ro.size()), lse(rl.size());
  auto check = [&](const std::string& what) {
    double worst = 0.0;
    for (std::size_t i = 0; i < ro.size(); ++i)
      worst = std::max(worst, std::isfinite(out[i]) ? std::fabs(out[i] - ro[i]) : 1e30);
    EXPECT_LE(worst, 2e-5 * std::max(1.0, ref_max)) << what << note();
    for (std::size_t i = 0; i < rl.size(); ++i)
      ASSERT_NEAR(lse[i], rl[i], 1e-5 * std::max(1.0, std::fabs(rl[i])))
          << what << " lse " << i << note();
  };
  const MlaSparsePrefillParams base = pf.params(out.data(), lse.data());
  detail::validate(base);
  for (MlaPrefillPath path : {MlaPrefillPath::kAuto, MlaPrefillPath::kDenseCausal,
                              MlaPrefillPath::kMaskedDense, MlaPrefillPath::kSparseGather}) {
    MlaSparsePrefillParams p = base;
    p.path = path;
    if (path == MlaPrefillPath::kDenseCausal && !dense_causal_valid) {
      EXPECT_THROW(detail::mla_choose_prefill_path(p), InvalidArgument);
      continue;
    }
    for (detail::CpuIsa isa : isas()) {
      std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
      std::fill(lse.begin(), lse.end(), std::numeric_limits<float>::quiet_NaN());
      detail::mla_sparse_prefill_cpu(p, isa, 2);
      check(std::string(mla_prefill_path_name(path)) + " on " + detail::isa_name(isa) + " total " +
            std::to_string(total));
    }
  }
  std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
  Engine engine(EngineOptions{"reference", 2});
  engine.mla_sparse_prefill(base);
  check("engine reference");
  return detail::mla_choose_prefill_path(base);
}

TEST(MlaSparsePrefill, ShortSequencesTakeDenseCausal) {
  const Prefill pf = make_prefill({40, 64, 1}, 16, 64, DType::kF32, 1);
  EXPECT_EQ(check_all_paths(pf, true), MlaPrefillPath::kDenseCausal);
}

TEST(MlaSparsePrefill, MediumSequencesTakeMaskedDense) {
  const Prefill pf = make_prefill({70, 45}, 16, 80, DType::kF32, 2, true);
  EXPECT_EQ(check_all_paths(pf, false), MlaPrefillPath::kMaskedDense);
}

TEST(MlaSparsePrefill, LongSequencesTakeSparseGather) {
  Prefill pf = make_prefill({300}, 4, 48, DType::kBF16, 3);
  EXPECT_EQ(check_all_paths(pf, false), MlaPrefillPath::kSparseGather);
}

TEST(MlaSparsePrefill, RatioTunableMovesTheCrossover) {
  const Prefill pf = make_prefill({200}, 1, 64, DType::kF32, 4);
  std::vector<float> out(static_cast<std::size_t>(pf.total()) * DV);
  MlaSparsePrefillParams p = pf.params(out.data(), nullptr);
  EXPECT_EQ(detail::mla_choose_prefill_path(p), MlaPrefillPath::kSparseGather);  // 200 > 1.0 * 64
  p.masked_dense_max_ratio = 3.0f;
  EXPECT_EQ(detail::mla_choose_prefill_path(p), MlaPrefillPath::kSparseGather);
  p.masked_dense_max_ratio = 4.0f;
  EXPECT_EQ(detail::mla_choose_prefill_path(p), MlaPrefillPath::kMaskedDense);
}

TEST(MlaSparsePrefill, BadInput) {
  Prefill pf = make_prefill({30, 20}, 2, 16, DType::kF32, 5);
  std::vector<float> out(static_cast<std::size_t>(pf.total()) * 2 * DV);
  auto err = [&](const MlaSparsePrefillParams& p) -> std::string {
    try {
      detail::validate(p);
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "(none)";
  };
  MlaSparsePrefillParams p = pf.params(out.data(), nullptr);
  EXPECT_EQ(err(p), "(none)");
  p.head_dim = 512;
  EXPECT_NE(err(p).find("last dim must be 576"), std::string::npos) << err(p);
  // Row 35 is token 5 of sequence 1 (length 20): key 20 is out of range.
  const std::int32_t saved = pf.idx[35 * 16];
  pf.idx[35 * 16] = 20;
  p = pf.params(out.data(), nullptr);
  EXPECT_NE(err(p).find("outside [0, s = 20)"), std::string::npos) << err(p);
  pf.idx[35 * 16] = saved;
  // Duplicate key in row 10.
  std::int32_t* row = pf.idx.data() + 10 * 16;
  int a = -1, b = -1;
  for (int k = 0; k < 16; ++k) {
    if (row[k] >= 0 && a < 0) {
      a = k;
    } else if (row[k] >= 0 && b < 0) {
      b = k;
    }
  }
  ASSERT_GE(b, 0);
  row[b] = row[a];
  EXPECT_NE(err(p).find("listed twice"), std::string::npos) << err(p);
}

// Un-absorbed MLA prefill is ordinary dense causal attention with d_qk = 192 and
// d_v = 128 (docs/semantics.md section 4), run by the dense kernel of each backend.
TEST(MlaUnabsorbedPrefill, DenseKernelD192V128) {
  const int b = 1, s = 77, h = 4, d = 192, dv = 128;
  std::mt19937_64 rng(prefill_seed() ^ 6);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(b) * s * h * d), k(q.size()),
      v(static_cast<std::size_t>(b) * s * h * dv);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = uni(rng);
  const double sc = 1.0 / std::sqrt(192.0);
  std::vector<double> ref(static_cast<std::size_t>(s) * h * dv, 0.0);
  for (int i = 0; i < s; ++i)
    for (int hh = 0; hh < h; ++hh) {
      std::vector<double> p(i + 1);
      double mx = -1e300, sum = 0.0;
      for (int j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (int c = 0; c < d; ++c)
          dot += double(q[(i * h + hh) * d + c]) * k[(j * h + hh) * d + c];
        p[j] = dot * sc;
        mx = std::max(mx, p[j]);
      }
      for (int j = 0; j <= i; ++j) sum += p[j] = std::exp(p[j] - mx);
      for (int j = 0; j <= i; ++j)
        for (int c = 0; c < dv; ++c)
          ref[(i * h + hh) * dv + c] += p[j] / sum * v[(j * h + hh) * dv + c];
    }
  for (const std::string& name : available_backends()) {
    Engine engine(EngineOptions{name, 2});
    std::vector<float> out(ref.size(), std::numeric_limits<float>::quiet_NaN());
    FwdParams p;
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data();
    p.q_batch_stride = p.k_batch_stride = static_cast<std::int64_t>(s) * h * d;
    p.q_row_stride = p.k_row_stride = h * d;
    p.q_head_stride = p.k_head_stride = d;
    p.v_batch_stride = static_cast<std::int64_t>(s) * h * dv;
    p.v_row_stride = p.out_row_stride = h * dv;
    p.v_head_stride = p.out_head_stride = dv;
    p.out_batch_stride = p.v_batch_stride;
    p.b = b, p.s_q = p.s_k = s, p.h = p.h_k = h, p.d = d, p.d_v = dv;
    p.mask.causal = true;
    p.mask.scale = static_cast<float>(sc);
    try {
      engine.forward(p);
    } catch (const UnsupportedError& e) {
      GTEST_SKIP() << "dense forward not available on " << name << ": " << e.what();
    }
    double worst = 0.0;
    for (std::size_t i = 0; i < ref.size(); ++i)
      worst = std::max(worst, std::isfinite(out[i]) ? std::fabs(out[i] - ref[i]) : 1e30);
    EXPECT_LE(worst, 2e-5) << name << note();
  }
}

}  // namespace
}  // namespace ringattn
