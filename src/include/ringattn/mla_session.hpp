// MLA decode over a latent cache sharded across the ranks of a communicator that lives
// across calls (vLLM's decode context parallelism for DeepSeek MLA, in session form; the
// one-shot call is mla_distributed_decode.hpp).
//
//   prefill  stores each rank's share of the prompt's latents ([S0, 576] per sequence) in
//            its paged cache. No attention runs over the prompt: absorbed MLA prefill
//            needs the model's projection weights (W_UK / W_UV) to form queries against
//            latents, which belong to the model, not to an attention library; the
//            prompt's outputs come from the model's own (un-absorbed) prefill, and this
//            session takes over at the first decode step.
//   decode   s_q new tokens per sequence (s_q > 1: multi-token prediction), the same
//            queries q [b, s_q, h_q, 576] and latents [b, s_q, 576] on every rank. Every
//            rank attends the s_q rows to all its cached latents (all of them precede the
//            new tokens) with the MLA decode kernel; rank 0 adds the step's own latents
//            causally (row s sees new tokens 0..s: the kernel's bottom-right rule over a
//            cache of exactly the s_q new tokens); one reduction whose MPI operation is the
//            LSE merge combines the partials; sinks apply once, after it. The new latents
//            are then stored on the ranks that own them.
//
// Token ownership is ShardedKvCache's (kv_session.hpp), with one "KV head" of 576 values:
// the prompt follows `prompt_layout` (contiguous by default: rank r holds positions
// [r S0 / P, (r + 1) S0 / P), as `ringattn mla` under mpirun shards a cache), appended
// tokens follow `layout` (round-robin blocks of page_size tokens by default). Storage per
// rank O(capacity / P); the cache is [b * pages_per_seq, page_size, 576] of kv_dtype.
//
// Exactness: every output row equals single-process causal MLA decode over the sequence's
// whole history (the MLA kernel with cache_seqlens = history + s_q and causal = true),
// fp32 within rounding, whatever P, layouts and page size. LSE natural log; a row that
// sees no key gets out 0, LSE -inf.
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/kv_session.hpp"
#include "ringattn/mla_params.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn {

struct MlaSessionConfig {
  DType q_dtype = DType::kBF16;   // queries: fp32 or bf16
  DType kv_dtype = DType::kBF16;  // latent cache storage: fp32 or bf16
  int b = 1;                      // sequences
  int h_q = 0;                    // query heads, [1, kMlaMaxHeads]
  int page_size = 64;
  std::int64_t capacity = 0;  // tokens per sequence, prompt included
  CacheLayout layout = CacheLayout::kRoundRobin;
  ShardLayout prompt_layout = ShardLayout::kContiguous;
  float scale = 0.0f;            // softmax scale; 0 = 1/sqrt(576)
  const float* sinks = nullptr;  // [h_q] fp32, nullable; the same on every rank
};

class MlaSession {
 public:
  // Collective: checks the config on every rank (same exception everywhere) and
  // allocates the cache.
  MlaSession(const comm::Communicator& comm, const Engine& engine, const MlaSessionConfig& config);

  const MlaSessionConfig& config() const { return config_; }
  ShardedKvCache& cache() { return cache_; }
  const ShardedKvCache& cache() const { return cache_; }

  // Positions of this rank's share of a prompt of `len` tokens, in local order.
  std::vector<std::int64_t> prefill_positions(std::int64_t len) const;

  // Collective. prompt_lens [b] (same on every rank); kv [t_r, 576] (kv_dtype): this
  // rank's latents, sequence after sequence in prefill_positions order. Stores them; no
  // attention (see above).
  StepStats prefill(const std::vector<std::int64_t>& prompt_lens, const void* kv);

  // Collective. s_q in [1, kMlaMaxQueryTokens] new tokens per sequence, identical on
  // every rank:
  //   q [b, s_q, h_q, 576] (q_dtype), kv [b, s_q, 576] (kv_dtype): the new tokens' latents
  //   out [b, s_q, h_q, 512] fp32, lse [b, h_q, s_q] fp32 (nullable): every rank (root < 0)
  //   or root only. StepStats splits the reduction as KvSession::decode does.
  StepStats decode(int s_q, const void* q, const void* kv, float* out, float* lse, int root = -1);
  // As KvSession::set_merge_after_barrier.
  void set_merge_after_barrier(bool on) { merge_after_barrier_ = on; }

 private:
  const comm::Communicator& comm_;
  const Engine& engine_;
  MlaSessionConfig config_;
  ShardedKvCache cache_;
  bool merge_after_barrier_ = false;
  struct Scratch {
    std::vector<float> out, lse, records, fresh;
    std::vector<std::int32_t> seqlens, new_table, new_lens;
  } scratch_;
};

}  // namespace ringattn
