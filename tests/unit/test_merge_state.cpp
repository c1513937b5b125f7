// Public softmax-state merge (docs/semantics.md section 5, ringattn/merge_state.hpp) against
// the float64 reference merge: empty states (-inf, and +inf on input) act as the
// identity and never produce NaN, the merge is commutative and associative to
// rounding, and the N-state merge equals a chain of two-state merges.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "reference_f64.hpp"
#include "ringattn/merge_state.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// +inf (FlashMLA / FA2 empty row) read as our -inf.
float canonical(float lse) { return lse == kInf ? -kInf : lse; }

struct Partial {
  std::vector<float> o;    // [n, d_v]
  std::vector<float> lse;  // [n]
};

// Random partial states; about one row in `empty_every` is empty (-inf, or +inf
// on odd rows) with output 0, as a kernel writes for a fully masked row.
Partial random_partial(std::mt19937_64& rng, std::int64_t n, int d_v, int empty_every = 0) {
  std::normal_distribution<float> o_dist(0.0f, 1.0f);
  std::uniform_real_distribution<float> lse_dist(-30.0f, 30.0f);
  std::uniform_int_distribution<int> pick(0, empty_every > 0 ? empty_every - 1 : 0);
  Partial p;
  p.o.resize(static_cast<std::size_t>(n) * d_v);
  p.lse.resize(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r) {
    const bool empty = empty_every > 0 && pick(rng) == 0;
    p.lse[r] = empty ? (r % 2 ? kInf : -kInf) : lse_dist(rng);
    for (int c = 0; c < d_v; ++c) p.o[r * d_v + c] = empty ? 0.0f : o_dist(rng);
  }
  return p;
}

Partial merged(const Partial& a, const Partial& b, std::int64_t n, int d_v) {
  Partial out;
  out.o.assign(a.o.size(), kNaN);
  out.lse.assign(a.lse.size(), kNaN);
  merge_state(a.o.data(), a.lse.data(), b.o.data(), b.lse.data(), out.o.data(), out.lse.data(), n,
              d_v);
  return out;
}

std::vector<double> to_d(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Checks a merge result against the float64 reference merge of `parts`.
void expect_matches_reference(const Partial& got, const std::vector<const Partial*>& parts,
                              std::int64_t n, int d_v) {
  const int k = static_cast<int>(parts.size());
  std::vector<double> o_parts(static_cast<std::size_t>(n) * k * d_v), lse_parts(n * k);
  for (std::int64_t r = 0; r < n; ++r) {
    for (int s = 0; s < k; ++s) {
      lse_parts[r * k + s] = parts[s]->lse[r];
      for (int c = 0; c < d_v; ++c) o_parts[(r * k + s) * d_v + c] = parts[s]->o[r * d_v + c];
    }
  }
  std::vector<double> o_ref, lse_ref;
  reference_merge(o_parts, lse_parts, n, k, d_v, o_ref, lse_ref);
  EXPECT_TRUE(check_same_to_rounding("merge o", to_d(got.o), o_ref, {n, d_v}, 1e-5));
  EXPECT_TRUE(check_lse("merge lse", to_d(got.lse), lse_ref, {n}));
}

TEST(MergeState, MatchesFloat64Reference) {
  std::mt19937_64 rng(case_seed("merge_ref"));
  const std::int64_t n = 257;
  const int d_v = 72;
  const Partial a = random_partial(rng, n, d_v, 5);
  const Partial b = random_partial(rng, n, d_v, 5);
  expect_matches_reference(merged(a, b, n, d_v), {&a, &b}, n, d_v);
}

TEST(MergeState, BothEmptyGivesZeroAndMinusInfNeverNaN) {
  const int d_v = 16;
  // Rows: (-inf, -inf), (+inf, +inf), (-inf, +inf), (+inf, -inf).
  Partial a, b;
  a.lse = {-kInf, kInf, -kInf, kInf};
  b.lse = {-kInf, kInf, kInf, -kInf};
  a.o.assign(4 * d_v, 0.0f);
  b.o.assign(4 * d_v, 0.0f);
  const Partial m = merged(a, b, 4, d_v);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(m.lse[r], -kInf) << "row " << r;
    for (int c = 0; c < d_v; ++c) EXPECT_EQ(m.o[r * d_v + c], 0.0f) << "row " << r << " col " << c;
  }
  // Same through the N-state merge.
  std::vector<float> o_parts(4 * 2 * d_v, 0.0f), lse_parts(8);
  for (int r = 0; r < 4; ++r) {
    lse_parts[r * 2] = a.lse[r];
    lse_parts[r * 2 + 1] = b.lse[r];
  }
  std::vector<float> o(4 * d_v, kNaN), lse(4, kNaN);
  merge_states(o_parts.data(), lse_parts.data(), o.data(), lse.data(), 4, 2, d_v);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(lse[r], -kInf);
    for (int c = 0; c < d_v; ++c) EXPECT_EQ(o[r * d_v + c], 0.0f);
  }
}

TEST(MergeState, EmptySideIsIdentity) {
  std::mt19937_64 rng(case_seed("merge_identity"));
  const std::int64_t n = 31;
  const int d_v = 40;
  const Partial x = random_partial(rng, n, d_v);
  for (const float empty_lse : {-kInf, kInf}) {
    Partial e;
    e.lse.assign(n, empty_lse);
    e.o.assign(x.o.size(), 0.0f);
    for (const bool empty_first : {true, false}) {
      const Partial m = empty_first ? merged(e, x, n, d_v) : merged(x, e, n, d_v);
      for (std::int64_t r = 0; r < n; ++r) {
        EXPECT_FLOAT_EQ(m.lse[r], x.lse[r]);
        for (int c = 0; c < d_v; ++c) EXPECT_FLOAT_EQ(m.o[r * d_v + c], x.o[r * d_v + c]);
      }
    }
  }
}

TEST(MergeState, FarApartLseDoesNotOverflow) {
  const int d_v = 8;
  Partial a, b;
  a.lse = {200.0f, -200.0f, 80.0f};
  b.lse = {-200.0f, 200.0f, 80.0f};
  a.o.assign(3 * d_v, 1.0f);
  b.o.assign(3 * d_v, -1.0f);
  const Partial m = merged(a, b, 3, d_v);
  expect_matches_reference(m, {&a, &b}, 3, d_v);
  for (float v : m.o) EXPECT_TRUE(std::isfinite(v));
}

TEST(MergeState, CommutativeAndAssociative) {
  std::mt19937_64 rng(case_seed("merge_assoc"));
  const std::int64_t n = 129;
  const int d_v = 64;
  const Partial a = random_partial(rng, n, d_v, 7);
  const Partial b = random_partial(rng, n, d_v, 7);
  const Partial c = random_partial(rng, n, d_v, 7);
  const Partial ab = merged(a, b, n, d_v);
  const Partial ba = merged(b, a, n, d_v);
  EXPECT_TRUE(check_same_to_rounding("ab vs ba (o)", to_d(ab.o), to_d(ba.o), {n, d_v}, 1e-6));
  EXPECT_TRUE(check_same_to_rounding("ab vs ba (lse)", to_d(ab.lse), to_d(ba.lse), {n}, 1e-6));
  const Partial ab_c = merged(ab, c, n, d_v);
  const Partial a_bc = merged(a, merged(b, c, n, d_v), n, d_v);
  EXPECT_TRUE(
      check_same_to_rounding("(ab)c vs a(bc) (o)", to_d(ab_c.o), to_d(a_bc.o), {n, d_v}, 1e-5));
  EXPECT_TRUE(
      check_same_to_rounding("(ab)c vs a(bc) (lse)", to_d(ab_c.lse), to_d(a_bc.lse), {n}, 1e-5));
  expect_matches_reference(ab_c, {&a, &b, &c}, n, d_v);
}

TEST(MergeState, InPlaceEqualsOutOfPlace) {
  std::mt19937_64 rng(case_seed("merge_inplace"));
  const std::int64_t n = 50;
  const int d_v = 24;
  Partial a = random_partial(rng, n, d_v, 4);
  const Partial b = random_partial(rng, n, d_v, 4);
  const Partial expect = merged(a, b, n, d_v);
  merge_state_inplace(a.o.data(), a.lse.data(), b.o.data(), b.lse.data(), n, d_v);
  EXPECT_EQ(a.lse, expect.lse);
  EXPECT_EQ(a.o, expect.o);
}

TEST(MergeState, NStatesEqualSequentialMerges) {
  std::mt19937_64 rng(case_seed("merge_n"));
  const std::int64_t n = 77;
  const int d_v = 48;
  for (const int k : {1, 2, 5, 16}) {
    std::vector<Partial> parts;
    for (int s = 0; s < k; ++s) parts.push_back(random_partial(rng, n, d_v, 3));
    // Make one row empty in every part.
    for (auto& p : parts) {
      p.lse[3] = -kInf;
      for (int c = 0; c < d_v; ++c) p.o[3 * d_v + c] = 0.0f;
    }
    std::vector<float> o_parts(static_cast<std::size_t>(n) * k * d_v), lse_parts(n * k);
    for (std::int64_t r = 0; r < n; ++r) {
      for (int s = 0; s < k; ++s) {
        lse_parts[r * k + s] = parts[s].lse[r];
        for (int c = 0; c < d_v; ++c) o_parts[(r * k + s) * d_v + c] = parts[s].o[r * d_v + c];
      }
    }
    Partial all;
    all.o.assign(static_cast<std::size_t>(n) * d_v, kNaN);
    all.lse.assign(n, kNaN);
    merge_states(o_parts.data(), lse_parts.data(), all.o.data(), all.lse.data(), n, k, d_v);
    Partial seq = parts[0];
    for (int s = 1; s < k; ++s) seq = merged(seq, parts[s], n, d_v);
    // A single +inf state passes through the N-state merge as -inf.
    for (auto& l : seq.lse) l = canonical(l);
    const std::string tag = "k=" + std::to_string(k);
    EXPECT_TRUE(check_same_to_rounding(tag + " o", to_d(all.o), to_d(seq.o), {n, d_v}, 1e-5));
    EXPECT_TRUE(check_same_to_rounding(tag + " lse", to_d(all.lse), to_d(seq.lse), {n}, 1e-5));
    std::vector<const Partial*> ptrs;
    for (const auto& p : parts) ptrs.push_back(&p);
    expect_matches_reference(all, ptrs, n, d_v);
    EXPECT_EQ(all.lse[3], -kInf);
    // lse may be omitted.
    std::vector<float> o2(all.o.size(), kNaN);
    merge_states(o_parts.data(), lse_parts.data(), o2.data(), nullptr, n, k, d_v);
    EXPECT_EQ(o2, all.o);
  }
}

}  // namespace
}  // namespace ringattn::test
