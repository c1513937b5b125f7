// MlaSession under MPI (mpirun -np 1..4): a latent cache sharded across the ranks that
// lives across decode steps of 1 and several tokens (causal multi-token prediction). Every
// output row equals the single-process MLA decode over the sequence's whole history (the
// kernel with cache_seqlens = history + s_q, causal), for both cache layouts, contiguous
// and zigzag prompt shards, page sizes of 1, 5 and 16 tokens, fp32 and bf16, sinks, empty
// prompts and a reduce to one rank.
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
#include "ringattn/mla_params.hpp"
#include "ringattn/mla_session.hpp"

namespace ringattn {
namespace {

struct Case {
  std::string name;
  CacheLayout layout = CacheLayout::kRoundRobin;
  ShardLayout prompt = ShardLayout::kContiguous;
  int page = 5;
  std::vector<int> prompts = {29, 13};
  std::vector<int> steps = {1, 3, 1, 2};  // s_q of each decode step
  int h_q = 8;
  DType q_dtype = DType::kF32, kv_dtype = DType::kF32;
  bool sinks = false;
  int root = -1;
};

void run_case(const Case& c) {
  const comm::Communicator& comm = test::world();
  const int b = static_cast<int>(c.prompts.size());
  const int root = std::min(c.root, comm.size() - 1);  // root 1 is rank 0 with one rank
  const std::size_t qs = dtype_size(c.q_dtype), ks = dtype_size(c.kv_dtype);
  const int D = kMlaHeadDim, DV = kMlaValueDim;
  int new_tokens = 0;
  for (int t : c.steps) new_tokens += t;
  std::vector<std::int64_t> total(b);
  std::int64_t longest = 0;
  for (int s = 0; s < b; ++s) {
    total[s] = c.prompts[s] + new_tokens;
    longest = std::max(longest, total[s]);
  }
  // Whole sequences' latents [total, 576] (same seed on every rank) and step queries.
  std::mt19937 rng(777);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::vector<std::byte>> lat(b);
  for (int s = 0; s < b; ++s) {
    lat[s].resize(static_cast<std::size_t>(total[s] * D) * ks);
    for (std::int64_t j = 0; j < total[s] * D; ++j)
      store_from_f32(lat[s].data(), j, c.kv_dtype, u(rng));
  }
  std::vector<float> sinks(static_cast<std::size_t>(c.h_q));
  for (auto& x : sinks) x = 1.5f * u(rng);
  Engine engine(EngineOptions{"auto", 1});
  const float scale = 0.07f;

  MlaSessionConfig cfg;
  cfg.q_dtype = c.q_dtype;
  cfg.kv_dtype = c.kv_dtype;
  cfg.b = b;
  cfg.h_q = c.h_q;
  cfg.page_size = c.page;
  cfg.capacity = longest;
  cfg.layout = c.layout;
  cfg.prompt_layout = c.prompt;
  cfg.scale = scale;
  cfg.sinks = c.sinks ? sinks.data() : nullptr;
  MlaSession session(comm, engine, cfg);

  // Prefill: this rank's prompt rows, sequence after sequence.
  std::vector<std::byte> mine;
  std::vector<std::int64_t> lens;
  for (int s = 0; s < b; ++s) {
    lens.push_back(c.prompts[s]);
    for (auto pos : session.prefill_positions(c.prompts[s]))
      mine.insert(mine.end(), lat[s].begin() + pos * D * static_cast<std::int64_t>(ks),
                  lat[s].begin() + (pos + 1) * D * static_cast<std::int64_t>(ks));
  }
  session.prefill(lens, mine.empty() ? nullptr : mine.data());

  std::int64_t done = 0;  // new tokens so far
  for (std::size_t step = 0; step < c.steps.size(); ++step) {
    const int t = c.steps[step];
    std::vector<std::byte> q(static_cast<std::size_t>(b) * t * c.h_q * D * qs);
    for (std::int64_t j = 0; j < std::int64_t{b} * t * c.h_q * D; ++j)
      store_from_f32(q.data(), j, c.q_dtype, u(rng));
    std::vector<std::byte> kv(static_cast<std::size_t>(b) * t * D * ks);
    for (int s = 0; s < b; ++s)
      std::copy_n(lat[s].begin() + (c.prompts[s] + done) * D * static_cast<std::int64_t>(ks),
                  std::int64_t{t} * D * static_cast<std::int64_t>(ks),
                  kv.begin() + std::int64_t{s} * t * D * static_cast<std::int64_t>(ks));
    const std::int64_t rows = std::int64_t{b} * t * c.h_q;
    std::vector<float> out(static_cast<std::size_t>(rows * DV), NAN), lse(rows, NAN);
    const StepStats st = session.decode(t, q.data(), kv.data(), out.data(), lse.data(), root);
    EXPECT_GE(st.merge_s, 0.0);
    EXPECT_GE(st.wait_s, 0.0);
    EXPECT_LE(st.wait_s, st.max_wait_s + 1e-12);
    const double tol = c.kv_dtype == DType::kF32 && c.q_dtype == DType::kF32 ? 2e-5 : 2e-3;
    double err = 0.0, lse_err = 0.0;
    // Reference: one process, each sequence's whole history as one paged cache (pages
    // of 7 tokens, identity table), causal over history + the t new tokens.
    for (int s = 0; s < b; ++s) {
      const std::int64_t L = c.prompts[s] + done + t;
      const int page = 7, blocks = static_cast<int>((L + page - 1) / page);
      std::vector<std::byte> cache(static_cast<std::size_t>(std::max(blocks, 1)) * page * D * ks);
      std::copy_n(lat[s].begin(), L * D * static_cast<std::int64_t>(ks), cache.begin());
      std::vector<std::int32_t> table(static_cast<std::size_t>(std::max(blocks, 1)));
      for (int i = 0; i < static_cast<int>(table.size()); ++i) table[i] = i;
      const std::int32_t seqlen = static_cast<std::int32_t>(L);
      std::vector<float> ro(static_cast<std::size_t>(t) * c.h_q * DV), rl(t * c.h_q);
      MlaDecodeParams p;
      p.q_dtype = c.q_dtype;
      p.kv_dtype = c.kv_dtype;
      p.q = q.data() + std::int64_t{s} * t * c.h_q * D * static_cast<std::int64_t>(qs);
      p.kv_cache = cache.data();
      p.out = ro.data();
      p.lse = rl.data();
      p.b = 1;
      p.s_q = t;
      p.h_q = c.h_q;
      p.num_blocks = static_cast<int>(table.size());
      p.page_size = page;
      p.max_blocks = static_cast<int>(table.size());
      p.block_table = table.data();
      p.cache_seqlens = &seqlen;
      p.scale = scale;
      p.causal = true;
      p.sinks = c.sinks ? sinks.data() : nullptr;
      engine.mla_decode(p);
      if (root >= 0 && comm.rank() != root) continue;
      // Largest errors, checked after the step (every rank runs every step: an early
      // return on one rank would leave the others waiting in the next collective).
      for (int i = 0; i < t; ++i)
        for (int hh = 0; hh < c.h_q; ++hh) {
          const std::int64_t r = (std::int64_t{s} * t + i) * c.h_q + hh;
          for (int x = 0; x < DV; ++x)
            err = std::max(err, std::abs(double(out[r * DV + x]) -
                                         ro[(std::int64_t{i} * c.h_q + hh) * DV + x]));
          const double a = lse[(std::int64_t{s} * c.h_q + hh) * t + i], e = rl[hh * t + i];
          if (!(std::isinf(a) && a == e)) lse_err = std::max(lse_err, std::abs(a - e));
          if (std::isnan(a) || std::isnan(out[r * DV])) err = INFINITY;
        }
    }
    EXPECT_LT(err, tol) << c.name << " rank " << comm.rank() << " step " << step;
    EXPECT_LT(lse_err, tol) << c.name << " rank " << comm.rank() << " step " << step;
    done += t;
  }
  for (int s = 0; s < b; ++s) EXPECT_EQ(session.cache().length(s), total[s]);
}

class MlaSessionMpi : public ::testing::TestWithParam<Case> {};
TEST_P(MlaSessionMpi, MatchesSingleProcessMlaDecodeOverTheWholeHistory) { run_case(GetParam()); }

std::vector<Case> cases() {
  std::vector<Case> out;
  for (CacheLayout cl : {CacheLayout::kRoundRobin, CacheLayout::kContiguous})
    for (ShardLayout pl : {ShardLayout::kContiguous, ShardLayout::kZigzag}) {
      Case c;
      c.name = std::string(cache_layout_name(cl)) + "_" + layout_name(pl);
      for (auto& ch : c.name)
        if (ch == '-') ch = '_';
      c.layout = cl;
      c.prompt = pl;
      out.push_back(c);
    }
  Case c;
  c.name = "bf16_sinks_page16";
  c.q_dtype = c.kv_dtype = DType::kBF16;
  c.sinks = true;
  c.page = 16;
  out.push_back(c);
  c = Case{};
  c.name = "fp32_q_bf16_cache_root1_page1";
  c.kv_dtype = DType::kBF16;
  c.page = 1;
  c.root = 1;
  out.push_back(c);
  c = Case{};
  c.name = "empty_and_short_prompts_mtp4";
  c.prompts = {0, 1, 6};
  c.steps = {4, 1, 4};
  c.sinks = true;
  out.push_back(c);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Grid, MlaSessionMpi, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

TEST(MlaSessionErrors, BadConfigAndOverflow) {
  const comm::Communicator& comm = test::world();
  Engine engine(EngineOptions{"reference", 1});
  MlaSessionConfig cfg;
  cfg.b = 1;
  cfg.h_q = 2;
  cfg.page_size = 4;
  cfg.capacity = 3;
  MlaSessionConfig bad = cfg;
  bad.h_q = 129;
  EXPECT_THROW(MlaSession(comm, engine, bad), InvalidArgument);
  bad = cfg;
  bad.kv_dtype = DType::kF16;
  EXPECT_THROW(MlaSession(comm, engine, bad), UnsupportedError);
  MlaSession session(comm, engine, cfg);
  std::vector<float> buf(4 * 2 * kMlaHeadDim, 0.25f);
  session.prefill({2}, buf.data());
  try {
    session.decode(2, buf.data(), buf.data(), buf.data(), buf.data());
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("would hold 4 tokens (2 cached + 2 new), more than the "
                                         "capacity 3"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(session.decode(65, buf.data(), buf.data(), buf.data(), buf.data()), InvalidArgument);
}

}  // namespace
}  // namespace ringattn
