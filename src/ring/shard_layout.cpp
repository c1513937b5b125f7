#include "ringattn/shard_layout.hpp"

#include "ringattn/error.hpp"

namespace ringattn {

const char* layout_name(ShardLayout layout) {
  switch (layout) {
    case ShardLayout::kContiguous:
      return "contiguous";
    case ShardLayout::kZigzag:
      return "zigzag";
    case ShardLayout::kStriped:
      return "striped";
  }
  return "?";
}

ShardLayout parse_layout(std::string_view name) {
  if (name == "contiguous") return ShardLayout::kContiguous;
  if (name == "zigzag") return ShardLayout::kZigzag;
  if (name == "striped") return ShardLayout::kStriped;
  RA_THROW(InvalidArgument,
           "layout: unknown layout '" << name << "' (expected contiguous, zigzag or striped)");
}

namespace {

// Chunk c of `parts` equal-as-possible pieces of [0, len).
Chunk piece(std::int64_t len, std::int64_t parts, std::int64_t c) {
  const std::int64_t lo = c * len / parts;
  const std::int64_t hi = (c + 1) * len / parts;
  return Chunk{lo, hi - lo, 1};
}

}  // namespace

std::vector<Chunk> shard_chunks(ShardLayout layout, std::int64_t len, int ranks, int rank) {
  RA_CHECK_ARG_GT(ranks, 0, "layout: number of ranks");
  RA_CHECK_ARG(rank >= 0 && rank < ranks,
               "layout: rank " << rank << " outside [0, " << ranks << ")");
  RA_CHECK_ARG_GE(len, 0, "layout: sequence length");
  switch (layout) {
    case ShardLayout::kContiguous:
      return {piece(len, ranks, rank)};
    case ShardLayout::kZigzag:
      return {piece(len, 2 * ranks, rank), piece(len, 2 * ranks, 2 * ranks - 1 - rank)};
    case ShardLayout::kStriped: {
      const std::int64_t count = rank < len ? (len - rank + ranks - 1) / ranks : 0;
      return {Chunk{rank, count, ranks}};
    }
  }
  return {};
}

std::int64_t shard_length(ShardLayout layout, std::int64_t len, int ranks, int rank) {
  std::int64_t n = 0;
  for (const auto& c : shard_chunks(layout, len, ranks, rank)) n += c.count;
  return n;
}

std::vector<std::int64_t> shard_positions(ShardLayout layout, std::int64_t len, int ranks,
                                          int rank) {
  std::vector<std::int64_t> pos;
  for (const auto& c : shard_chunks(layout, len, ranks, rank))
    for (std::int64_t i = 0; i < c.count; ++i) pos.push_back(c.first + i * c.stride);
  return pos;
}

}  // namespace ringattn
