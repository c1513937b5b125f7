// Internal: what the pass-KV and pass-Q rings share. Both compute, at every ring step,
// "the query rows of shard q_rank against the key/value rows of shard k_rank", merged
// into an fp32 accumulator; they differ only in which of the two travels.
//
// RingPlan holds the geometry every rank derives from RingAttentionParams alone (row
// offsets of each sequence in each rank's shard, groups of sequences sharing a kernel
// call, row sizes); attend_shard runs one (q shard, k shard) pair.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ringattn/buffer_pool.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/ring_attention.hpp"

namespace ringattn::detail {

// Sequences that share one kernel call: dense batches form one group (same length,
// same chunk geometry on every rank); varlen sequences are one group each.
struct RingGroup {
  int first = 0;         // first sequence
  int count = 1;         // sequences in the group
  std::int64_t len = 0;  // tokens per sequence
};

struct RingPlan {
  const RingAttentionParams* p = nullptr;
  int ranks = 1;
  std::vector<std::vector<std::int64_t>> offsets;  // [ranks][b + 1] row offsets per sequence
  std::vector<RingGroup> groups;
  std::size_t esize = 0;                                    // bytes per q/k/v element
  std::int64_t q_row = 0, k_row = 0, v_row = 0, o_row = 0;  // elements per token
  std::int64_t max_rows = 0;                                // largest shard (rows)
  std::int64_t max_chunk = 0;  // largest chunk of any rank (rows), for scratch
  int max_nb = 1;              // largest group (sequences)
  int wl = -1, wr = -1;        // global window; causal folded into wr = 0
  int chunk = 0;               // attention_chunk (0 = off)
  std::int64_t rows(int rank) const { return offsets[static_cast<std::size_t>(rank)].back(); }
};

// Validates `p` on every rank, agrees collectively (same exception on all ranks) and
// checks that every rank holds the same configuration (`mode` is part of it).
void ring_validate(const comm::Communicator& comm, const RingAttentionParams& p, const char* mode);

RingPlan make_ring_plan(const RingAttentionParams& p, int ranks);

// Runs the steps of a ring (or any collective algorithm) once its arguments are agreed.
// A failure there (out of memory, an MPI error) cannot be recovered, since the other
// ranks are inside the same steps: the message is printed with the rank and `what`, and
// the job is aborted (MPI_Abort).
void run_or_abort(const comm::Communicator& comm, const char* what,
                  const std::function<void()>& steps);

// Query rows per kernel call for `options`: piece_rows, or (0) the largest chunk, so
// that each (query chunk, key run) pair is one kernel call. The kernel packs K/V once
// per call; measured here, 512-row pieces of a 4096-key block cost about 18% more
// kernel time than one 4096-row call. Progress is driven before and after every call.
std::int64_t ring_piece_rows(const RingPlan& plan, const RingOptions& options);

// Scratch of one kernel call: out [nb, piece, h, d_v], lse [nb, h, piece], lse in row
// order [piece, h], per-sequence shifts [nb].
struct RingScratch {
  RingScratch(const RingPlan& plan, std::int64_t piece);  // buffers from a process-wide pool
  RingScratch(const RingScratch&) = delete;
  RingScratch& operator=(const RingScratch&) = delete;
  std::int64_t piece = 1;     // query rows per piece
  std::int64_t rows_cap = 1;  // rows one kernel call may have (two pieces combined)
  BufferPool::Lease o_lease, lse_lease;
  float* o = nullptr;    // [max_nb, rows_cap, h, d_v] kernel output of one call
  float* lse = nullptr;  // [max_nb, h, rows_cap] its LSE
  std::vector<float> lse_rows;
  std::vector<std::int64_t> shifts;
  std::vector<std::int64_t> chunk_q_pos, chunk_k_pos;  // [max_nb] kernel chunk positions
};

// One kernel call of attend_shard: query rows [q_row, q_row + rows) of the q shard
// (row index into the shard, first sequence of the group) against key rows [k_row,
// k_row + keys) of the k shard, for every sequence of group `group` (a dense group's
// sequences: the same rows of each, one shard length apart), under `mask` (never
// kHidden; kPartial: the kernel's rule with that diagonal shift and window). With
// attention_chunk, every call has one query chunk's piece and one key chunk: its first
// query sits at sequence position q_pos, its first key at k_pos, both advancing by
// pos_stride (the kernel's chunk positions, MaskParams::chunk_q_pos).
struct ShardCall {
  int group = 0;
  std::int64_t q_row = 0, rows = 0;
  std::int64_t k_row = 0, keys = 0;
  BlockMask mask;
  std::int64_t q_pos = 0, k_pos = 0, pos_stride = 1;
};
struct ShardPlan {
  std::vector<ShardCall> calls;  // in merge order
  int skipped_blocks = 0;        // (query piece, key chunk) pairs hidden by the mask
};
// Pure planner (no MPI, unit-tested): the kernel calls that attend the queries of shard
// q_rank to the keys of shard k_rank, `piece` query rows at a time, joining whole query
// chunks that see the same keys fully up to rows_cap rows (without attention_chunk).
ShardPlan plan_shard(const RingPlan& plan, int q_rank, int k_rank, std::int64_t piece,
                     std::int64_t rows_cap);

// Attends the query rows of shard `q_rank` (q: that shard's tokens, [rows, h, d] in
// local order) to the key/value rows of shard `k_rank` (k [rows, h_k, d], v [rows,
// h_k, d_v]) and merges the partial results into acc_o [rows(q_rank), h, d_v] and
// acc_lse [rows(q_rank), h] (fp32, natural log; start from 0 / -inf). Blocks the
// mask hides are skipped; `progress` runs between kernel calls.
void attend_shard(const RingPlan& plan, const Engine& engine, int q_rank, const std::byte* q,
                  int k_rank, const std::byte* k, const std::byte* v, float* acc_o, float* acc_lse,
                  std::int64_t piece, RingScratch& scratch, const std::function<void()>& progress,
                  RingStepStats& st);

// acc_lse [rows, h] -> the API's LSE layout (dense [b, h, n_r], varlen [h, t_r]).
void ring_write_lse(const RingPlan& plan, int rank, const float* acc_lse, float* lse);

double ring_now_s();

// "none", or a hash of the fp32 bits of sinks [h], for the cross-rank agreement check
// (every rank must pass the same sinks).
std::string sinks_fingerprint(const float* sinks, int h);

}  // namespace ringattn::detail
