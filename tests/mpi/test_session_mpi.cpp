// KvSession under MPI (mpirun -np 1..4): prefill, decode steps (1 and several tokens),
// extend (pass-Q and pass-KV) and decode again, for both cache layouts, every prefill
// layout, page sizes that do and do not divide the lengths, GQA, windows (prefill and
// decode), softcap, bf16 and attention_chunk (chunks cutting the prompt, decode steps and
// the extend; with windows). Every output row equals single-process causal attention over
// the sequence's whole history: row p of the full-sequence kernel result.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "mpi_test_main.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn {
namespace {

struct Case {
  std::string name;
  CacheLayout layout = CacheLayout::kRoundRobin;
  ShardLayout prefill = ShardLayout::kZigzag;
  int page = 4;
  std::vector<int> prompt = {29, 13};
  int steps = 3, t = 1, s1 = 9, steps2 = 2, t2 = 2;
  int h = 4, h_k = 2, d = 16, d_v = 16;
  int wl = -1;
  float softcap = 0.0f;
  DType dtype = DType::kF32;
  ExtendMode mode = ExtendMode::kPassQ;
  bool sinks = false;  // attention-sink logits per head (applied once per output row)
  int chunk = 0;       // attention_chunk (0 = off)
};

std::vector<std::byte> rand_rows(std::mt19937& rng, std::int64_t n, DType t) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::byte> out(static_cast<std::size_t>(n) * dtype_size(t));
  for (std::int64_t i = 0; i < n; ++i) store_from_f32(out.data(), i, t, u(rng));
  return out;
}

void run_case(const Case& c) {
  const comm::Communicator& comm = test::world();
  const int b = static_cast<int>(c.prompt.size());
  const std::size_t es = dtype_size(c.dtype);
  const std::int64_t qr = std::int64_t{c.h} * c.d, kr = std::int64_t{c.h_k} * c.d,
                     vr = std::int64_t{c.h_k} * c.d_v, orow = std::int64_t{c.h} * c.d_v;
  // Whole sequences (same seed on every rank).
  std::vector<std::int64_t> total(b);
  std::int64_t longest = 0;
  for (int s = 0; s < b; ++s) {
    total[s] = c.prompt[s] + std::int64_t{c.steps} * c.t + c.s1 + std::int64_t{c.steps2} * c.t2;
    longest = std::max(longest, total[s]);
  }
  std::mt19937 rng(4321);
  std::vector<std::vector<std::byte>> Q(b), K(b), V(b);
  for (int s = 0; s < b; ++s) {
    Q[s] = rand_rows(rng, total[s] * qr, c.dtype);
    K[s] = rand_rows(rng, total[s] * kr, c.dtype);
    V[s] = rand_rows(rng, total[s] * vr, c.dtype);
  }
  Engine engine(EngineOptions{"auto", 1});
  std::vector<float> sinks(static_cast<std::size_t>(c.h));
  for (int i = 0; i < c.h; ++i)
    sinks[static_cast<std::size_t>(i)] = 0.7f * static_cast<float>(i) - 1.0f;
  // Reference: causal attention over each whole sequence.
  std::vector<std::vector<float>> ref_o(b), ref_l(b);
  for (int s = 0; s < b; ++s) {
    ref_o[s].assign(static_cast<std::size_t>(total[s] * orow), NAN);
    ref_l[s].assign(static_cast<std::size_t>(total[s] * c.h), NAN);
    FwdParams f;
    f.dtype = c.dtype;
    f.q = Q[s].data();
    f.k = K[s].data();
    f.v = V[s].data();
    f.out = ref_o[s].data();
    f.lse = ref_l[s].data();
    f.b = 1;
    f.s_q = f.s_k = static_cast<int>(total[s]);
    f.h = c.h;
    f.h_k = c.h_k;
    f.d = c.d;
    f.d_v = c.d_v;
    f.q_head_stride = f.k_head_stride = c.d;
    f.v_head_stride = f.out_head_stride = c.d_v;
    f.q_row_stride = qr;
    f.k_row_stride = kr;
    f.v_row_stride = vr;
    f.out_row_stride = orow;
    f.mask.causal = true;
    f.mask.window_left = c.wl;
    f.mask.softcap = c.softcap;
    f.mask.attention_chunk = c.chunk;
    if (c.sinks) f.mask.sinks = sinks.data();
    engine.forward(f);
  }
  const double tol = c.dtype == DType::kF32 ? 2e-5 : 2e-2;
  auto expect_row = [&](int s, std::int64_t pos, const float* o, const float* l_of_head,
                        std::int64_t l_stride, const std::string& what) {
    for (std::int64_t e = 0; e < orow; ++e)
      ASSERT_NEAR(o[e], ref_o[s][static_cast<std::size_t>(pos * orow + e)], tol)
          << c.name << " " << what << " seq " << s << " pos " << pos << " elem " << e;
    for (int hh = 0; hh < c.h; ++hh) {
      const float want = ref_l[s][static_cast<std::size_t>(hh * total[s] + pos)];
      ASSERT_NEAR(l_of_head[hh * l_stride], want, tol * std::max(1.0f, std::abs(want)))
          << c.name << " " << what << " lse seq " << s << " pos " << pos << " head " << hh;
    }
  };

  SessionConfig cfg;
  cfg.dtype = c.dtype;
  cfg.b = b;
  cfg.h = c.h;
  cfg.h_k = c.h_k;
  cfg.d = c.d;
  cfg.d_v = c.d_v;
  cfg.page_size = c.page;
  cfg.capacity = longest;
  cfg.layout = c.layout;
  cfg.prefill_layout = c.prefill;
  cfg.mask.window_left = c.wl;
  cfg.mask.softcap = c.softcap;
  cfg.mask.attention_chunk = c.chunk;
  if (c.sinks) cfg.mask.sinks = sinks.data();
  KvSession session(comm, engine, cfg);

  // Prefill: this rank's shard of every prompt, packed.
  std::vector<std::int64_t> lens(c.prompt.begin(), c.prompt.end());
  std::vector<std::byte> q, k, v;
  std::vector<std::pair<int, std::int64_t>> rows;
  for (int s = 0; s < b; ++s)
    for (auto pos : session.prefill_positions(c.prompt[s])) {
      rows.push_back({s, pos});
      q.insert(q.end(), Q[s].begin() + pos * qr * es, Q[s].begin() + (pos + 1) * qr * es);
      k.insert(k.end(), K[s].begin() + pos * kr * es, K[s].begin() + (pos + 1) * kr * es);
      v.insert(v.end(), V[s].begin() + pos * vr * es, V[s].begin() + (pos + 1) * vr * es);
    }
  const auto t_r = static_cast<std::int64_t>(rows.size());
  std::vector<float> out(static_cast<std::size_t>(std::max<std::int64_t>(t_r, 1) * orow), NAN),
      lse(static_cast<std::size_t>(std::max<std::int64_t>(t_r, 1) * c.h), NAN);
  session.prefill(lens, q.data(), k.data(), v.data(), out.data(), lse.data());
  for (std::int64_t r = 0; r < t_r; ++r)
    expect_row(rows[r].first, rows[r].second, out.data() + r * orow, lse.data() + r, t_r,
               "prefill");

  // Steps of t tokens per sequence: decode (or extend) with replicated inputs.
  std::vector<std::int64_t> at(lens);
  auto step = [&](int t, bool is_extend) {
    std::vector<std::byte> sq, sk, sv;
    for (int s = 0; s < b; ++s) {
      sq.insert(sq.end(), Q[s].begin() + at[s] * qr * es, Q[s].begin() + (at[s] + t) * qr * es);
      sk.insert(sk.end(), K[s].begin() + at[s] * kr * es, K[s].begin() + (at[s] + t) * kr * es);
      sv.insert(sv.end(), V[s].begin() + at[s] * vr * es, V[s].begin() + (at[s] + t) * vr * es);
    }
    std::vector<float> o(static_cast<std::size_t>(b) * t * orow, NAN),
        l(static_cast<std::size_t>(b) * t * c.h, NAN);
    ExtendPlan plan;
    if (is_extend) {
      session.extend(t, sq.data(), sk.data(), sv.data(), o.data(), l.data(), c.mode, &plan);
      ASSERT_EQ(plan.mode, c.mode == ExtendMode::kAuto ? plan.mode : c.mode);
    } else {
      session.decode(t, sq.data(), sk.data(), sv.data(), o.data(), l.data());
    }
    for (int s = 0; s < b; ++s)
      for (int i = 0; i < t; ++i)
        expect_row(s, at[s] + i, o.data() + (std::int64_t{s} * t + i) * orow,
                   l.data() + std::int64_t{s} * c.h * t + i, t, is_extend ? "extend" : "decode");
    for (int s = 0; s < b; ++s) at[s] += t;
  };
  for (int i = 0; i < c.steps; ++i) step(c.t, false);
  if (c.s1 > 0) step(c.s1, true);
  for (int i = 0; i < c.steps2; ++i) step(c.t2, false);
  for (int s = 0; s < b; ++s) EXPECT_EQ(session.cache().length(s), total[s]);
}

class SessionMpi : public ::testing::TestWithParam<Case> {};
TEST_P(SessionMpi, MatchesSingleProcessCausalAttention) { run_case(GetParam()); }

std::vector<Case> cases() {
  std::vector<Case> out;
  for (CacheLayout cl : {CacheLayout::kRoundRobin, CacheLayout::kContiguous})
    for (ShardLayout pl : {ShardLayout::kZigzag, ShardLayout::kContiguous, ShardLayout::kStriped})
      for (ExtendMode m : {ExtendMode::kPassQ, ExtendMode::kPassKV}) {
        Case c;
        c.name =
            std::string(cache_layout_name(cl)) + "_" + layout_name(pl) + "_" + extend_mode_name(m);
        for (auto& ch : c.name)
          if (ch == '-') ch = '_';
        c.layout = cl;
        c.prefill = pl;
        c.mode = m;
        out.push_back(c);
      }
  Case c;
  c.name = "window_decode_multi_token";
  c.wl = 7;
  c.s1 = 0;
  c.t = 3;
  out.push_back(c);
  c = Case{};
  c.name = "softcap_mqa_page5_dv8";
  c.softcap = 5.0f;
  c.h_k = 1;
  c.d_v = 8;
  c.page = 5;
  c.mode = ExtendMode::kPassKV;
  out.push_back(c);
  c = Case{};
  c.name = "bf16_auto";
  c.dtype = DType::kBF16;
  c.mode = ExtendMode::kAuto;
  c.prompt = {40, 1, 0};
  out.push_back(c);
  c = Case{};
  c.name = "sinks_pass_kv_window_decode";
  c.sinks = true;
  c.mode = ExtendMode::kPassKV;
  out.push_back(c);
  c = Case{};
  c.name = "sinks_window_multi_token";
  c.sinks = true;
  c.wl = 9;
  c.s1 = 0;
  c.t = 2;
  out.push_back(c);
  // attention_chunk: chunk boundaries inside the prompt, the decode steps and the extend
  // (prompts 29 and 13, then 3 steps of 1 token, an extend of 9 and 2 steps of 2).
  for (ExtendMode m : {ExtendMode::kPassQ, ExtendMode::kPassKV})
    for (CacheLayout cl : {CacheLayout::kRoundRobin, CacheLayout::kContiguous}) {
      c = Case{};
      c.name = std::string("chunk_") + (m == ExtendMode::kPassQ ? "pass_q" : "pass_kv") + "_" +
               (cl == CacheLayout::kRoundRobin ? "round_robin" : "contiguous");
      c.chunk = 8;
      c.mode = m;
      c.layout = cl;
      out.push_back(c);
    }
  c = Case{};
  c.name = "chunk_striped_sinks_bf16";
  c.prefill = ShardLayout::kStriped;
  c.chunk = 5;
  c.sinks = true;
  c.dtype = DType::kBF16;
  c.mode = ExtendMode::kPassKV;
  c.s1 = 17;
  out.push_back(c);
  c = Case{};
  c.name = "chunk_window_decode_multi_token";
  c.chunk = 6;
  c.wl = 4;
  c.s1 = 0;
  c.t = 3;
  c.steps2 = 3;
  c.t2 = 4;
  out.push_back(c);
  c = Case{};
  c.name = "short_prompts_page1";
  c.prompt = {1, 2};
  c.page = 1;
  c.t = 2;
  out.push_back(c);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Grid, SessionMpi, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

TEST(SessionErrors, OverflowAndUnsupported) {
  const comm::Communicator& comm = test::world();
  Engine engine(EngineOptions{"reference", 1});
  SessionConfig cfg;
  cfg.b = 1;
  cfg.h = cfg.h_k = 2;
  cfg.d = cfg.d_v = 8;
  cfg.page_size = 4;
  cfg.capacity = 10;
  KvSession session(comm, engine, cfg);
  std::vector<float> buf(64 * 16, 0.5f);
  try {
    session.prefill({11}, buf.data(), buf.data(), buf.data(), buf.data(), buf.data());
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("would hold 11 tokens (0 cached + 11 new), more than the "
                                         "capacity 10"),
              std::string::npos)
        << e.what();
  }
  SessionConfig w = cfg;
  w.mask.window_left = 3;
  KvSession windowed(comm, engine, w);
  windowed.prefill({4}, buf.data(), buf.data(), buf.data(), buf.data(), buf.data());
  EXPECT_THROW(windowed.extend(2, buf.data(), buf.data(), buf.data(), buf.data(), buf.data(),
                               ExtendMode::kPassQ),
               UnsupportedError);
}

TEST(SessionPlan, CostModel) {
  SessionConfig c;
  c.b = 1;
  c.h = 32;
  c.h_k = 8;
  c.d = c.d_v = 128;
  c.dtype = DType::kBF16;
  // A handful of new tokens: every pass-KV step reads a whole context shard for a few rows
  // (memory-bound), pass-Q reads each shard once.
  const ExtendPlan few = plan_extend(c, 16, 65536, 4, ExtendMode::kAuto);
  EXPECT_EQ(few.mode, ExtendMode::kPassQ) << few.why;
  // 128 tokens against 64K at 16 ranks: measured on the Xeon, pass-Q 80 ms, pass-KV 558 ms.
  const ExtendPlan some = plan_extend(c, 16, 65536, 128, ExtendMode::kAuto);
  EXPECT_EQ(some.mode, ExtendMode::kPassQ) << some.why;
  // Many new tokens: pass-Q's merge of [S1, h] records outweighs moving the context.
  const ExtendPlan many = plan_extend(c, 16, 65536, 16384, ExtendMode::kAuto);
  EXPECT_EQ(many.mode, ExtendMode::kPassKV) << many.why;
  EXPECT_GT(many.pass_q_bytes, many.pass_kv_bytes);
  // Forced modes are kept; one rank has nothing to move.
  EXPECT_EQ(plan_extend(c, 16, 65536, 4, ExtendMode::kPassKV).mode, ExtendMode::kPassKV);
  const ExtendPlan one = plan_extend(c, 1, 1000, 10, ExtendMode::kAuto);
  EXPECT_EQ(one.pass_q_bytes, 0.0);
  EXPECT_NE(one.why.find("auto picks"), std::string::npos);
}

}  // namespace
}  // namespace ringattn
