// Ring attention under MPI (run with mpirun -np 1..4): for every layout, causal or
// not, windows, GQA/MQA, uneven lengths, varlen and bf16, the output and LSE gathered
// on rank 0 equal the single-process kernel result on the whole problem. The same
// for Ulysses x ring grids (U = 2, 4 where U divides the ranks), K/V heads replicated
// when U > h_k. Attention sinks must be applied once, after the last merge: a sink
// applied per block would scale the output several times and fail these comparisons.
// attention_chunk (chunked local attention) at global positions: chunks smaller than a
// shard, not dividing it or the striped stride, with causal, windows, varlen, GQA, sinks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mpi_test_main.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/ulysses_attention.hpp"

namespace ringattn {
namespace {

struct Case {
  std::string name;
  ShardLayout layout;
  std::vector<int> lens;  // one entry = dense batch of `batch` sequences
  int batch = 1;
  int h = 4, h_k = 4, d = 32;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0.0f;
  DType dtype = DType::kF32;
  bool varlen = false;
  RingMode mode = RingMode::kPassKV;
  int piece = 16;      // RingOptions::piece_rows (0 = automatic)
  int ulysses = 0;     // > 0: hybrid_attention_forward with this U (skipped unless U | P)
  bool sinks = false;  // attention-sink logits on every head
  int chunk = 0;       // attention_chunk (0 = off)
};

// Sink logits [h]: finite values near the LSE, plus -inf (none) and +inf (output 0).
std::vector<float> sink_logits(int h) {
  const float inf = std::numeric_limits<float>::infinity();
  const float pattern[] = {1.0f, -inf, 3.5f, inf, 0.0f, 5.0f};
  std::vector<float> s(static_cast<std::size_t>(h));
  for (int i = 0; i < h; ++i) s[static_cast<std::size_t>(i)] = pattern[i % 6];
  return s;
}

std::vector<std::byte> random_tensor(std::mt19937& rng, std::int64_t n, DType t) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::byte> out(static_cast<std::size_t>(n) * dtype_size(t));
  for (std::int64_t i = 0; i < n; ++i) store_from_f32(out.data(), i, t, u(rng));
  return out;
}

void run_case(const Case& c) {
  const comm::Communicator& comm = test::world();
  const int P = comm.size(), rank = comm.rank();
  // Global problem (identical on every rank: same seed).
  std::vector<std::int32_t> cu{0};
  const int b = c.varlen ? static_cast<int>(c.lens.size()) : c.batch;
  for (int i = 0; i < b; ++i) cu.push_back(cu.back() + (c.varlen ? c.lens[i] : c.lens[0]));
  const std::int64_t total = cu.back();
  std::mt19937 rng(1234);
  const auto q = random_tensor(rng, total * c.h * c.d, c.dtype);
  const auto k = random_tensor(rng, total * c.h_k * c.d, c.dtype);
  const auto v = random_tensor(rng, total * c.h_k * c.d, c.dtype);
  Engine engine(EngineOptions{"auto", 1});

  // Single-process kernel on the whole problem.
  std::vector<float> ref_out(static_cast<std::size_t>(total * c.h * c.d), NAN);
  std::vector<float> ref_lse(static_cast<std::size_t>(total * c.h), NAN);
  FwdParams f;
  f.dtype = c.dtype;
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.out = ref_out.data();
  f.lse = ref_lse.data();
  f.h = c.h;
  f.h_k = c.h_k;
  f.d = f.d_v = c.d;
  f.q_row_stride = std::int64_t{c.h} * c.d;
  f.k_row_stride = f.v_row_stride = std::int64_t{c.h_k} * c.d;
  f.out_row_stride = std::int64_t{c.h} * c.d;
  f.q_head_stride = f.k_head_stride = f.v_head_stride = f.out_head_stride = c.d;
  f.b = b;
  f.mask.causal = c.causal;
  f.mask.window_left = c.wl;
  f.mask.window_right = c.wr;
  f.mask.softcap = c.softcap;
  f.mask.attention_chunk = c.chunk;
  const std::vector<float> sinks = sink_logits(c.h);
  if (c.sinks) f.mask.sinks = sinks.data();
  if (c.varlen) {
    f.cu_seqlens_q = f.cu_seqlens_k = cu.data();
    int longest = 0;
    for (int i = 0; i < b; ++i) longest = std::max(longest, cu[i + 1] - cu[i]);
    f.s_q = f.s_k = longest;
  } else {
    f.s_q = f.s_k = c.lens[0];
    f.q_batch_stride = f.s_q * f.q_row_stride;
    f.k_batch_stride = f.v_batch_stride = f.s_k * f.k_row_stride;
    f.out_batch_stride = f.s_q * f.out_row_stride;
  }
  engine.forward(f);

  // Ring: shard by layout, run, gather.
  RingAttentionParams p;
  p.dtype = c.dtype;
  p.b = b;
  p.s = c.varlen ? 0 : c.lens[0];
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = p.d_v = c.d;
  p.cu_seqlens = c.varlen ? cu.data() : nullptr;
  p.mask = f.mask;
  p.layout = c.layout;
  if (c.ulysses > 0 && P % c.ulysses != 0)
    GTEST_SKIP() << "U=" << c.ulysses << " does not divide P=" << P;
  const auto spans_of = [&](int r) {
    comm::RowSpans s;
    for (int i = 0; i < b; ++i) {
      if (c.ulysses > 0) {  // hybrid layout: one span per token
        for (auto pos : hybrid_shard_positions(c.layout, cu[i + 1] - cu[i], P, c.ulysses, r))
          s.push_back({cu[i] + pos, 1, 1});
        continue;
      }
      for (const auto& ch : shard_chunks(c.layout, cu[i + 1] - cu[i], P, r))
        s.push_back({cu[i] + ch.first, ch.count, ch.stride});
    }
    return s;
  };
  const std::int64_t rows =
      c.ulysses > 0 ? comm::total_rows(spans_of(rank)) : ring_local_rows(p, P, rank);
  ASSERT_EQ(rows, comm::total_rows(spans_of(rank)));
  const std::size_t es = dtype_size(c.dtype);
  std::vector<std::byte> lq(static_cast<std::size_t>(rows * c.h * c.d) * es),
      lk(static_cast<std::size_t>(rows * c.h_k * c.d) * es), lv(lk.size());
  comm::scatter_rows(comm, 0, q.data(), static_cast<std::size_t>(c.h * c.d) * es, spans_of,
                     lq.data());
  comm::scatter_rows(comm, 0, k.data(), static_cast<std::size_t>(c.h_k * c.d) * es, spans_of,
                     lk.data());
  comm::scatter_rows(comm, 0, v.data(), static_cast<std::size_t>(c.h_k * c.d) * es, spans_of,
                     lv.data());
  std::vector<float> lo(static_cast<std::size_t>(rows * c.h * c.d), NAN),
      ll(static_cast<std::size_t>(rows * c.h), NAN);
  p.q = lq.data();
  p.k = lk.data();
  p.v = lv.data();
  p.out = lo.data();
  p.lse = ll.data();
  if (c.ulysses > 0) {
    HybridStats hs;
    hybrid_attention_forward(comm, engine, p, c.ulysses, c.mode, RingOptions{true, c.piece}, &hs);
    ASSERT_EQ(hs.ulysses * hs.ring, P);
    ASSERT_EQ(static_cast<int>(hs.ring_stats.steps.size()), hs.ring);
    if (c.ulysses > 1) {
      ASSERT_GT(hs.alltoall_bytes, 0);
    }
  } else {
    RingStats stats;
    ring_attention(comm, engine, c.mode, p, RingOptions{true, c.piece}, &stats);
    ASSERT_EQ(static_cast<int>(stats.steps.size()), P);
  }

  // LSE to rows [rows, h] for the gather, then compare on rank 0.
  std::vector<float> lrows(ll.size());
  const std::int64_t n = c.varlen ? rows : rows / b;
  for (std::int64_t r = 0; r < rows; ++r)
    for (int hh = 0; hh < c.h; ++hh) {
      const std::int64_t bi = c.varlen ? 0 : r / n, i = c.varlen ? r : r % n;
      lrows[r * c.h + hh] = ll[(bi * c.h + hh) * n + i];
    }
  std::vector<float> go(rank == 0 ? ref_out.size() : 0, NAN),
      gl(rank == 0 ? ref_lse.size() : 0, NAN);
  comm::gather_rows(comm, 0, lo.data(), static_cast<std::size_t>(c.h * c.d) * 4, spans_of,
                    go.data());
  comm::gather_rows(comm, 0, lrows.data(), static_cast<std::size_t>(c.h) * 4, spans_of, gl.data());
  if (rank != 0) return;
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 2e-3;
  double max_o = 0.0;
  for (float x : ref_out) max_o = std::max(max_o, double(std::abs(x)));
  for (std::size_t i = 0; i < ref_out.size(); ++i)
    ASSERT_NEAR(go[i], ref_out[i], tol * std::max(1.0, max_o)) << c.name << " out element " << i;
  for (std::int64_t g = 0; g < total; ++g)
    for (int hh = 0; hh < c.h; ++hh) {
      // Kernel LSE: dense [b, h, s], varlen [h, total].
      const float r = c.varlen ? ref_lse[hh * total + g]
                               : ref_lse[((g / c.lens[0]) * c.h + hh) * c.lens[0] + g % c.lens[0]];
      const float x = gl[g * c.h + hh];
      if (std::isinf(r)) {
        ASSERT_EQ(x, r) << c.name << " lse row " << g;
      } else {
        ASSERT_NEAR(x, r, tol * std::max(1.0f, std::abs(r))) << c.name << " lse row " << g;
      }
    }
}

class RingMpi : public ::testing::TestWithParam<Case> {};

TEST_P(RingMpi, MatchesSingleProcessKernel) { run_case(GetParam()); }

std::vector<Case> cases() {
  std::vector<Case> out;
  for (ShardLayout l : {ShardLayout::kContiguous, ShardLayout::kZigzag, ShardLayout::kStriped}) {
    const std::string ln = layout_name(l);
    out.push_back({ln + "_full", l, {61}, 2});
    out.push_back({ln + "_causal", l, {67}, 1, 4, 4, 32, true});
    out.push_back({ln + "_causal_window", l, {53}, 1, 4, 2, 32, true, 9, -1});
    out.push_back({ln + "_window_both", l, {45}, 1, 4, 4, 32, false, 6, 3});
    out.push_back({ln + "_gqa_softcap", l, {40}, 2, 6, 2, 64, true, -1, -1, 15.0f});
    out.push_back({ln + "_mqa", l, {37}, 1, 6, 1, 32, true});
    out.push_back(
        {ln + "_varlen", l, {23, 1, 0, 40, 9}, 1, 4, 2, 32, true, -1, -1, 0.0f, DType::kF32, true});
    out.push_back({ln + "_bf16", l, {50}, 1, 4, 4, 32, true, -1, -1, 0.0f, DType::kBF16});
    Case c{ln + "_causal_sinks", l, {59}, 2, 6, 2, 32, true};
    c.sinks = true;
    out.push_back(c);
    c = {ln + "_varlen_sinks", l,   {23, 1, 0, 40}, 1, 6, 6, 32, false, 7, 2, 0.0f,
         DType::kF32,          true};
    c.sinks = true;
    out.push_back(c);
  }
  out.push_back(
      {"zigzag_fp16", ShardLayout::kZigzag, {33}, 1, 4, 4, 32, true, -1, -1, 0.0f, DType::kF16});
  // Chunked local attention (attention_chunk): the ring applies the chunk rule at global
  // positions and skips the blocks it hides.
  for (ShardLayout l : {ShardLayout::kContiguous, ShardLayout::kZigzag, ShardLayout::kStriped}) {
    const std::string ln = layout_name(l);
    Case c{ln + "_full_chunk", l, {61}, 2};
    c.chunk = 8;
    out.push_back(c);
    c = {ln + "_causal_chunk", l, {67}, 1, 4, 4, 32, true};
    c.chunk = 13;
    out.push_back(c);
    c = {ln + "_causal_window_chunk", l, {53}, 1, 4, 2, 32, true, 9, -1};
    c.chunk = 20;
    out.push_back(c);
    c = {ln + "_window_both_chunk", l, {45}, 1, 4, 4, 32, false, 6, 3};
    c.chunk = 5;
    out.push_back(c);
    c = {ln + "_varlen_chunk_sinks",
         l,
         {23, 1, 0, 40, 9},
         1,
         6,
         2,
         32,
         true,
         -1,
         -1,
         0.0f,
         DType::kF32,
         true};
    c.chunk = 7;
    c.sinks = true;
    out.push_back(c);
    c = {ln + "_causal_chunk_bf16_gqa", l, {50}, 1, 6, 2, 32, true, -1, -1, 0.0f, DType::kBF16};
    c.chunk = 16;
    out.push_back(c);
  }
  // Whole chunks per kernel call: several key chunks merged into one call.
  const std::size_t n_pass_kv = out.size();
  for (std::size_t i = 0; i < n_pass_kv; ++i) {
    const std::string& n = out[i].name;
    if (n.find("_causal") == std::string::npos && n.find("_full") == std::string::npos &&
        n.find("_sinks") == std::string::npos && n.find("_window_both") == std::string::npos &&
        n.find("_varlen") == std::string::npos)
      continue;
    Case c = out[i];
    c.name += "_whole_chunks";
    c.piece = 0;
    out.push_back(c);
  }
  // Pass-Q ring: the same problems with the queries travelling.
  for (std::size_t i = 0; i < n_pass_kv; ++i) {
    Case c = out[i];
    c.name = "pass_q_" + c.name;
    c.mode = RingMode::kPassQ;
    if (i % 2 == 0) c.piece = 0;
    out.push_back(c);
  }
  // Ulysses x ring (U = 1 is the plain ring through the hybrid entry point).
  for (int u : {1, 2, 4}) {
    for (ShardLayout l : {ShardLayout::kContiguous, ShardLayout::kZigzag, ShardLayout::kStriped}) {
      const std::string pre = "ulysses" + std::to_string(u) + "_" + layout_name(l);
      Case c{pre + "_causal_gqa", l, {67}, 2, 8, 2, 32, true};
      c.ulysses = u;
      out.push_back(c);
      c = {pre + "_window_softcap", l, {45}, 1, 8, 4, 32, false, 6, 3, 12.0f};
      c.ulysses = u;
      out.push_back(c);
      c = {pre + "_varlen", l,   {23, 1, 0, 40, 9}, 1, 8, 8, 32, true, -1, -1, 0.0f,
           DType::kF32,     true};
      c.ulysses = u;
      out.push_back(c);
      c = {pre + "_causal_gqa_chunk", l, {67}, 2, 8, 2, 32, true};
      c.ulysses = u;
      c.chunk = 11;
      out.push_back(c);
    }
    Case c{"ulysses" + std::to_string(u) + "_zigzag_bf16_mqa",
           ShardLayout::kZigzag,
           {50},
           1,
           4,
           1,
           32,
           true,
           -1,
           -1,
           0.0f,
           DType::kBF16};
    c.ulysses = u;
    out.push_back(c);
    c = {"ulysses" + std::to_string(u) + "_pass_q_zigzag",
         ShardLayout::kZigzag,
         {61},
         1,
         4,
         2,
         32,
         true};
    c.ulysses = u;
    c.mode = RingMode::kPassQ;
    out.push_back(c);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Grid, RingMpi, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// One rank disagreeing on a shape stops every rank with the same message.
TEST(RingMpiErrors, MismatchedShapeOnOneRank) {
  const comm::Communicator& comm = test::world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  RingAttentionParams p;
  p.b = 1;
  p.s = 16;
  p.h = comm.rank() == 1 ? 8 : 4;
  p.h_k = 4;
  p.d = p.d_v = 32;
  std::vector<float> buf(16 * 8 * 32);
  p.q = p.k = p.v = buf.data();
  p.out = buf.data();
  Engine engine(EngineOptions{"reference", 1});
  try {
    ring_attention_forward(comm, engine, p);
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("ranks disagree on 'heads': rank 0 has 4, rank 1 has 8"),
              std::string::npos)
        << e.what();
  }
}

// A Ulysses degree that differs on one rank, or does not divide P or h, stops every
// rank with the same message naming the numbers.
TEST(RingMpiErrors, UlyssesDegreeChecks) {
  const comm::Communicator& comm = test::world();
  RingAttentionParams p;
  p.b = 1;
  p.s = 16;
  p.h = 4;
  p.h_k = 4;
  p.d = p.d_v = 32;
  std::vector<float> buf(16 * 8 * 32);
  p.q = p.k = p.v = buf.data();
  p.out = buf.data();
  Engine engine(EngineOptions{"reference", 1});
  const int P = comm.size();
  try {
    hybrid_attention_forward(comm, engine, p, P + 1, RingMode::kPassKV);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string want = "ulysses: degree U=" + std::to_string(P + 1) +
                             " must divide the number of ranks P=" + std::to_string(P);
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
  p.h = 6;
  p.h_k = 6;
  if (P == 4) {
    EXPECT_THROW(hybrid_attention_forward(comm, engine, p, 4, RingMode::kPassKV), InvalidArgument);
  }
  if (P == 2) {
    p.h = 4;
    p.h_k = 4;
    try {
      hybrid_attention_forward(comm, engine, p, comm.rank() == 1 ? 2 : 1, RingMode::kPassKV);
      FAIL() << "expected CommError";
    } catch (const CommError& e) {
      EXPECT_NE(
          std::string(e.what()).find("ranks disagree on 'ulysses': rank 0 has 1, rank 1 has 2"),
          std::string::npos)
          << e.what();
    }
  }
}

// Distributed decode with attention sinks (allreduce and reduce to a root) equals the
// single-process kernel over the whole cache: the sink is applied once after the
// reduction.
TEST(DecodeMpi, SinksAppliedOnceAfterTheReduction) {
  const comm::Communicator& comm = test::world();
  const int P = comm.size(), rank = comm.rank();
  const int b = 2, s_q = 3, h = 6, h_k = 2, d = 32;
  const std::int64_t s = 157;
  std::mt19937 rng(99);
  const auto q = random_tensor(rng, std::int64_t{b} * s_q * h * d, DType::kF32);
  const auto k = random_tensor(rng, b * s * h_k * d, DType::kF32);
  const auto v = random_tensor(rng, b * s * h_k * d, DType::kF32);
  const std::vector<float> sinks = sink_logits(h);
  Engine engine(EngineOptions{"auto", 1});
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    // Reference: one kernel call over the whole cache.
    std::vector<float> ref_out(static_cast<std::size_t>(b * s_q * h * d)),
        ref_lse(static_cast<std::size_t>(b * s_q * h));
    FwdParams f;
    f.q = q.data();
    f.k = k.data();
    f.v = v.data();
    f.out = ref_out.data();
    f.lse = ref_lse.data();
    f.b = b;
    f.s_q = s_q;
    f.s_k = static_cast<int>(s);
    f.h = h;
    f.h_k = h_k;
    f.d = f.d_v = d;
    set_contiguous_strides(f);
    f.mask.causal = causal;
    f.mask.sinks = sinks.data();
    engine.forward(f);
    // This rank's shard of every sequence's cache.
    const std::int64_t k0 = decode_shard_first(s, P, rank), n = decode_shard_length(s, P, rank);
    std::vector<float> kc(static_cast<std::size_t>(b * n * h_k * d)), vc(kc.size());
    for (int bi = 0; bi < b; ++bi) {
      const std::size_t row = static_cast<std::size_t>(h_k) * d * sizeof(float);
      std::memcpy(&kc[static_cast<std::size_t>(bi * n * h_k * d)], k.data() + (bi * s + k0) * row,
                  static_cast<std::size_t>(n) * row);
      std::memcpy(&vc[static_cast<std::size_t>(bi * n * h_k * d)], v.data() + (bi * s + k0) * row,
                  static_cast<std::size_t>(n) * row);
    }
    for (int root : {-1, 0}) {
      DecodeParams p;
      p.q = q.data();
      p.k_cache = kc.data();
      p.v_cache = vc.data();
      std::vector<float> out(ref_out.size(), NAN), lse(ref_lse.size(), NAN);
      p.out = out.data();
      p.lse = lse.data();
      p.b = b;
      p.s_q = s_q;
      p.h = h;
      p.h_k = h_k;
      p.d = p.d_v = d;
      p.s_cache = s;
      p.mask.causal = causal;
      p.mask.sinks = sinks.data();
      p.root = root;
      distributed_decode(comm, engine, p);
      if (root >= 0 && rank != root) continue;
      for (std::size_t i = 0; i < out.size(); ++i)
        ASSERT_NEAR(out[i], ref_out[i], 1e-5) << "root " << root << " out element " << i;
      for (std::size_t i = 0; i < lse.size(); ++i)
        ASSERT_NEAR(lse[i], ref_lse[i], 1e-5 * std::max(1.0f, std::abs(ref_lse[i])))
            << "root " << root << " lse element " << i;
    }
  }
}

// Distributed decode with attention_chunk: each rank's shard applies the chunk rule at
// its global key offsets (s_q rows near the end of the cache, chunks that cut shards and
// the query rows), the result equals the single-process kernel; with a window too.
TEST(DecodeMpi, AttentionChunkAtGlobalPositions) {
  const comm::Communicator& comm = test::world();
  const int P = comm.size(), rank = comm.rank();
  const int b = 2, h = 6, h_k = 2, d = 32;
  const std::int64_t s = 157;
  Engine engine(EngineOptions{"auto", 1});
  struct Run {
    int s_q, chunk, wl;
    bool causal;
  };
  for (const Run& run : {Run{1, 40, -1, true}, Run{5, 13, -1, true}, Run{4, 60, -1, false},
                         Run{7, 16, 9, true}, Run{3, 157, -1, true}, Run{2, 1, -1, false}}) {
    SCOPED_TRACE("s_q " + std::to_string(run.s_q) + " chunk " + std::to_string(run.chunk));
    const int s_q = run.s_q;
    std::mt19937 rng(7 + run.chunk);
    const auto q = random_tensor(rng, std::int64_t{b} * s_q * h * d, DType::kF32);
    const auto k = random_tensor(rng, b * s * h_k * d, DType::kF32);
    const auto v = random_tensor(rng, b * s * h_k * d, DType::kF32);
    std::vector<float> ref_out(static_cast<std::size_t>(b * s_q * h * d)),
        ref_lse(static_cast<std::size_t>(b * s_q * h));
    FwdParams f;
    f.q = q.data();
    f.k = k.data();
    f.v = v.data();
    f.out = ref_out.data();
    f.lse = ref_lse.data();
    f.b = b;
    f.s_q = s_q;
    f.s_k = static_cast<int>(s);
    f.h = h;
    f.h_k = h_k;
    f.d = f.d_v = d;
    set_contiguous_strides(f);
    f.mask.causal = run.causal;
    f.mask.window_left = run.wl;
    f.mask.attention_chunk = run.chunk;
    engine.forward(f);
    const std::int64_t k0 = decode_shard_first(s, P, rank), n = decode_shard_length(s, P, rank);
    std::vector<float> kc(static_cast<std::size_t>(b * n * h_k * d)), vc(kc.size());
    for (int bi = 0; bi < b; ++bi) {
      const std::size_t row = static_cast<std::size_t>(h_k) * d * sizeof(float);
      std::memcpy(&kc[static_cast<std::size_t>(bi * n * h_k * d)], k.data() + (bi * s + k0) * row,
                  static_cast<std::size_t>(n) * row);
      std::memcpy(&vc[static_cast<std::size_t>(bi * n * h_k * d)], v.data() + (bi * s + k0) * row,
                  static_cast<std::size_t>(n) * row);
    }
    DecodeParams p;
    p.q = q.data();
    p.k_cache = kc.data();
    p.v_cache = vc.data();
    std::vector<float> out(ref_out.size(), NAN), lse(ref_lse.size(), NAN);
    p.out = out.data();
    p.lse = lse.data();
    p.b = b;
    p.s_q = s_q;
    p.h = h;
    p.h_k = h_k;
    p.d = p.d_v = d;
    p.s_cache = s;
    p.mask = f.mask;
    distributed_decode(comm, engine, p);
    for (std::size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], ref_out[i], 1e-5) << "out element " << i;
    for (std::size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(ref_lse[i])) {
        ASSERT_EQ(lse[i], ref_lse[i]) << "lse element " << i;
      } else {
        ASSERT_NEAR(lse[i], ref_lse[i], 1e-5 * std::max(1.0f, std::abs(ref_lse[i])))
            << "lse element " << i;
      }
    }
  }
}

// A negative attention_chunk, or chunk positions the ring sets itself, stop every rank
// with the same message naming the field.
TEST(RingMpiErrors, BadAttentionChunk) {
  const comm::Communicator& comm = test::world();
  RingAttentionParams p;
  p.b = 1;
  p.s = 16;
  p.h = p.h_k = 4;
  p.d = p.d_v = 32;
  std::vector<float> buf(16 * 8 * 32);
  p.q = p.k = p.v = buf.data();
  p.out = buf.data();
  Engine engine(EngineOptions{"reference", 1});
  p.mask.attention_chunk = -3;
  try {
    ring_attention_forward(comm, engine, p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("attention_chunk"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("-3"), std::string::npos) << e.what();
  }
  p.mask.attention_chunk = 4;
  const std::int64_t pos = 0;
  p.mask.chunk_q_pos = p.mask.chunk_k_pos = &pos;
  try {
    ring_attention_forward_pass_q(comm, engine, p);
    FAIL() << "expected UnsupportedError";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(std::string(e.what()).find("chunk_q_pos"), std::string::npos) << e.what();
  }
}

TEST(RingMpiErrors, TooManyRanksForSequence) {
  const comm::Communicator& comm = test::world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  RingAttentionParams p;
  p.b = 1;
  p.s = 1;
  p.h = p.h_k = 1;
  p.d = p.d_v = 8;
  std::vector<float> buf(64);
  p.q = p.k = p.v = buf.data();
  p.out = buf.data();
  Engine engine(EngineOptions{"reference", 1});
  EXPECT_THROW(ring_attention_forward(comm, engine, p), InvalidArgument);
}

// comm::exchange_blocks: several blocks per pair (one empty) land where each receive
// says, in list order, with `overlap` run once; a block to the calling rank is refused.
TEST(CommExchange, BlocksLandInListOrder) {
  const comm::Communicator& comm = test::world();
  const int P = comm.size(), r = comm.rank();
  auto size_of = [](int from, int to, int blk) {
    return blk == 1 ? std::size_t{0} : static_cast<std::size_t>(7 * from + 3 * to + 5 * blk + 1);
  };
  auto value = [](int from, int to, int blk, std::size_t i) {
    return static_cast<unsigned char>(31 * from + 17 * to + 5 * blk + i);
  };
  std::vector<std::vector<unsigned char>> out, in;
  std::vector<comm::PeerBlock> sends, recvs;
  for (int j = 0; j < P; ++j) {
    if (j == r) continue;
    for (int blk = 0; blk < 3; ++blk) {
      auto& o = out.emplace_back(size_of(r, j, blk));
      for (std::size_t i = 0; i < o.size(); ++i) o[i] = value(r, j, blk, i);
      in.emplace_back(size_of(j, r, blk), 0xEE);
    }
  }
  // Blocks of one pair listed in order, each received into a buffer of its own.
  for (std::size_t n = 0; n < out.size(); ++n) {
    const int j =
        static_cast<int>(n / 3) < r ? static_cast<int>(n / 3) : static_cast<int>(n / 3) + 1;
    sends.push_back({j, out[n].data(), out[n].size()});
    recvs.push_back({j, in[n].data(), in[n].size()});
  }
  int overlaps = 0;
  comm::exchange_blocks(comm, sends, recvs, [&] { ++overlaps; });
  EXPECT_EQ(overlaps, 1);
  for (std::size_t n = 0; n < in.size(); ++n) {
    const int j =
        static_cast<int>(n / 3) < r ? static_cast<int>(n / 3) : static_cast<int>(n / 3) + 1;
    const int blk = static_cast<int>(n % 3);
    for (std::size_t i = 0; i < in[n].size(); ++i)
      ASSERT_EQ(in[n][i], value(j, r, blk, i)) << "block " << blk << " from " << j << " byte " << i;
  }
  unsigned char b = 0;
  EXPECT_THROW(comm::exchange_blocks(comm, {{r, &b, 1}}, {}), InvalidArgument);
}

TEST(RingBlockMask, Classification) {
  // Contiguous causal: chunk after the query chunk hidden, before it full, same diagonal.
  EXPECT_EQ(classify_block(10, 10, 20, 10, 1, -1, 0).kind, BlockMask::kHidden);
  EXPECT_EQ(classify_block(20, 10, 0, 10, 1, -1, 0).kind, BlockMask::kFull);
  const BlockMask diag = classify_block(10, 10, 10, 10, 1, -1, 0);
  EXPECT_EQ(diag.kind, BlockMask::kPartial);
  EXPECT_EQ(diag.shift, 0);
  // Striped causal: key rank after query rank -> shift -1.
  const BlockMask st = classify_block(1, 8, 2, 8, 4, -1, 0);
  EXPECT_EQ(st.kind, BlockMask::kPartial);
  EXPECT_EQ(st.shift, -1);
  // A window that ends before the key chunk: hidden.
  EXPECT_EQ(classify_block(100, 10, 0, 10, 1, 5, 0).kind, BlockMask::kHidden);
}

}  // namespace
}  // namespace ringattn
