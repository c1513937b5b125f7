// Internal: the mask algebra of the ring. A block of queries at positions
// q0 + i * stride (i < nq) against keys at k0 + j * stride (j < nk) under the global
// self-attention window (wl, wr) (docs/semantics.md section 8; causal: wr = 0) is hidden,
// fully visible, or the kernel's own mask rule with a diagonal shift (classify_block in
// ring_attention.hpp). combine_mask expresses several key chunks stored back to back as
// one kernel mask when that is exact.
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

}  // namespace ringattn::detail
