// Smoke tests of the reference backend, the merge and argument validation on small,
// hand-computable cases (the full grids live in test_fwd_*.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ringattn/contiguous_params.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"

namespace ringattn {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> random_vec(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Contiguous dense fp32 problem q [b,s_q,h,d], k [b,s_k,h_k,d], v [b,s_k,h_k,d_v].
struct Dense {
  int b, s_q, s_k, h, h_k, d, d_v;
  std::vector<float> q, k, v, out, lse;

  Dense(int b_, int s_q_, int s_k_, int h_, int h_k_, int d_, int d_v_, std::mt19937& rng)
      : b(b_), s_q(s_q_), s_k(s_k_), h(h_), h_k(h_k_), d(d_), d_v(d_v_) {
    q = random_vec(static_cast<std::size_t>(b) * s_q * h * d, rng);
    k = random_vec(static_cast<std::size_t>(b) * s_k * h_k * d, rng);
    v = random_vec(static_cast<std::size_t>(b) * s_k * h_k * d_v, rng);
    out.assign(static_cast<std::size_t>(b) * s_q * h * d_v, kNaN);  // poison
    lse.assign(static_cast<std::size_t>(b) * h * s_q, kNaN);
  }

  FwdParams params() {
    FwdParams p;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse.data();
    p.b = b, p.s_q = s_q, p.s_k = s_k, p.h = h, p.h_k = h_k, p.d = d, p.d_v = d_v;
    set_contiguous_strides(p);
    return p;
  }
  float out_at(int bi, int i, int hi, int c) const {
    return out[((static_cast<std::size_t>(bi) * s_q + i) * h + hi) * d_v + c];
  }
  float lse_at(int bi, int hi, int i) const {
    return lse[(static_cast<std::size_t>(bi) * h + hi) * s_q + i];
  }
  // Mean of v rows [j0, j1) of (batch bi, kv head hk), column c.
  float v_mean(int bi, int hk, int j0, int j1, int c) const {
    double s = 0;
    for (int j = j0; j < j1; ++j)
      s += v[((static_cast<std::size_t>(bi) * s_k + j) * h_k + hk) * d_v + c];
    return static_cast<float>(s / (j1 - j0));
  }
};

// Naive float64 attention of one row (bottom-right mask, windows, softcap).
void naive_row(const Dense& t, int bi, int i, int hi, const MaskParams& m, std::vector<double>& o,
               double& lse) {
  const int hk = hi / (t.h / t.h_k);
  const double scale = m.scale != 0 ? m.scale : 1.0 / std::sqrt(double(t.d));
  const long shift = t.s_k - t.s_q;
  const int wr = m.causal ? 0 : m.window_right;
  std::vector<double> s(t.s_k, -INFINITY);
  double mx = -INFINITY;
  for (int j = 0; j < t.s_k; ++j) {
    if (wr >= 0 && j > i + shift + wr) continue;
    if (m.window_left >= 0 && j < i + shift - m.window_left) continue;
    double dot = 0;
    for (int c = 0; c < t.d; ++c)
      dot += double(t.q[((size_t(bi) * t.s_q + i) * t.h + hi) * t.d + c]) *
             t.k[((size_t(bi) * t.s_k + j) * t.h_k + hk) * t.d + c];
    dot *= scale;
    if (m.softcap > 0) dot = m.softcap * std::tanh(dot / m.softcap);
    s[j] = dot;
    mx = std::max(mx, dot);
  }
  o.assign(t.d_v, 0.0);
  if (mx == -INFINITY) {
    lse = -INFINITY;
    return;
  }
  double sum = 0;
  for (int j = 0; j < t.s_k; ++j) {
    if (s[j] == -INFINITY) continue;
    const double p = std::exp(s[j] - mx);
    sum += p;
    for (int c = 0; c < t.d_v; ++c)
      o[c] += p * t.v[((size_t(bi) * t.s_k + j) * t.h_k + hk) * t.d_v + c];
  }
  for (auto& x : o) x /= sum;
  lse = mx + std::log(sum);
}

Engine reference_engine(int threads = 2) {
  EngineOptions opt;
  opt.backend = "reference";
  opt.threads = threads;
  return Engine(opt);
}

TEST(ReferenceSmoke, CausalBottomRightShortQuery) {
  // s_q=2, s_k=5 causal: row 0 sees keys 0..3 (11110), row 1 sees all (11111).
  // With q = 0 every score is 0, so the output is the mean of the visible v rows.
  std::mt19937 rng(1);
  Dense t(1, 2, 5, 1, 1, 8, 8, rng);
  std::fill(t.q.begin(), t.q.end(), 0.0f);
  FwdParams p = t.params();
  p.mask.causal = true;
  reference_engine().forward(p);
  for (int c = 0; c < 8; ++c) {
    EXPECT_NEAR(t.out_at(0, 0, 0, c), t.v_mean(0, 0, 0, 4, c), 1e-6);
    EXPECT_NEAR(t.out_at(0, 1, 0, c), t.v_mean(0, 0, 0, 5, c), 1e-6);
  }
  EXPECT_NEAR(t.lse_at(0, 0, 0), std::log(4.0f), 1e-6);
  EXPECT_NEAR(t.lse_at(0, 0, 1), std::log(5.0f), 1e-6);
}

TEST(ReferenceSmoke, CausalMoreQueriesThanKeysGivesEmptyRows) {
  // s_q=5, s_k=2 causal: rows 0..2 see nothing -> output 0, LSE -inf.
  std::mt19937 rng(2);
  Dense t(1, 5, 2, 2, 1, 8, 16, rng);
  std::fill(t.q.begin(), t.q.end(), 0.0f);
  FwdParams p = t.params();
  p.mask.causal = true;
  reference_engine().forward(p);
  for (int hi = 0; hi < 2; ++hi) {
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(t.lse_at(0, hi, i), -kInf);
      for (int c = 0; c < 16; ++c) EXPECT_EQ(t.out_at(0, i, hi, c), 0.0f);
    }
    EXPECT_NEAR(t.lse_at(0, hi, 3), 0.0f, 1e-6);
    EXPECT_NEAR(t.lse_at(0, hi, 4), std::log(2.0f), 1e-6);
    for (int c = 0; c < 16; ++c) {
      EXPECT_NEAR(t.out_at(0, 3, hi, c), t.v_mean(0, 0, 0, 1, c), 1e-6);
      EXPECT_NEAR(t.out_at(0, 4, hi, c), t.v_mean(0, 0, 0, 2, c), 1e-6);
    }
  }
}

TEST(ReferenceSmoke, RandomGqaMatchesFloat64AndSplitsAgree) {
  std::mt19937 rng(3);
  Dense t(2, 7, 11, 4, 2, 16, 8, rng);
  MaskParams masks[3];
  masks[0].causal = true;
  masks[1].window_left = 3, masks[1].window_right = 1, masks[1].softcap = 2.0f;
  masks[2].scale = 0.3f;
  for (const MaskParams& m : masks) {
    FwdParams p = t.params();
    p.mask = m;
    reference_engine().forward(p);
    std::vector<double> o;
    double lse;
    for (int bi = 0; bi < t.b; ++bi)
      for (int i = 0; i < t.s_q; ++i)
        for (int hi = 0; hi < t.h; ++hi) {
          naive_row(t, bi, i, hi, m, o, lse);
          if (lse == -INFINITY) {
            EXPECT_EQ(t.lse_at(bi, hi, i), -kInf);
          } else {
            EXPECT_NEAR(t.lse_at(bi, hi, i), lse, 1e-5);
          }
          for (int c = 0; c < t.d_v; ++c) EXPECT_NEAR(t.out_at(bi, i, hi, c), o[c], 1e-5);
        }
    // Split-KV (3 splits) gives the same result to rounding.
    const std::vector<float> out1 = t.out, lse1 = t.lse;
    std::fill(t.out.begin(), t.out.end(), kNaN);
    p.num_splits = 3;
    reference_engine(1).forward(p);
    for (std::size_t x = 0; x < out1.size(); ++x) EXPECT_NEAR(t.out[x], out1[x], 1e-6);
    for (std::size_t x = 0; x < lse1.size(); ++x) {
      if (std::isinf(lse1[x])) {
        EXPECT_EQ(t.lse[x], lse1[x]);
      } else {
        EXPECT_NEAR(t.lse[x], lse1[x], 1e-5);
      }
    }
  }
}

TEST(ReferenceSmoke, VarlenEmptySegmentAndSeqused) {
  // Segment 0: 2 query rows, 0 keys -> 0 / -inf. Segment 1: 3 rows x 3 keys, q = 0,
  // seqused_q = 2 so its last row is outside the problem (written 0 / -inf).
  const int h = 1, d = 8;
  std::vector<float> q(5 * h * d, 0.0f), k(3 * h * d, 1.0f), v(3 * h * d);
  for (std::size_t x = 0; x < v.size(); ++x) v[x] = static_cast<float>(x);
  std::vector<float> out(5 * h * d, kNaN), lse(5 * h, kNaN);
  const std::int32_t cu_q[] = {0, 2, 5}, cu_k[] = {0, 0, 3}, used_q[] = {2, 2};
  FwdParams p;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
  p.b = 2, p.s_q = 3, p.s_k = 3, p.h = h, p.h_k = h, p.d = d, p.d_v = d;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = d;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = d;
  p.cu_seqlens_q = cu_q, p.cu_seqlens_k = cu_k, p.seqused_q = used_q;
  reference_engine().forward(p);
  for (int r : {0, 1, 4}) {
    EXPECT_EQ(lse[r], -kInf) << r;
    for (int c = 0; c < d; ++c) EXPECT_EQ(out[r * d + c], 0.0f);
  }
  for (int r : {2, 3}) {
    EXPECT_NEAR(lse[r], std::log(3.0f), 1e-6);
    for (int c = 0; c < d; ++c)
      EXPECT_NEAR(out[r * d + c], (c + (d + c) + (2 * d + c)) / 3.0f, 1e-5);
  }
}

TEST(ReferenceSmoke, PagedKvCacheAppendMatchesDense) {
  // Paged cache (page_size 3), leftpad, s_new = 2 appended in place; the result must
  // equal a dense forward over the gathered keys, and appended values are exact.
  std::mt19937 rng(4);
  const int b = 2, h = 2, h_k = 1, d = 8, s_q = 2, s_new = 2, page = 3, max_pages = 4, blocks = 8;
  const std::int32_t seqlens[] = {5, 2}, leftpad[] = {1, 0};
  const std::int32_t table[] = {6, 2, 0, 7, 3, 5, 1, 4};
  std::vector<float> kc(blocks * page * h_k * d, kNaN), vc(kc.size(), kNaN);
  auto kn = random_vec(b * s_new * h_k * d, rng), vn = random_vec(kn.size(), rng);
  auto q = random_vec(b * s_q * h * d, rng);
  // Fill the valid old slots [leftpad, seqlen) of each sequence.
  std::vector<std::vector<float>> keys(b), vals(b);  // gathered [s_k, d]
  for (int i = 0; i < b; ++i) {
    for (int t = leftpad[i]; t < seqlens[i] + s_new; ++t) {
      const std::size_t slot = (table[i * max_pages + t / page] * page + t % page) * d;
      for (int c = 0; c < d; ++c) {
        const float kv = t < seqlens[i] ? rng() / 4e9f : kn[(i * s_new + t - seqlens[i]) * d + c];
        const float vv = t < seqlens[i] ? rng() / 4e9f : vn[(i * s_new + t - seqlens[i]) * d + c];
        if (t < seqlens[i]) kc[slot + c] = kv, vc[slot + c] = vv;
        keys[i].push_back(kv);
        vals[i].push_back(vv);
      }
    }
  }
  std::vector<float> out(b * s_q * h * d, kNaN), lse(b * h * s_q, kNaN);
  KvCacheParams p;
  p.q = q.data(), p.k_cache = kc.data(), p.v_cache = vc.data(), p.k_new = kn.data(),
  p.v_new = vn.data(), p.out = out.data(), p.lse = lse.data();
  p.b = b, p.s_q = s_q, p.h = h, p.h_k = h_k, p.d = d, p.d_v = d, p.s_new = s_new;
  p.q_row_stride = h * d, p.q_head_stride = d, p.q_batch_stride = s_q * h * d;
  p.out_row_stride = h * d, p.out_head_stride = d, p.out_batch_stride = s_q * h * d;
  p.k_cache_batch_stride = p.v_cache_batch_stride = page * h_k * d;
  p.k_cache_row_stride = p.v_cache_row_stride = h_k * d;
  p.k_cache_head_stride = p.v_cache_head_stride = d;
  p.k_new_batch_stride = p.v_new_batch_stride = s_new * h_k * d;
  p.k_new_row_stride = p.v_new_row_stride = h_k * d;
  p.k_new_head_stride = p.v_new_head_stride = d;
  p.page_table = table, p.page_table_batch_stride = max_pages, p.num_blocks = blocks,
  p.page_size = page, p.max_pages = max_pages;
  p.cache_seqlens = seqlens, p.cache_leftpad = leftpad;
  p.mask.causal = true;
  const Engine eng = reference_engine();
  const SchedulerMetadata plan = eng.plan_kvcache(p);
  ASSERT_EQ(plan.num_splits.size(), std::size_t(b));
  eng.forward_kvcache(p);
  for (int i = 0; i < b; ++i) {
    for (int r = 0; r < s_new; ++r) {
      const int t = seqlens[i] + r;
      const std::size_t slot = (table[i * max_pages + t / page] * page + t % page) * d;
      EXPECT_EQ(0, std::memcmp(&kc[slot], &kn[(i * s_new + r) * d], d * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(&vc[slot], &vn[(i * s_new + r) * d], d * sizeof(float)));
    }
    // Dense forward over the gathered keys of sequence i.
    const int s_k = static_cast<int>(keys[i].size()) / d;
    std::vector<float> o2(s_q * h * d, kNaN), l2(h * s_q, kNaN);
    FwdParams f;
    f.q = q.data() + i * s_q * h * d, f.k = keys[i].data(), f.v = vals[i].data();
    f.out = o2.data(), f.lse = l2.data();
    f.b = 1, f.s_q = s_q, f.s_k = s_k, f.h = h, f.h_k = h_k, f.d = d, f.d_v = d;
    f.q_row_stride = f.out_row_stride = h * d, f.q_head_stride = f.out_head_stride = d;
    f.k_row_stride = f.v_row_stride = d, f.k_head_stride = f.v_head_stride = d;
    f.mask.causal = true;
    eng.forward(f);
    for (int x = 0; x < s_q * h * d; ++x) EXPECT_NEAR(out[i * s_q * h * d + x], o2[x], 1e-6);
    for (int x = 0; x < h * s_q; ++x) EXPECT_NEAR(lse[i * h * s_q + x], l2[x], 1e-6);
  }
  // Split-KV through the plan and through num_splits agrees (cache already holds k_new).
  p.k_new = p.v_new = nullptr, p.s_new = 0;
  std::vector<std::int32_t> seq2 = {seqlens[0] + s_new, seqlens[1] + s_new};
  p.cache_seqlens = seq2.data();
  const std::vector<float> out1 = out;
  SchedulerMetadata split_plan = eng.plan_kvcache(p);
  split_plan.num_splits.assign(b, 3);
  p.plan = &split_plan;
  std::fill(out.begin(), out.end(), kNaN);
  eng.forward_kvcache(p);
  for (std::size_t x = 0; x < out.size(); ++x) EXPECT_NEAR(out[x], out1[x], 1e-6);
}

TEST(ReferenceSmoke, RotaryAppliedToAppendedKey) {
  // One sequence, cache length 3, leftpad 1: k_new row 0 is rotated at position 3
  // (the absolute cache slot, as in FlashAttention).
  const int d = 8, rd = 4;
  std::vector<float> kc(8 * d, kNaN), vc(8 * d, kNaN), kn(d), vn(d), q(d, 0.0f), out(d, kNaN);
  for (int c = 0; c < d; ++c) kn[c] = 1.0f + c, vn[c] = -1.0f - c;
  for (int t = 1; t < 3; ++t)
    for (int c = 0; c < d; ++c) kc[t * d + c] = vc[t * d + c] = 0.5f;
  std::vector<float> cos_t(4 * rd / 2), sin_t(4 * rd / 2);
  for (int pos = 0; pos < 4; ++pos)
    for (int m = 0; m < rd / 2; ++m)
      cos_t[pos * 2 + m] = std::cos(0.3f * pos * (m + 1)),
                      sin_t[pos * 2 + m] = std::sin(0.3f * pos * (m + 1));
  const std::int32_t seqlens[] = {3}, leftpad[] = {1};
  for (bool interleaved : {false, true}) {
    std::vector<float> k_cache = kc;
    KvCacheParams p;
    p.q = q.data(), p.k_cache = k_cache.data(), p.v_cache = vc.data(), p.k_new = kn.data(),
    p.v_new = vn.data(), p.out = out.data();
    p.b = 1, p.s_q = 1, p.h = 1, p.h_k = 1, p.d = d, p.d_v = d, p.s_new = 1;
    p.q_row_stride = p.q_head_stride = p.out_row_stride = p.out_head_stride = d;
    p.k_cache_row_stride = p.v_cache_row_stride = p.k_cache_head_stride = p.v_cache_head_stride = d;
    p.k_new_row_stride = p.v_new_row_stride = p.k_new_head_stride = p.v_new_head_stride = d;
    p.b_cache = 1, p.s_cache = 8, p.cache_seqlens = seqlens, p.cache_leftpad = leftpad;
    p.rotary_cos = cos_t.data(), p.rotary_sin = sin_t.data(), p.rotary_dim = rd, p.s_rotary = 4,
    p.rotary_interleaved = interleaved;
    reference_engine().forward_kvcache(p);
    const float* got = &k_cache[3 * d];
    const int pos = 3;
    for (int m = 0; m < rd / 2; ++m) {
      const int i0 = interleaved ? 2 * m : m, i1 = interleaved ? 2 * m + 1 : m + rd / 2;
      const float cs = cos_t[pos * 2 + m], sn = sin_t[pos * 2 + m];
      EXPECT_NEAR(got[i0], kn[i0] * cs - kn[i1] * sn, 1e-6);
      EXPECT_NEAR(got[i1], kn[i0] * sn + kn[i1] * cs, 1e-6);
    }
    for (int c = rd; c < d; ++c) EXPECT_EQ(got[c], kn[c]);
    p.s_rotary = 3;  // position 3 not covered
    EXPECT_THROW(reference_engine().forward_kvcache(p), InvalidArgument);
  }
}

TEST(MergeStateSmoke, EmptyStatesAndAssociativity) {
  const int d_v = 4;
  std::vector<float> oa = {1, 2, 3, 4}, ob = {kNaN, kNaN, kNaN, kNaN}, o(4);
  float la = -kInf, lb = kInf, l;
  merge_state(oa.data(), &la, ob.data(), &lb, o.data(), &l, 1, d_v);  // both empty
  EXPECT_EQ(l, -kInf);
  for (float x : o) EXPECT_EQ(x, 0.0f);
  la = 0.5f;
  merge_state(oa.data(), &la, ob.data(), &lb, o.data(), &l, 1, d_v);  // b empty (+inf)
  EXPECT_FLOAT_EQ(l, 0.5f);
  for (int c = 0; c < d_v; ++c) EXPECT_FLOAT_EQ(o[c], oa[c]);

  // Three random states: merge_states == ((a + b) + c) == (a + (b + c)).
  std::mt19937 rng(5);
  const auto parts = random_vec(3 * d_v, rng);
  const float lses[3] = {1.0f, -2.0f, 0.25f};
  std::vector<float> o_all(d_v), o_ab(parts.begin(), parts.begin() + d_v);
  float l_all, l_ab = lses[0];
  merge_states(parts.data(), lses, o_all.data(), &l_all, 1, 3, d_v);
  merge_state_inplace(o_ab.data(), &l_ab, parts.data() + d_v, &lses[1], 1, d_v);
  merge_state_inplace(o_ab.data(), &l_ab, parts.data() + 2 * d_v, &lses[2], 1, d_v);
  const double ref = std::log(std::exp(1.0) + std::exp(-2.0) + std::exp(0.25));
  EXPECT_NEAR(l_all, ref, 1e-6);
  EXPECT_NEAR(l_ab, ref, 1e-6);
  for (int c = 0; c < d_v; ++c) EXPECT_NEAR(o_all[c], o_ab[c], 1e-6);
}

TEST(ValidateSmoke, MessagesNameArgumentAndValues) {
  std::mt19937 rng(6);
  Dense t(1, 2, 3, 6, 4, 8, 8, rng);
  FwdParams p = t.params();
  try {
    reference_engine().forward(p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(
        std::string(e.what()).find("h_k: number of query heads h=6 must be a multiple of h_k=4"),
        std::string::npos)
        << e.what();
  }
  p.h_k = 2;
  p.d = 12;
  EXPECT_THROW(reference_engine().forward(p), InvalidArgument);
  p.d = 8;
  p.k_row_stride = -8;
  EXPECT_THROW(reference_engine().forward(p), InvalidArgument);
  p.k_row_stride = 2 * 8;
  p.out_head_stride = 4;  // heads overlap in the output
  EXPECT_THROW(reference_engine().forward(p), InvalidArgument);
  p.out_head_stride = 8;
  p.mask.softcap = -1.0f;
  EXPECT_THROW(reference_engine().forward(p), InvalidArgument);
  p.mask.softcap = 0.0f;
  p.out_dtype = DType::kBF16;
  EXPECT_THROW(reference_engine().forward(p), InvalidArgument);
}

}  // namespace
}  // namespace ringattn
