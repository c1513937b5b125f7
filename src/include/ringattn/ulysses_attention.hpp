// Ulysses x ring ("unified sequence parallelism", as yunchang's USP): P = U x R ranks
// in a grid, rank = g * U + u with ring index g in [0, R) and Ulysses index u in
// [0, U). The sequence is sharded over the R ring positions with the ring layout
// (shard_layout.hpp); ring shard g of each sequence is cut again into U contiguous
// pieces (floor boundaries) and rank (g, u) holds piece u of every sequence.
//
// One forward:
//   1. all-to-all inside each Ulysses group (the U ranks of one g): rank u sends the
//      head slice j of its tokens to rank j and receives ring shard g's tokens for its
//      own heads: h / U query heads and the K/V heads those use (h_k / U when U
//      divides h_k; when h_k < U the one K/V head of a slice is replicated, so U may
//      divide h without dividing h_k, as yunchang does);
//   2. the ring (pass-KV or pass-Q, ring_attention.hpp) over the R ranks of one u,
//      on h / U heads of full ring shards;
//   3. all-to-all back: each rank gets (out, lse) of its own tokens for all heads.
// U = 1 is the plain ring; R = 1 is pure Ulysses (each rank runs ordinary attention
// over whole sequences for its heads). Bytes through the all-to-alls per token:
// (h d + 2 h_k' (d + d_v)) * sizeof(dtype) in, (h d_v + h) * 4 out, each (U - 1) / U
// of it leaving the rank (h_k' = K/V heads after replication); docs/ring.md compares
// this with the ring's h_k (d + d_v) per token per step.
//
// Result: exactly the single-process attention over each whole sequence, for the
// same masks as ring_attention_forward (docs/semantics.md section 8).
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/ring_attention.hpp"

namespace ringattn {

// The hybrid layout: rows of rank `rank` of `ranks` = U x R, for sequences of the
// given lengths (dense: b sequences of length s), in local order: for each sequence,
// its piece of ring shard g.
//   q [b, n, h, d] (dense; n = hybrid_shard_length(...) of one sequence) or
//   q [t, h, d]    (varlen; t = sum over sequences), same for k, v, out; lse as
//   RingAttentionParams ([b, h, n] / [h, t]).
std::int64_t hybrid_shard_length(ShardLayout layout, std::int64_t len, int ranks, int ulysses,
                                 int rank);
// Token positions (within the sequence) of rank `rank`, in local order.
std::vector<std::int64_t> hybrid_shard_positions(ShardLayout layout, std::int64_t len, int ranks,
                                                 int ulysses, int rank);

// InvalidArgument naming the numbers unless U >= 1 divides the ranks and the query
// heads h, and h_k and U divide one another.
void check_ulysses_grid(int ranks, int ulysses, int h, int h_k);

struct HybridStats {
  int ulysses = 1;                  // U
  int ring = 1;                     // R
  RingStats ring_stats;             // the ring over R ranks (per step compute / wait / bytes)
  double alltoall_s = 0.0;          // both all-to-alls, packing included
  std::int64_t alltoall_bytes = 0;  // bytes this rank sent to other ranks in them
  double total_s = 0.0;
};

// Collective over `comm` (P ranks, P % ulysses == 0). `p` describes this rank's shard
// in the hybrid layout above (out and lse fp32, as RingAttentionParams). Checks run on
// every rank and the ranks agree before any data moves: U must divide P and h, and
// h_k must divide by U or U by h_k; any problem makes every rank throw the same
// exception naming the numbers.
void hybrid_attention_forward(const comm::Communicator& comm, const Engine& engine,
                              const RingAttentionParams& p, int ulysses, RingMode mode,
                              const RingOptions& options = {}, HybridStats* stats = nullptr);

}  // namespace ringattn
