// Distributed MLA decode (mpirun -np 1..4): each rank holds a contiguous slice of every
// sequence's paged latent cache; out, LSE and max_logits equal the single-process MLA
// decode over the whole cache, with causal multi-token queries, sinks (applied once after
// the merge), bf16 caches and a reduce to one rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "mpi_test_main.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/mla_distributed_decode.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn {
namespace {

struct Case {
  std::string name;
  std::vector<int> lens = {50, 33};
  int s_q = 1, h_q = 8, page = 16;
  bool causal = false, sinks = false, max_logits = false;
  DType kv = DType::kF32;
  int root = -1;
};

void run_case(const Case& c) {
  const comm::Communicator& comm = test::world();
  const int P = comm.size(), rank = comm.rank();
  const int b = static_cast<int>(c.lens.size());
  const std::size_t es = dtype_size(c.kv);
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  // Whole caches: sequence i's tokens contiguous [L_i, 576], same on every rank.
  std::vector<std::vector<std::byte>> cache(b);
  for (int i = 0; i < b; ++i) {
    cache[i].resize(static_cast<std::size_t>(c.lens[i]) * kMlaHeadDim * es);
    for (std::int64_t j = 0; j < std::int64_t{c.lens[i]} * kMlaHeadDim; ++j)
      store_from_f32(cache[i].data(), j, c.kv, u(rng));
  }
  std::vector<float> q(static_cast<std::size_t>(b) * c.s_q * c.h_q * kMlaHeadDim);
  for (auto& x : q) x = u(rng);
  std::vector<float> sinks(static_cast<std::size_t>(c.h_q));
  for (auto& x : sinks) x = 2.0f * u(rng);
  Engine engine(EngineOptions{"auto", 1});

  // Paged cache of the tokens [first, first + n) of every sequence; block table identity.
  auto make = [&](const std::vector<std::int64_t>& first, const std::vector<std::int64_t>& n,
                  std::vector<std::byte>& pages, std::vector<std::int32_t>& table,
                  std::vector<std::int32_t>& seqlens, int& max_blocks) {
    max_blocks = 1;
    for (int i = 0; i < b; ++i)
      max_blocks = std::max<int>(max_blocks, static_cast<int>((n[i] + c.page - 1) / c.page));
    pages.assign(static_cast<std::size_t>(b) * max_blocks * c.page * kMlaHeadDim * es,
                 std::byte{0x7f});  // unused slots hold garbage (NaN-like for bf16/fp32)
    table.resize(static_cast<std::size_t>(b) * max_blocks);
    seqlens.resize(static_cast<std::size_t>(b));
    for (int i = 0; i < b; ++i) {
      seqlens[i] = static_cast<std::int32_t>(n[i]);
      for (int k = 0; k < max_blocks; ++k) table[i * max_blocks + k] = i * max_blocks + k;
      std::memcpy(
          pages.data() + static_cast<std::size_t>(i) * max_blocks * c.page * kMlaHeadDim * es,
          cache[i].data() + static_cast<std::size_t>(first[i]) * kMlaHeadDim * es,
          static_cast<std::size_t>(n[i]) * kMlaHeadDim * es);
    }
  };
  auto params = [&](const std::vector<std::byte>& pages, const std::vector<std::int32_t>& table,
                    const std::vector<std::int32_t>& seqlens, int max_blocks, float* out,
                    float* lse, float* ml) {
    MlaDecodeParams p;
    p.q_dtype = DType::kF32;
    p.kv_dtype = c.kv;
    p.out_dtype = DType::kF32;
    p.q = q.data();
    p.kv_cache = pages.data();
    p.out = out;
    p.lse = lse;
    p.max_logits = ml;
    p.b = b;
    p.s_q = c.s_q;
    p.h_q = c.h_q;
    p.num_blocks = b * max_blocks;
    p.page_size = c.page;
    p.max_blocks = max_blocks;
    p.block_table = table.data();
    p.cache_seqlens = seqlens.data();
    p.causal = c.causal;
    p.sinks = c.sinks ? sinks.data() : nullptr;
    return p;
  };
  const std::int64_t rows = std::int64_t{b} * c.s_q * c.h_q;
  // Reference: one process over the whole caches.
  std::vector<std::byte> gp;
  std::vector<std::int32_t> gt, gs;
  int gmb = 0;
  std::vector<std::int64_t> zeros(b, 0), lens(c.lens.begin(), c.lens.end());
  make(zeros, lens, gp, gt, gs, gmb);
  std::vector<float> ro(static_cast<std::size_t>(rows * kMlaValueDim)), rl(rows), rm(rows);
  engine.mla_decode(
      params(gp, gt, gs, gmb, ro.data(), rl.data(), c.max_logits ? rm.data() : nullptr));
  // This rank's slice.
  std::vector<std::int64_t> first(b), n(b);
  std::vector<std::int32_t> global(b);
  for (int i = 0; i < b; ++i) {
    first[i] = decode_shard_first(c.lens[i], P, rank);
    n[i] = decode_shard_length(c.lens[i], P, rank);
    global[i] = c.lens[i];
  }
  std::vector<std::byte> lp;
  std::vector<std::int32_t> lt, ls;
  int lmb = 0;
  make(first, n, lp, lt, ls, lmb);
  std::vector<float> o(ro.size(), NAN), l(rl.size(), NAN), m(rm.size(), NAN);
  mla_distributed_decode(
      comm, engine, params(lp, lt, ls, lmb, o.data(), l.data(), c.max_logits ? m.data() : nullptr),
      global.data(), c.root);
  if (c.root >= 0 && rank != c.root) return;
  const double tol = 3e-5;
  for (std::size_t i = 0; i < ro.size(); ++i)
    ASSERT_NEAR(o[i], ro[i], tol) << c.name << " out " << i;
  for (std::int64_t i = 0; i < rows; ++i) {
    if (std::isinf(rl[i])) {
      ASSERT_EQ(l[i], rl[i]) << c.name << " lse " << i;
    } else {
      ASSERT_NEAR(l[i], rl[i], tol * std::max(1.0f, std::abs(rl[i]))) << c.name << " lse " << i;
    }
    if (c.max_logits) {
      ASSERT_NEAR(m[i], rm[i], tol) << c.name << " max_logits " << i;
    }
  }
}

class MlaMpi : public ::testing::TestWithParam<Case> {};
TEST_P(MlaMpi, MatchesSingleProcessMlaDecode) { run_case(GetParam()); }

std::vector<Case> cases() {
  std::vector<Case> out;
  out.push_back({"plain"});
  Case c{"causal_mtp_sinks_maxlogits"};
  c.s_q = 3;
  c.causal = true;
  c.sinks = true;
  c.max_logits = true;
  out.push_back(c);
  c = Case{"bf16_cache_root0_page5"};
  c.kv = DType::kBF16;
  c.root = 0;
  c.page = 5;
  c.sinks = true;
  out.push_back(c);
  c = Case{"h128_short_sequence"};
  c.h_q = 128;
  c.lens = {2, 70};
  out.push_back(c);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Grid, MlaMpi, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

TEST(MlaMpiErrors, CausalSliceOverlappingQueries) {
  const comm::Communicator& comm = test::world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Case c{"overlap"};
  c.lens = {4, 4};
  c.s_q = 4;
  c.causal = true;
  EXPECT_THROW(run_case(c), InvalidArgument);
}

}  // namespace
}  // namespace ringattn
