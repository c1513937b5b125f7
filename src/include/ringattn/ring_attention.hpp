// Ring attention (pass-KV) across the ranks of a communicator: each rank holds a
// shard of Q, K and V (positions given by a ShardLayout), K/V shards travel around
// the ring, and each rank merges the partial (out, lse) of every block into its
// output with the docs/semantics.md section 5 merge. Result: for every local query token,
// exactly what single-process attention over the whole sequence gives. The pass-Q
// ring (ring_attention_forward_pass_q) computes the same with the queries travelling.
//
// Self-attention over the global sequence (s_q == s_k per sequence; docs/semantics.md
// section 8): the mask is the section 1 rule with shift 0: row i sees key j iff
// j <= i + w_right and j >= i - w_left (causal: w_right = 0), and with attention_chunk
// C > 0 also floor(j / C) == floor(i / C) (chunks of the global sequence). Fully masked
// rows give out 0, LSE -inf. LSE is natural log.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "ringattn/attention_params.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn {

// One rank's view of a ring-attention forward. n_r = shard_length(layout, s, P, r),
// t_r = sum_i shard_length(layout, cu_seqlens[i+1] - cu_seqlens[i], P, r); a rank
// stores each sequence's tokens in the local order of shard_layout.hpp.
//   dense  (cu_seqlens == nullptr):
//     q [b, n_r, h, d]   k [b, n_r, h_k, d]   v [b, n_r, h_k, d_v]     (dtype, contiguous)
//     out [b, n_r, h, d_v] fp32               lse [b, h, n_r] fp32
//   varlen (cu_seqlens set, global offsets, identical on all ranks):
//     q [t_r, h, d]      k [t_r, h_k, d]      v [t_r, h_k, d_v]
//     out [t_r, h, d_v] fp32                  lse [h, t_r] fp32
// How a ring writes its LSE: the API layouts above, or row order [rows, h] (local row
// order, what a gather of rows across ranks needs: no conversion there and back).
enum class LseLayout : std::uint8_t { kApi, kRows };

// The one pair of conversions between them, for `rows` rows of b sequences (dense: b
// sequences of rows / b rows each, API [b, h, rows / b]; varlen: API [h, rows]).
void lse_rows_to_api(const float* rows_lse, std::int64_t rows, int h, int b, bool varlen,
                     float* api);
void lse_api_to_rows(const float* api, std::int64_t rows, int h, int b, bool varlen,
                     float* rows_lse);

struct RingAttentionParams {
  DType dtype = DType::kF32;  // storage of q, k, v: fp32, bf16 or fp16
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  float* out = nullptr;
  float* lse = nullptr;  // nullable

  int b = 0;  // batch (number of sequences)
  int s = 0;  // dense: global sequence length (>= number of ranks); varlen: ignored
  int h = 0, h_k = 0, d = 0, d_v = 0;
  const std::int32_t* cu_seqlens = nullptr;  // [b + 1] varlen only

  // scale, softcap, causal, window_left, window_right, attention_chunk, sinks; mask_shift
  // and the chunk positions (chunk_q_pos / chunk_k_pos / chunk_stride) must stay unset:
  // the ring sets them per block.
  MaskParams mask;
  ShardLayout layout = ShardLayout::kZigzag;
  LseLayout lse_layout = LseLayout::kApi;  // kRows: lse [rows, h] in local row order
};

struct RingOptions {
  // Test the step's MPI requests between kernel calls and, through the kernel's
  // ProgressHook, between key tiles, so the K/V transfer proceeds while the kernel
  // runs (Open MPI moves large messages only inside MPI calls when it has no
  // single-copy path).
  bool progress = true;
  // Query rows per kernel call (0 = whole chunks: a zigzag rank makes one call per
  // query chunk and step, its key chunks merged into one call where the mask allows).
  int piece_rows = 0;
};

struct RingStepStats {
  double compute_s = 0.0;  // kernel calls + merges of this step
  double wait_s = 0.0;     // time blocked in the exchange's finish()
  std::int64_t bytes = 0;  // bytes this rank sent in this step
  int kernel_calls = 0;
  int skipped_blocks = 0;  // (query piece, key chunk) pairs hidden by the mask
};

struct RingStats {
  std::vector<RingStepStats> steps;  // [P]
  double total_s = 0.0;
};

// Rows this rank holds (n_r * b dense, t_r varlen).
std::int64_t ring_local_rows(const RingAttentionParams& p, int ranks, int rank);

// Collective over `comm`. Arguments are validated on every rank and the ranks agree
// (shapes, dtype, options, library version) before any ring step; any problem makes
// every rank throw the same exception. A failure after the first ring step (an MPI
// error) cannot be recovered: the message is printed with the rank and the job is
// aborted with MPI_Abort.
void ring_attention_forward(const comm::Communicator& comm, const Engine& engine,
                            const RingAttentionParams& p, const RingOptions& options = {},
                            RingStats* stats = nullptr);

// Pass-Q ring: the same contract, inputs and result as ring_attention_forward, but
// every rank's K/V shard stays where it is and the query shards travel, each
// followed one step behind by its running (out, lse) accumulator (fp32), which is
// delivered back to the query's owner after the last step. Suits ranks whose K/V
// must stay resident (a cached context); it moves h * d query elements plus
// h * (d_v + 1) fp32 accumulator values per token instead of h_k * (d + d_v) K/V
// elements, so with the self-attention shards here pass-KV moves fewer bytes
// unless h_k * (d + d_v) * sizeof(dtype) exceeds that.
void ring_attention_forward_pass_q(const comm::Communicator& comm, const Engine& engine,
                                   const RingAttentionParams& p, const RingOptions& options = {},
                                   RingStats* stats = nullptr);

// Which ring: "pass-kv" (K/V travel) or "pass-q" (queries travel).
enum class RingMode : std::uint8_t { kPassKV, kPassQ };
const char* ring_mode_name(RingMode mode);
// "pass-kv" | "pass-q"; InvalidArgument otherwise.
RingMode parse_ring_mode(std::string_view name);
// Runs the ring of `mode`.
void ring_attention(const comm::Communicator& comm, const Engine& engine, RingMode mode,
                    const RingAttentionParams& p, const RingOptions& options = {},
                    RingStats* stats = nullptr);

// ---- block masks (exposed for tests) ----

// How the global mask restricts one (query chunk, key chunk) block whose tokens sit
// at q0 + i*stride (i < nq) and k0 + j*stride (j < nk).
struct BlockMask {
  enum Kind { kHidden, kFull, kPartial } kind = kFull;
  // For kPartial: kernel mask with this diagonal shift and windows (causal off).
  std::int64_t shift = 0;
  int window_left = -1;
  int window_right = -1;
};

// window_left / window_right of the global self-attention (-1 unbounded; causal
// means window_right = 0).
BlockMask classify_block(std::int64_t q0, std::int64_t nq, std::int64_t k0, std::int64_t nk,
                         std::int64_t stride, int window_left, int window_right);

}  // namespace ringattn
