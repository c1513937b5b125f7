// Distributed decode (tree attention): each rank holds a contiguous shard of every
// sequence's KV cache, the new query rows are the same on every rank; each rank
// computes a partial (out, lse) over its keys, and an allreduce (or a reduce to one
// rank) whose operation is the docs/semantics.md section 5 merge gives the exact result in
// log(P) combining steps.
//
// Mask: docs/semantics.md section 1 over the whole cache (bottom-right: query row i sits
// at position s_cache - s_q + i; section 8.4), attention_chunk at those global positions
// (each rank reads only the keys of the query rows' chunks). Rows that see no key: out 0,
// LSE -inf (natural log).
#pragma once

#include <cstdint>

#include "ringattn/attention_params.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"

namespace ringattn {

// Rank r of P holds cache tokens [r*s_cache/P, (r+1)*s_cache/P) of every sequence.
//   q        [b, s_q, h, d]              identical on every rank (dtype)
//   k_cache  [b, n_r, h_k, d]            this rank's shard (dtype), n_r = decode_shard_length
//   v_cache  [b, n_r, h_k, d_v]
//   out      [b, s_q, h, d_v] fp32       written on every rank (root < 0) or on root only
//   lse      [b, h, s_q] fp32, nullable  likewise
struct DecodeParams {
  DType dtype = DType::kF32;
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
  int b = 0, s_q = 1, h = 0, h_k = 0, d = 0, d_v = 0;
  std::int64_t s_cache = 0;  // global cache length per sequence (>= number of ranks)
  MaskParams mask;           // mask_shift and the chunk positions must stay unset
  int root = -1;             // -1: allreduce (result everywhere); else reduce to this rank
};

// Collective: merges per-row partial softmax states across the ranks (docs/semantics.md
// section 5) with a tree reduction whose operation is the merge. records [rows][d_v + 1]
// fp32 (o then natural-log lse), in place: on every rank (root < 0) or on root only.
void merge_across_ranks(const comm::Communicator& comm, float* records, std::int64_t rows, int d_v,
                        int root);

std::int64_t decode_shard_first(std::int64_t s_cache, int ranks, int rank);
std::int64_t decode_shard_length(std::int64_t s_cache, int ranks, int rank);

// Collective. Arguments are validated on every rank and agreed (shapes, options,
// library version) before the kernel runs; any problem throws the same exception
// on every rank.
void distributed_decode(const comm::Communicator& comm, const Engine& engine,
                        const DecodeParams& p);

}  // namespace ringattn
