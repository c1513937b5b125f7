// How a sequence of L tokens is split across P ranks (docs/semantics.md section 8.2).
//
//   contiguous  rank r owns [r*L/P, (r+1)*L/P)                       1 chunk
//   zigzag      L cut in 2P chunks c = [c*L/(2P), (c+1)*L/(2P)); rank r owns
//               chunks r and 2P-1-r (in that local order): equal causal work   2 chunks
//   striped     token t lives on rank t mod P                        1 strided chunk
//
// Boundaries use floor(c * L / parts), so any L works (chunk sizes differ by at most
// one); a rank may own no token of a short sequence. A rank stores, for each
// sequence of a batch, its chunks' tokens back to back in the order above.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ringattn {

enum class ShardLayout : std::uint8_t { kContiguous, kZigzag, kStriped };

const char* layout_name(ShardLayout layout);
// "contiguous" | "zigzag" | "striped"; InvalidArgument otherwise.
ShardLayout parse_layout(std::string_view name);

// Tokens first, first + stride, ..., (count tokens) of one sequence.
struct Chunk {
  std::int64_t first = 0;
  std::int64_t count = 0;
  std::int64_t stride = 1;
};

// The chunks rank `rank` of `ranks` owns in a sequence of `len` tokens, in local
// order. Empty chunks are kept (count 0) so that the list length is fixed per layout.
std::vector<Chunk> shard_chunks(ShardLayout layout, std::int64_t len, int ranks, int rank);

// Number of tokens of a `len`-token sequence on `rank`.
std::int64_t shard_length(ShardLayout layout, std::int64_t len, int ranks, int rank);

// Token positions (within the sequence) held by `rank`, in local order.
std::vector<std::int64_t> shard_positions(ShardLayout layout, std::int64_t len, int ranks,
                                          int rank);

}  // namespace ringattn
