// MLA decode features beyond the plain softmax: attention sinks, max_logits,
// topk_length, out-of-range indices treated as padding, causal decode with fewer
// cached tokens than query tokens, and the global-index sparse prefill mapping
// (FlashMLA flash_mla_sparse_fwd as a sparse decode). Every MLA path this machine runs
// (reference, cpu-scalar, cpu-avx2), with and without split-KV, is compared with a
// float64 reference written here. Unused cache slots hold NaN; inputs are fresh random
// on every run (RINGATTN_TEST_SEED replays a run).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu_features.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn {
namespace {

constexpr int D = kMlaHeadDim;
constexpr int DV = kMlaValueDim;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::uint64_t seed() {
  static const std::uint64_t s = [] {
    if (const char* env = std::getenv("RINGATTN_TEST_SEED"))
      return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 10));
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }();
  return s;
}

std::string note() { return " (replay with RINGATTN_TEST_SEED=" + std::to_string(seed()) + ")"; }

// A problem in the MlaDecodeParams layout with fp32 tensors. `keys[row]` lists the
// slots each query token (row = i * s_q + s) must attend to, in the reference's eyes.
struct MlaProblem {
  int b = 1, s_q = 1, h_q = 1, num_blocks = 1, page = 1, max_blocks = 1, topk = 0;
  bool causal = false, lenient = false;
  std::vector<float> q, cache, sinks;
  std::vector<std::int32_t> block_table, seqlens, indices, topk_length;
  std::vector<std::vector<std::int64_t>> keys;

  MlaDecodeParams params() const {
    MlaDecodeParams p;
    p.q = q.data();
    p.kv_cache = cache.data();
    p.b = b, p.s_q = s_q, p.h_q = h_q;
    p.num_blocks = num_blocks, p.page_size = page, p.max_blocks = max_blocks;
    if (topk > 0) {
      p.indices = indices.data();
      p.topk = topk;
      p.invalid_indices_as_padding = lenient;
      if (!topk_length.empty()) p.topk_length = topk_length.data();
    } else {
      p.block_table = block_table.data();
      p.cache_seqlens = seqlens.data();
      p.causal = causal;
    }
    if (!sinks.empty()) p.sinks = sinks.data();
    p.scale = 1.0f / std::sqrt(192.0f);
    return p;
  }
};

// float64 reference: out [b, s_q, h_q, 512] (sink applied), lse [b, h_q, s_q] and
// max_logits [b, s_q, h_q] without the sink; -inf for rows that see nothing.
struct Ref {
  std::vector<double> out, lse, mx;
};

Ref reference(const MlaProblem& st) {
  const double sc = 1.0f / std::sqrt(192.0f);
  Ref r;
  r.out.assign(static_cast<std::size_t>(st.b) * st.s_q * st.h_q * DV, 0.0);
  r.lse.assign(static_cast<std::size_t>(st.b) * st.h_q * st.s_q, -kInf);
  r.mx.assign(static_cast<std::size_t>(st.b) * st.s_q * st.h_q, -kInf);
  for (int i = 0; i < st.b; ++i)
    for (int s = 0; s < st.s_q; ++s) {
      const auto& keys = st.keys[static_cast<std::size_t>(i) * st.s_q + s];
      if (keys.empty()) continue;
      for (int h = 0; h < st.h_q; ++h) {
        const std::int64_t row = (static_cast<std::int64_t>(i) * st.s_q + s) * st.h_q + h;
        const float* q = st.q.data() + row * D;
        std::vector<double> sv(keys.size());
        double m = -kInf;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const float* k = st.cache.data() + keys[j] * D;
          double dot = 0.0;
          for (int c = 0; c < D; ++c) dot += static_cast<double>(q[c]) * k[c];
          sv[j] = dot * sc;
          m = std::max(m, sv[j]);
        }
        double sum = 0.0;
        std::vector<double> acc(DV, 0.0);
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double e = std::exp(sv[j] - m);
          sum += e;
          const float* k = st.cache.data() + keys[j] * D;
          for (int c = 0; c < DV; ++c) acc[c] += e * k[c];
        }
        const double lse = m + std::log(sum);
        const double sink =
            st.sinks.empty() ? 1.0 : 1.0 / (1.0 + std::exp(static_cast<double>(st.sinks[h]) - lse));
        for (int c = 0; c < DV; ++c) r.out[row * DV + c] = acc[c] / sum * sink;
        r.lse[(static_cast<std::size_t>(i) * st.h_q + h) * st.s_q + s] = lse;
        r.mx[row] = m;
      }
    }
  return r;
}

struct Path {
  std::string name;
  std::function<void(const MlaDecodeParams&)> run;
};

std::vector<Path> paths() {
  std::vector<Path> v;
  v.push_back({"reference", [](const MlaDecodeParams& p) {
                 detail::validate(p);
                 detail::mla_decode_reference(p, 2);
               }});
  v.push_back({"cpu-scalar", [](const MlaDecodeParams& p) {
                 detail::validate(p);
                 detail::mla_decode_cpu(p, detail::CpuIsa::kScalar, 2);
               }});
  if (detail::cpu_supports(detail::CpuIsa::kAvx2))
    v.push_back({"cpu-avx2", [](const MlaDecodeParams& p) {
                   detail::validate(p);
                   detail::mla_decode_cpu(p, detail::CpuIsa::kAvx2, 2);
                 }});
  return v;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i])) {
      ASSERT_EQ(got[i], static_cast<float>(want[i])) << what << " entry " << i << note();
      continue;
    }
    ASSERT_NEAR(got[i], want[i], tol * std::max(1.0, std::fabs(want[i])))
        << what << " entry " << i << note();
  }
}

// Runs every path with splits auto / 1 / 3 and outputs poisoned with NaN.
void check_all(const MlaProblem& st, const std::string& name) {
  const Ref ref = reference(st);
  for (const Path& path : paths())
    for (int ns : {0, 1, 3}) {
      if (path.name == "reference" && ns != 0) continue;
      MlaDecodeParams p = st.params();
      p.num_splits = ns;
      std::vector<float> out(ref.out.size(), kNaN), lse(ref.lse.size(), kNaN),
          mx(ref.mx.size(), kNaN);
      p.out = out.data();
      p.lse = lse.data();
      p.max_logits = mx.data();
      path.run(p);
      const std::string what = name + " [" + path.name + ", splits " + std::to_string(ns) + "]";
      expect_close(out, ref.out, 2e-5, what + " out");
      expect_close(lse, ref.lse, 1e-5, what + " lse");
      expect_close(mx, ref.mx, 1e-5, what + " max_logits");
    }
}

// Paged cache of fp32 tokens for sequences of the given lengths; NaN in every slot no
// sequence owns. Fills q with h_q heads and the dense key lists (causal if set).
MlaProblem make_paged(std::mt19937_64& rng, int s_q, int h_q, int page,
                      const std::vector<int>& lens, bool causal) {
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  MlaProblem st;
  st.b = static_cast<int>(lens.size()), st.s_q = s_q, st.h_q = h_q, st.page = page;
  st.causal = causal;
  int used = 0;
  st.max_blocks = 1;
  for (int L : lens) {
    used += (L + page - 1) / page;
    st.max_blocks = std::max(st.max_blocks, (L + page - 1) / page + 1);
  }
  st.num_blocks = used + 2;
  std::vector<std::int32_t> perm(st.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  st.cache.assign(static_cast<std::size_t>(st.num_blocks) * page * D, kNaN);
  st.block_table.assign(static_cast<std::size_t>(st.b) * st.max_blocks, -3);
  st.seqlens.assign(lens.begin(), lens.end());
  int next = 0;
  std::vector<std::vector<std::int64_t>> seq_slots(st.b);
  for (int i = 0; i < st.b; ++i) {
    for (int pg = 0; pg < (lens[i] + page - 1) / page; ++pg)
      st.block_table[static_cast<std::size_t>(i) * st.max_blocks + pg] = perm[next++];
    for (int j = 0; j < lens[i]; ++j) {
      const std::int64_t slot =
          static_cast<std::int64_t>(
              st.block_table[static_cast<std::size_t>(i) * st.max_blocks + j / page]) *
              page +
          j % page;
      seq_slots[i].push_back(slot);
      for (int c = 0; c < D; ++c) st.cache[slot * D + c] = uni(rng);
    }
  }
  st.q.resize(static_cast<std::size_t>(st.b) * s_q * h_q * D);
  for (float& v : st.q) v = 2.0f * uni(rng);
  st.keys.resize(static_cast<std::size_t>(st.b) * s_q);
  for (int i = 0; i < st.b; ++i)
    for (int s = 0; s < s_q; ++s) {
      const int n = causal ? lens[i] - s_q + s + 1 : lens[i];
      for (int j = 0; j < n; ++j)
        st.keys[static_cast<std::size_t>(i) * s_q + s].push_back(seq_slots[i][j]);
    }
  return st;
}

std::vector<float> mixed_sinks(std::mt19937_64& rng, int h) {
  std::uniform_real_distribution<float> uni(-2.0f, 3.0f);
  std::vector<float> s(h);
  for (float& v : s) v = uni(rng);
  s[0] = std::numeric_limits<float>::infinity();
  if (h > 1) s[1] = -std::numeric_limits<float>::infinity();
  return s;
}

// Dense decode: sinks (+inf, -inf, finite), max_logits, and causal multi-token
// prediction where one sequence has fewer cached tokens than query tokens (its first
// query tokens see nothing: 0 / -inf) and one has none at all.
TEST(MlaFeatures, DenseSinksMaxLogitsShortCausal) {
  std::mt19937_64 rng(seed() ^ 0x51);
  MlaProblem st = make_paged(rng, 4, 16, 16, {2, 700, 0}, true);
  st.sinks = mixed_sinks(rng, st.h_q);
  check_all(st, "dense causal sinks");
  MlaProblem plain = make_paged(rng, 1, 1, 64, {300}, false);
  check_all(plain, "dense h1 max_logits");
}

// Sparse decode: -1 padding, out-of-range entries skipped (>= slots and < -1),
// topk_length per sequence, a row without any valid key, sinks and max_logits.
TEST(MlaFeatures, SparseTopkLengthLenientIndicesSinks) {
  std::mt19937_64 rng(seed() ^ 0x52);
  MlaProblem st = make_paged(rng, 2, 16, 16, {400, 300}, false);
  const std::int64_t slots = static_cast<std::int64_t>(st.num_blocks) * st.page;
  st.topk = 96;
  st.lenient = true;
  st.indices.assign(static_cast<std::size_t>(st.b) * st.s_q * st.topk, -1);
  st.topk_length = {st.topk, 37};
  std::vector<std::vector<std::int64_t>> own(st.b);
  for (int i = 0; i < st.b; ++i) own[i] = st.keys[static_cast<std::size_t>(i) * st.s_q];
  for (int i = 0; i < st.b; ++i)
    for (int s = 0; s < st.s_q; ++s) {
      const std::size_t row = static_cast<std::size_t>(i) * st.s_q + s;
      std::vector<std::int64_t> pool = own[i];
      std::shuffle(pool.begin(), pool.end(), rng);
      std::int32_t* idx = st.indices.data() + row * st.topk;
      std::uniform_int_distribution<int> kind(0, 9);
      for (int k = 0; k < st.topk; ++k) {
        const int kd = kind(rng);
        idx[k] = kd == 0   ? -1
                 : kd == 1 ? static_cast<std::int32_t>(slots + k)  // past the cache
                 : kd == 2 ? -5 - k                                // below -1
                           : static_cast<std::int32_t>(pool[k]);
      }
      if (i == 1 && s == 1)
        for (int k = 0; k < st.topk; ++k) idx[k] = k % 2 ? -1 : static_cast<std::int32_t>(slots);
      st.keys[row].clear();
      for (int k = 0; k < st.topk_length[i]; ++k)
        if (idx[k] >= 0 && idx[k] < slots) st.keys[row].push_back(idx[k]);
    }
  st.sinks = mixed_sinks(rng, st.h_q);
  check_all(st, "sparse lenient topk_length sinks");
}

// FlashMLA's global-index sparse prefill through the mapping of mla_params.hpp:
// q [s_q, h_q, 576] as b = s_q sequences of one token, kv [s_kv, 576] as one block of
// page_size s_kv, indices [s_q, topk] over [0, s_kv) (-1 and >= s_kv skipped),
// topk_length [s_q]; lse comes out as [s_q, h_q] and max_logits as [s_q, h_q].
TEST(MlaFeatures, GlobalIndexSparsePrefill) {
  std::mt19937_64 rng(seed() ^ 0x53);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int s_q = 37, s_kv = 300, h_q = 16, topk = 64;
  MlaProblem st;
  st.b = s_q, st.s_q = 1, st.h_q = h_q, st.num_blocks = 1, st.page = s_kv, st.topk = topk;
  st.lenient = true;
  st.cache.resize(static_cast<std::size_t>(s_kv) * D);
  for (float& v : st.cache) v = uni(rng);
  st.q.resize(static_cast<std::size_t>(s_q) * h_q * D);
  for (float& v : st.q) v = 2.0f * uni(rng);
  st.indices.resize(static_cast<std::size_t>(s_q) * topk);
  st.topk_length.resize(s_q);
  st.keys.resize(s_q);
  std::uniform_int_distribution<int> len(0, topk);
  for (int t = 0; t < s_q; ++t) {
    std::vector<std::int32_t> pool(s_kv + 40);  // 40 entries >= s_kv: invalid
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    st.topk_length[t] = t == 0 ? 0 : len(rng);
    for (int k = 0; k < topk; ++k) {
      const std::int32_t v = k % 7 == 3 ? -1 : pool[k];
      st.indices[static_cast<std::size_t>(t) * topk + k] = v;
      if (k < st.topk_length[t] && v >= 0 && v < s_kv) st.keys[t].push_back(v);
    }
  }
  st.sinks = mixed_sinks(rng, h_q);
  check_all(st, "global-index sparse prefill");
  // The engine's entry point and plan accept the mapping too.
  Engine engine(EngineOptions{"auto", 2});
  MlaDecodeParams p = st.params();
  std::vector<float> out(static_cast<std::size_t>(s_q) * h_q * DV);
  p.out = out.data();
  const SchedulerMetadata plan = engine.plan_mla_decode(p);
  EXPECT_EQ(plan.num_splits.size(), static_cast<std::size_t>(s_q));
  p.plan = &plan;
  EXPECT_NO_THROW(engine.mla_decode(p));
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(no InvalidArgument thrown)";
}

TEST(MlaFeatures, BadInput) {
  std::mt19937_64 rng(seed() ^ 0x54);
  MlaProblem st = make_paged(rng, 1, 4, 16, {50, 20}, false);
  std::vector<float> out(static_cast<std::size_t>(st.b) * st.s_q * st.h_q * DV);
  auto run = [&](MlaDecodeParams p) {
    p.out = out.data();
    return error_of([&] { detail::validate(p); });
  };
  MlaDecodeParams p = st.params();
  std::vector<std::int32_t> lens = {4, 4};
  p.topk_length = lens.data();
  EXPECT_NE(run(p).find("topk_length: only used with sparse indices"), std::string::npos) << run(p);

  std::vector<float> sinks(st.h_q, 0.5f);
  sinks[2] = kNaN;
  p = st.params();
  p.sinks = sinks.data();
  EXPECT_NE(run(p).find("sinks[2]: NaN"), std::string::npos) << run(p);

  const std::int32_t slots = st.num_blocks * st.page;
  std::vector<std::int32_t> idx(static_cast<std::size_t>(st.b) * st.s_q * 4, -1);
  idx[6] = slots;  // batch 1, entry 2
  p = st.params();
  p.indices = idx.data();
  p.topk = 4;
  EXPECT_NE(run(p).find("indices[1, 0, 2]: " + std::to_string(slots)), std::string::npos) << run(p);
  p.invalid_indices_as_padding = true;  // FlashMLA's rule: skipped, not an error
  EXPECT_EQ(run(p), "(no InvalidArgument thrown)");
  p.invalid_indices_as_padding = false;
  std::vector<std::int32_t> tl = {4, 2};  // entry 2 of batch 1 is past its topk_length
  p.topk_length = tl.data();
  EXPECT_EQ(run(p), "(no InvalidArgument thrown)");
  tl[0] = 5;
  EXPECT_NE(run(p).find("topk_length[0]: 5 outside [0, topk = 4]"), std::string::npos) << run(p);
  tl[0] = -1;
  EXPECT_NE(run(p).find("topk_length[0]: -1"), std::string::npos) << run(p);
}

}  // namespace
}  // namespace ringattn
