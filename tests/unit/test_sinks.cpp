// Attention sinks (attention_params.hpp, docs/semantics.md section 5): the exact
// properties on every backend, next to the float64 grids of test_fwd_dense /
// test_fwd_varlen / test_kvcache / test_split_kv that include sink cases:
//   - sink -inf changes nothing, +inf gives output 0; the LSE never includes the sink;
//   - a finite sink scales the output row by exp(lse) / (exp(lse) + exp(sink));
//   - merging partial results over key ranges and applying the sink once afterwards
//     (apply_sinks, what split-KV, the rings and distributed decode do) equals the
//     whole call with the sink;
//   - NaN sinks are rejected naming the entry.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ringattn/attention_params.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// A contiguous fp32 dense problem [b, s_q, h, d] x [b, s_k, h_k, d].
struct Problem {
  int b = 2, s_q = 7, s_k = 150, h = 6, h_k = 2, d = 64;
  std::vector<float> q, k, v, out, lse;
  FwdParams p;

  explicit Problem(const std::string& name, bool causal) {
    std::mt19937_64 rng(case_seed(name));
    std::normal_distribution<float> dist(0.0f, 1.0f);
    const auto fill = [&](std::vector<float>& x, std::size_t n) {
      x.resize(n);
      for (float& e : x) e = dist(rng);
    };
    fill(q, static_cast<std::size_t>(b) * s_q * h * d);
    fill(k, static_cast<std::size_t>(b) * s_k * h_k * d);
    fill(v, static_cast<std::size_t>(b) * s_k * h_k * d);
    out.assign(static_cast<std::size_t>(b) * s_q * h * d, 0.0f);
    lse.assign(static_cast<std::size_t>(b) * h * s_q, 0.0f);
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse.data();
    p.b = b;
    p.s_q = s_q;
    p.s_k = s_k;
    p.h = h;
    p.h_k = h_k;
    p.d = p.d_v = d;
    p.q_head_stride = p.out_head_stride = d;
    p.q_row_stride = p.out_row_stride = std::int64_t{h} * d;
    p.q_batch_stride = p.out_batch_stride = std::int64_t{s_q} * h * d;
    p.k_head_stride = p.v_head_stride = d;
    p.k_row_stride = p.v_row_stride = std::int64_t{h_k} * d;
    p.k_batch_stride = p.v_batch_stride = std::int64_t{s_k} * h_k * d;
    p.mask.causal = causal;
  }

  // Runs the call and returns (out, lse) as doubles.
  void run(const Engine& e, std::vector<double>* o, std::vector<double>* l) {
    poison(out);
    poison(lse);
    e.forward(p);
    o->assign(out.begin(), out.end());
    l->assign(lse.begin(), lse.end());
  }
};

class Sinks : public ::testing::TestWithParam<std::string> {};

TEST_P(Sinks, ScaleOutputOnlyAndKeepTheLse) {
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    for (int splits : {1, 3}) {
      SCOPED_TRACE("num_splits " + std::to_string(splits));
      Problem pr("sinks_scale", causal);
      pr.s_q = 7;
      pr.p.num_splits = splits;
      const Engine engine(EngineOptions{GetParam(), 0});
      std::vector<double> o0, l0, o1, l1;
      pr.run(engine, &o0, &l0);

      // -inf everywhere: no effect at all.
      std::vector<float> sinks(static_cast<std::size_t>(pr.h), -kInf);
      pr.p.mask.sinks = sinks.data();
      pr.run(engine, &o1, &l1);
      EXPECT_EQ(o1, o0);
      EXPECT_EQ(l1, l0);

      // Mixed: +inf zeroes the head, finite sinks scale it; the LSE is unchanged.
      const std::vector<float> mixed = test_sinks(pr.h);
      std::copy(mixed.begin(), mixed.end(), sinks.begin());  // same buffer as p.mask.sinks
      pr.run(engine, &o1, &l1);
      EXPECT_EQ(l1, l0);
      std::vector<double> expect(o0.size());
      for (int bi = 0; bi < pr.b; ++bi)
        for (int i = 0; i < pr.s_q; ++i)
          for (int hh = 0; hh < pr.h; ++hh) {
            const double lse = l0[(static_cast<std::size_t>(bi) * pr.h + hh) * pr.s_q + i];
            const double f = 1.0 / (1.0 + std::exp(double(sinks[hh]) - lse));
            const std::size_t base = ((static_cast<std::size_t>(bi) * pr.s_q + i) * pr.h + hh) *
                                     static_cast<std::size_t>(pr.d);
            for (int c = 0; c < pr.d; ++c) expect[base + c] = o0[base + c] * f;
            if (sinks[hh] == kInf) {
              for (int c = 0; c < pr.d; ++c) EXPECT_EQ(o1[base + c], 0.0);
            }
          }
      EXPECT_TRUE(check_same_to_rounding("sink-scaled output", o1, expect,
                                         {pr.b, pr.s_q, pr.h, pr.d}, 1e-5));
    }
  }
}

// Partial results over two key ranges (no sink), merged, then apply_sinks once ==
// the whole call with the sink. This is how split-KV, both rings and distributed
// decode combine, so applying the sink per partial would fail here.
TEST_P(Sinks, AppliedOnceAfterTheMerge) {
  Problem whole("sinks_merge", false);
  const Engine engine(EngineOptions{GetParam(), 0});
  const std::vector<float> sinks = test_sinks(whole.h);
  whole.p.mask.sinks = sinks.data();
  std::vector<double> ow, lw;
  whole.run(engine, &ow, &lw);

  // Key ranges [0, cut) and [cut, s_k) as two calls on sub-tensors.
  const int cut = 61;
  std::vector<std::vector<float>> o_part(2), l_part(2);
  for (int part = 0; part < 2; ++part) {
    Problem pr("sinks_merge", false);
    const int j0 = part == 0 ? 0 : cut;
    pr.p.s_k = part == 0 ? cut : pr.s_k - cut;
    pr.p.k = pr.k.data() + static_cast<std::ptrdiff_t>(j0) * pr.p.k_row_stride;
    pr.p.v = pr.v.data() + static_cast<std::ptrdiff_t>(j0) * pr.p.v_row_stride;
    std::vector<double> o, l;
    pr.run(engine, &o, &l);
    // Rows [b, s_q, h] for the merge: lse [b, h, s_q] -> [b, s_q, h].
    o_part[part] = pr.out;
    l_part[part].resize(pr.lse.size());
    for (int bi = 0; bi < pr.b; ++bi)
      for (int i = 0; i < pr.s_q; ++i)
        for (int hh = 0; hh < pr.h; ++hh)
          l_part[part][(static_cast<std::size_t>(bi) * pr.s_q + i) * pr.h + hh] =
              pr.lse[(static_cast<std::size_t>(bi) * pr.h + hh) * pr.s_q + i];
  }
  const std::int64_t rows = std::int64_t{whole.b} * whole.s_q * whole.h;
  merge_state_inplace(o_part[0].data(), l_part[0].data(), o_part[1].data(), l_part[1].data(), rows,
                      whole.d);
  apply_sinks(o_part[0].data(), whole.d, l_part[0].data(), 1, sinks.data(), rows, whole.h, whole.d);
  const std::vector<double> merged(o_part[0].begin(), o_part[0].end());
  EXPECT_TRUE(check_same_to_rounding("merge then sink vs whole call", merged, ow,
                                     {whole.b, whole.s_q, whole.h, whole.d}, 1e-5));
  for (int bi = 0; bi < whole.b; ++bi)
    for (int i = 0; i < whole.s_q; ++i)
      for (int hh = 0; hh < whole.h; ++hh) {
        const double a = l_part[0][(static_cast<std::size_t>(bi) * whole.s_q + i) * whole.h + hh];
        const double w = lw[(static_cast<std::size_t>(bi) * whole.h + hh) * whole.s_q + i];
        EXPECT_NEAR(a, w, 1e-5 * std::max(1.0, std::fabs(w)));
      }
}

TEST_P(Sinks, NanIsRejectedNamingTheEntry) {
  Problem pr("sinks_nan", false);
  std::vector<float> sinks = test_sinks(pr.h);
  sinks[4] = std::numeric_limits<float>::quiet_NaN();
  pr.p.mask.sinks = sinks.data();
  const Engine engine(EngineOptions{GetParam(), 0});
  try {
    engine.forward(pr.p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("sinks[4]"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, Sinks, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

TEST(SinkScale, Values) {
  EXPECT_EQ(sink_scale(2.0f, -kInf), 1.0f);
  EXPECT_EQ(sink_scale(2.0f, kInf), 0.0f);
  EXPECT_EQ(sink_scale(-kInf, 3.0f), 0.0f);  // empty row stays 0
  EXPECT_EQ(sink_scale(kInf, 3.0f), 0.0f);   // +inf LSE means empty too
  EXPECT_FLOAT_EQ(sink_scale(1.0f, 1.0f), 0.5f);
  EXPECT_NEAR(sink_scale(0.0f, std::log(3.0f)), 0.25, 1e-7);
}

}  // namespace
}  // namespace ringattn::test
