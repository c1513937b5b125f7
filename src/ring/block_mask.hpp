// Internal: the mask algebra of the ring. A block of queries at positions
// q0 + i * stride (i < nq) against keys at k0 + j * stride (j < nk) under the global
// self-attention window (wl, wr) (docs/semantics.md section 8; causal: wr = 0) is hidden,
// fully visible, or the kernel's own mask rule with a diagonal shift (classify_block in
// ring_attention.hpp). combine_mask expresses several key chunks stored back to back as
// one kernel mask when that is exact; visible_key_span adds the attention_chunk rule
// (docs/semantics.md section 7), which the kernel applies through its chunk positions.
#pragma once

#include <cstdint>

#include "ringattn/ring_attention.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn::detail {

std::int64_t floor_div(std::int64_t a, std::int64_t b);
std::int64_t ceil_div(std::int64_t a, std::int64_t b);

// Tries to express the mask of the nq query rows at positions q0 + i*qs against the
// keys of chunks[0..n) (stored back to back: one local key index over all of them)
// as ONE kernel mask, so that they run in one kernel call. Works when every row's
// visible keys form one contiguous local range [lo_i, hi_i] that moves with the
// row like the kernel's rule (hi_i = min(n-1, i + U), lo_i = max(0, i + Lo)); e.g.
// zigzag causal: [early chunk, fully visible] + [late chunk, diagonal] becomes one
// diagonal block with shift = size of the early chunk. Returns false otherwise.
bool combine_mask(std::int64_t q0, std::int64_t qs, std::int64_t nq, const Chunk* chunks, int n,
                  int wl, int wr, BlockMask* out);

// Local keys [lo, hi] of one block (queries at positions q0 + i*st, i < nq; keys at
// k0 + j*st, j < nk) that cover every key some query sees; empty (lo > hi) exactly when
// no query sees any key of the block.
struct KeySpan {
  std::int64_t lo = 0, hi = -1;
  bool empty() const { return lo > hi; }
};

// The KeySpan of a block under the global window (wl, wr; -1 unbounded, causal: wr = 0)
// and the attention_chunk rule (chunk C > 0: the query at position qp sees the key at kp
// only if floor(kp / C) == floor(qp / C); 0 = off). With a chunk, the block is cut along
// the chunk grid: the queries and keys of chunk c form a sub-block that the window rule
// hides or not (classify_block, exact), and the span is the union over the chunks that
// both sides share, so a block the chunk hides entirely is found without a kernel call.
KeySpan visible_key_span(std::int64_t q0, std::int64_t nq, std::int64_t k0, std::int64_t nk,
                         std::int64_t st, int wl, int wr, int chunk);

}  // namespace ringattn::detail
