// The ring's call planner (plan_shard, src/ring/ring_blocks.hpp) without MPI: for every
// layout, rank count, mask and piece size, the calls planned for every (query shard, key
// shard) pair cover each visible (query, key) pair of the global sequence exactly once
// and no hidden pair, when each call's mask is applied with the kernel's rule (with
// attention_chunk: also the kernel's chunk rule at the call's positions), and no call is
// planned for a block that no query of it sees (hidden blocks are skipped exactly).
#include <gtest/gtest.h>

#include <map>
#include <vector>

#include "ring/ring_blocks.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn {
namespace {

// Global positions of the rows of rank r's shard: (sequence, position) per local row.
std::vector<std::pair<int, std::int64_t>> shard_rows(const std::vector<int>& lens,
                                                     ShardLayout layout, int P, int r) {
  std::vector<std::pair<int, std::int64_t>> rows;
  for (int s = 0; s < static_cast<int>(lens.size()); ++s)
    for (auto pos : shard_positions(layout, lens[s], P, r)) rows.push_back({s, pos});
  return rows;
}

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// The kernel's rule for one call: its window mask, and with chunk > 0 the chunk rule at
// the call's positions (row i at q_pos + i * stride, key j at k_pos + j * stride).
bool kernel_visible(const detail::ShardCall& c, int chunk, std::int64_t i, std::int64_t j) {
  if (chunk > 0 &&
      floor_div(c.q_pos + i * c.pos_stride, chunk) != floor_div(c.k_pos + j * c.pos_stride, chunk))
    return false;
  const BlockMask& m = c.mask;
  if (m.kind == BlockMask::kFull) return true;
  if (m.kind == BlockMask::kHidden) return false;
  if (m.window_right >= 0 && j > i + m.shift + m.window_right) return false;
  if (m.window_left >= 0 && j < i + m.shift - m.window_left) return false;
  return true;
}

void check_plan(ShardLayout layout, int P, const std::vector<int>& lens, bool varlen, bool causal,
                int wl, int wr, std::int64_t piece_rows, int chunk = 0,
                int* skipped_total = nullptr) {
  RingAttentionParams p;
  p.b = static_cast<int>(lens.size());
  p.h = p.h_k = 1;
  p.d = p.d_v = 8;
  std::vector<std::int32_t> cu{0};
  for (int l : lens) cu.push_back(cu.back() + l);
  if (varlen) {
    p.cu_seqlens = cu.data();
  } else {
    p.s = lens[0];
  }
  p.mask.causal = causal;
  p.mask.window_left = wl;
  p.mask.window_right = wr;
  p.mask.attention_chunk = chunk;
  p.layout = layout;
  const detail::RingPlan plan = detail::make_ring_plan(p, P);
  const int gwr = causal ? 0 : wr;
  const std::int64_t piece =
      piece_rows > 0 ? piece_rows : std::max<std::int64_t>(plan.max_chunk, 1);
  const std::int64_t rows_cap = std::max<std::int64_t>(piece, std::min(2 * piece, plan.max_rows));
  // count[(seq, qpos, kpos)]
  std::map<std::tuple<int, std::int64_t, std::int64_t>, int> count;
  for (int qr = 0; qr < P; ++qr) {
    const auto qrows = shard_rows(lens, layout, P, qr);
    for (int kr = 0; kr < P; ++kr) {
      const auto krows = shard_rows(lens, layout, P, kr);
      const detail::ShardPlan sp = detail::plan_shard(plan, qr, kr, piece, rows_cap);
      if (skipped_total) *skipped_total += sp.skipped_blocks;
      for (const auto& c : sp.calls) {
        int seen = 0;  // visible pairs of the call
        ASSERT_NE(c.mask.kind, BlockMask::kHidden);
        ASSERT_LE(c.rows, rows_cap);
        const auto& g = plan.groups[static_cast<std::size_t>(c.group)];
        const auto& qoff = plan.offsets[static_cast<std::size_t>(qr)];
        const auto& koff = plan.offsets[static_cast<std::size_t>(kr)];
        for (int sb = 0; sb < g.count; ++sb) {
          const std::int64_t qseq = qoff[g.first + 1] - qoff[g.first];
          const std::int64_t kseq = koff[g.first + 1] - koff[g.first];
          for (std::int64_t i = 0; i < c.rows; ++i)
            for (std::int64_t j = 0; j < c.keys; ++j) {
              const auto& [qs, qp] = qrows[static_cast<std::size_t>(c.q_row + sb * qseq + i)];
              const auto& [ks, kp] = krows[static_cast<std::size_t>(c.k_row + sb * kseq + j)];
              if (chunk > 0) {  // the call's positions are the rows' sequence positions
                ASSERT_EQ(qp, c.q_pos + i * c.pos_stride) << "query position of call row " << i;
                ASSERT_EQ(kp, c.k_pos + j * c.pos_stride) << "key position of call key " << j;
              }
              if (!kernel_visible(c, chunk, i, j)) continue;
              ASSERT_EQ(qs, ks) << "a call mixes sequences";
              ++count[{qs, qp, kp}];
              ++seen;
            }
        }
        ASSERT_GT(seen, 0) << "a call for a block no query sees: " << layout_name(layout)
                           << " P=" << P << " ranks " << qr << " x " << kr << " chunk " << chunk;
      }
    }
  }
  for (int s = 0; s < static_cast<int>(lens.size()); ++s)
    for (std::int64_t qp = 0; qp < lens[s]; ++qp)
      for (std::int64_t kp = 0; kp < lens[s]; ++kp) {
        const bool vis = (gwr < 0 || kp <= qp + gwr) && (wl < 0 || kp >= qp - wl) &&
                         (chunk == 0 || qp / chunk == kp / chunk);
        const auto it = count.find({s, qp, kp});
        const int n = it == count.end() ? 0 : it->second;
        ASSERT_EQ(n, vis ? 1 : 0) << layout_name(layout) << " P=" << P << " seq " << s << " q "
                                  << qp << " k " << kp << " causal " << causal << " window (" << wl
                                  << ", " << wr << ") piece " << piece_rows << " chunk " << chunk;
      }
}

TEST(RingPlan, CoversEveryVisiblePairOnce) {
  for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag, ShardLayout::kStriped})
    for (int P : {1, 2, 3, 4})
      for (std::int64_t piece : {std::int64_t{0}, std::int64_t{5}})
        for (const auto& [causal, wl, wr] : std::vector<std::tuple<bool, int, int>>{
                 {false, -1, -1}, {true, -1, -1}, {true, 6, -1}, {false, 4, 3}, {false, -1, 2}}) {
          check_plan(layout, P, {29, 29}, false, causal, wl, wr, piece);
          check_plan(layout, P, {17, 0, 3, 31}, true, causal, wl, wr, piece);
        }
}

// attention_chunk: chunks smaller than, equal to and larger than a shard, not dividing
// the shard or the stride of a striped layout.
TEST(RingPlan, ChunkedCoversEveryVisiblePairOnce) {
  for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag, ShardLayout::kStriped})
    for (int P : {1, 2, 3, 4})
      for (std::int64_t piece : {std::int64_t{0}, std::int64_t{5}})
        for (int chunk : {1, 4, 7, 12, 64})
          for (const auto& [causal, wl, wr] : std::vector<std::tuple<bool, int, int>>{
                   {false, -1, -1}, {true, -1, -1}, {true, 6, -1}, {false, 4, 3}}) {
            check_plan(layout, P, {29, 29}, false, causal, wl, wr, piece, chunk);
            check_plan(layout, P, {17, 0, 3, 31}, true, causal, wl, wr, piece, chunk);
          }
}

// Blocks that only the chunk rule hides are skipped: contiguous shards of 16 tokens with
// chunk 16 leave each rank one visible key shard (its own), so 4 ranks skip 12 of the 16
// (query shard, key shard) pairs, causal or not (causal alone skips 6).
TEST(RingPlan, ChunkHiddenBlocksAreSkipped) {
  int skipped = 0;
  check_plan(ShardLayout::kContiguous, 4, {64}, false, false, -1, -1, 0, 16, &skipped);
  EXPECT_EQ(skipped, 12);
  skipped = 0;
  check_plan(ShardLayout::kContiguous, 4, {64}, false, true, -1, -1, 0, 16, &skipped);
  EXPECT_EQ(skipped, 12);
  skipped = 0;
  check_plan(ShardLayout::kContiguous, 4, {64}, false, true, -1, -1, 0, 0, &skipped);
  EXPECT_EQ(skipped, 6);
}

}  // namespace
}  // namespace ringattn
