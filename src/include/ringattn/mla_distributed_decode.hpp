// Distributed absorbed-MLA decode (vLLM's decode context parallelism for DeepSeek MLA):
// the paged latent cache of every sequence is sharded across the ranks as in
// distributed_decode.hpp (rank r holds tokens [r L / P, (r + 1) L / P) of a sequence of
// L tokens, in its own paged cache), the query rows are the same on every rank, each rank
// runs the MLA decode kernel over its tokens, and one reduction whose operation is the
// LSE merge (docs/semantics.md section 5) combines the partials. Sinks are applied once,
// after the merge; max_logits is the maximum over the ranks.
//
// Causal (multi-token prediction, s_q > 1): query row s of a sequence sees cache
// positions <= L - s_q + s. The rank holding the tail runs the kernel's bottom-right
// causal rule on its slice; every other rank's slice must end before the first query
// position (L / P >= s_q suffices), so that all its keys are visible to every row.
#pragma once

#include <cstdint>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn {

// Collective. `local` is an MlaDecodeParams over this rank's shard: kv_cache /
// block_table / cache_seqlens describe the local paged cache (cache_seqlens[i] =
// decode_shard_length(global_seqlens[i], P, r)); q [b, s_q, h_q, 576] identical on
// every rank; out [b, s_q, h_q, 512] (out_dtype), lse [b, h_q, s_q] and max_logits
// [b, s_q, h_q] (nullable) are written on every rank (root < 0) or on root only. Sparse
// indices are not supported here. Arguments are checked on every rank and agreed before
// the kernel runs; any problem throws the same exception on every rank.
void mla_distributed_decode(const comm::Communicator& comm, const Engine& engine,
                            const MlaDecodeParams& local, const std::int32_t* global_seqlens,
                            int root = -1);

}  // namespace ringattn
