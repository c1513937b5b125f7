// Chunked local attention (MaskParams::attention_chunk, FA3 semantics): the visible key
// sets checked exactly on every backend, next to the float64 grids of test_fwd_dense /
// test_fwd_varlen / test_kvcache that include chunk cases. With q = 0 every visible
// score is 0, so lse = log(number of visible keys) and rows that see none give -inf.
// The tables are counted by hand from the rule: key j is visible from row i only when
// it lies in the chunk of the diagonal key p = i + s_k - s_q, [C floor(p / C), + C).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "reference_f64.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

struct ChunkCount {
  const char* name;
  int s_q, s_k, chunk;
  bool causal;
  int wl;
  std::vector<int> visible;  // [s_q]
  // Chunk positions (MaskParams::chunk_q_pos / chunk_k_pos), used when `positions`.
  bool positions = false;
  std::int64_t q_pos = 0, k_pos = 0;
  int stride = 1;
};

const std::vector<ChunkCount>& chunk_counts() {
  static const std::vector<ChunkCount> cases = {
      // p = 7, 8, 9: chunks [4, 8), [8, 12) cut at s_k = 10.
      {"full_3x10_c4", 3, 10, 4, false, -1, {4, 2, 2}},
      {"causal_3x10_c4", 3, 10, 4, true, -1, {4, 1, 2}},
      // p = -3 .. 1: negative positions sit in chunks with no key.
      {"causal_5x2_c2", 5, 2, 2, true, -1, {0, 0, 0, 1, 2}},
      // Window and chunk together: the tighter bound wins on each side.
      {"local_6x6_l1_c4", 6, 6, 4, true, 1, {1, 2, 2, 2, 1, 2}},
      // Chunk 1: each row sees only its diagonal key.
      {"full_4x4_c1", 4, 4, 1, false, -1, {1, 1, 1, 1}},
      // Chunk larger than the sequence: no effect.
      {"causal_3x5_c64", 3, 5, 64, true, -1, {3, 4, 5}},
      // Chunk positions (a block of a longer sequence). Rows at 5, 6, 7 (chunk [4, 8)),
      // keys at 2..7: keys j = 2..5 for every row.
      {"pos_3x6_c4", 3, 6, 4, false, -1, {4, 4, 4}, true, 5, 2, 1},
      // The same with the local causal rule (shift 3: row i sees j <= i + 3).
      {"pos_causal_3x6_c4", 3, 6, 4, true, -1, {2, 3, 4}, true, 5, 2, 1},
      // Stride 2: rows at 5, 7 (chunks [0, 6), [6, 12)), keys at 0, 2, 4, 6, 8.
      {"pos_stride2_2x5_c6", 2, 5, 6, false, -1, {3, 2}, true, 5, 0, 2},
      // Negative positions: rows at -3, -2, -1 (chunk [-4, 0)), keys at -6 .. -1.
      {"pos_negative_3x6_c4", 3, 6, 4, false, -1, {4, 4, 4}, true, -3, -6, 1},
  };
  return cases;
}

FwdParams zero_q_problem(const ChunkCount& cc, std::vector<float>& q, std::vector<float>& kv,
                         std::vector<float>& out, std::vector<float>& lse,
                         std::vector<std::int64_t>& pos) {
  const int d = 8;
  q.assign(static_cast<std::size_t>(cc.s_q) * d, 0.0f);
  kv.assign(static_cast<std::size_t>(cc.s_k) * d, 1.0f);
  out.assign(static_cast<std::size_t>(cc.s_q) * d, 0.0f);
  lse.assign(static_cast<std::size_t>(cc.s_q), 0.0f);
  FwdParams p;
  p.q = q.data();
  p.k = p.v = kv.data();
  p.out = out.data();
  p.lse = lse.data();
  p.b = 1;
  p.s_q = cc.s_q;
  p.s_k = cc.s_k;
  p.h = p.h_k = 1;
  p.d = p.d_v = d;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = d;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = d;
  p.q_batch_stride = p.out_batch_stride = std::int64_t{cc.s_q} * d;
  p.k_batch_stride = p.v_batch_stride = std::int64_t{cc.s_k} * d;
  p.mask.causal = cc.causal;
  p.mask.window_left = cc.wl;
  p.mask.attention_chunk = cc.chunk;
  if (cc.positions) {
    pos = {cc.q_pos, cc.k_pos};
    p.mask.chunk_q_pos = &pos[0];
    p.mask.chunk_k_pos = &pos[1];
    p.mask.chunk_stride = cc.stride;
  }
  return p;
}

class AttentionChunk : public ::testing::TestWithParam<std::string> {};

TEST_P(AttentionChunk, LseCountsTheKeysOfTheChunk) {
  for (const ChunkCount& cc : chunk_counts()) {
    SCOPED_TRACE(cc.name);
    std::vector<float> q, kv, out, lse;
    std::vector<std::int64_t> pos;
    const FwdParams p = zero_q_problem(cc, q, kv, out, lse, pos);
    std::vector<double> expect(static_cast<std::size_t>(cc.s_q));
    for (int i = 0; i < cc.s_q; ++i)
      expect[static_cast<std::size_t>(i)] =
          cc.visible[static_cast<std::size_t>(i)] > 0
              ? std::log(static_cast<double>(cc.visible[static_cast<std::size_t>(i)]))
              : -std::numeric_limits<double>::infinity();
    const RefResult ref = reference_forward(p);
    EXPECT_TRUE(check_lse("float64 reference lse", ref.lse, expect, {1, 1, cc.s_q}, 1e-12));
    for (int splits : {1, 2}) {
      FwdParams ps = p;
      ps.num_splits = splits;
      const Engine engine(EngineOptions{GetParam(), 0});
      poison(lse);
      poison(out);
      engine.forward(ps);
      EXPECT_TRUE(check_lse("engine lse, splits " + std::to_string(splits),
                            {lse.begin(), lse.end()}, expect, {1, 1, cc.s_q}));
    }
  }
}

TEST_P(AttentionChunk, NegativeChunkIsRejected) {
  const ChunkCount cc{"bad", 2, 3, -4, false, -1, {0, 0}};
  std::vector<float> q, kv, out, lse;
  std::vector<std::int64_t> pos;
  const FwdParams p = zero_q_problem(cc, q, kv, out, lse, pos);
  const Engine engine(EngineOptions{GetParam(), 0});
  try {
    engine.forward(p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("attention_chunk"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("-4"), std::string::npos) << e.what();
  }
}

// Bad chunk positions: each check names the field and the value.
TEST_P(AttentionChunk, BadChunkPositionsAreRejected) {
  const ChunkCount cc{"pos", 2, 3, 4, false, -1, {0, 0}, true, 0, 0, 1};
  std::vector<float> q, kv, out, lse;
  std::vector<std::int64_t> pos;
  const FwdParams good = zero_q_problem(cc, q, kv, out, lse, pos);
  const Engine engine(EngineOptions{GetParam(), 0});
  const std::int64_t huge = std::int64_t{1} << 61;
  struct Bad {
    const char* what;
    std::function<void(FwdParams&)> edit;
    std::vector<std::string> words;
  };
  const std::vector<Bad> bad = {
      {"no chunk",
       [](FwdParams& p) { p.mask.attention_chunk = 0; },
       {"chunk_q_pos", "attention_chunk = 0"}},
      {"one array",
       [](FwdParams& p) { p.mask.chunk_k_pos = nullptr; },
       {"chunk_k_pos", "together"}},
      {"stride 0", [](FwdParams& p) { p.mask.chunk_stride = 0; }, {"chunk_stride", "0"}},
      {"stride without positions",
       [](FwdParams& p) {
         p.mask.chunk_q_pos = p.mask.chunk_k_pos = nullptr;
         p.mask.chunk_stride = 2;
       },
       {"chunk_stride = 2"}},
      {"huge position",
       [&](FwdParams& p) { p.mask.chunk_k_pos = &huge; },
       {"chunk_k_pos[0]", std::to_string(huge)}},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    FwdParams p = good;
    b.edit(p);
    try {
      engine.forward(p);
      ADD_FAILURE() << "expected InvalidArgument";
    } catch (const InvalidArgument& e) {
      for (const auto& w : b.words)
        EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, AttentionChunk, ::testing::ValuesIn(test_backends()),
                         [](const auto& info) { return sanitize_name(info.param); });

}  // namespace
}  // namespace ringattn::test
