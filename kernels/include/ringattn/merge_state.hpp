// Public softmax-state merge (docs/semantics.md section 5), FlashInfer cascade semantics.
// All LSE values are natural log; -inf (or +inf on input) marks an empty state,
// which merges as the identity and never produces NaN.
#pragma once

#include <cstdint>

namespace ringattn {

// Merges (o_b, lse_b) into (o_a, lse_a) in place for n independent rows.
//   o_a, o_b [n, d_v] fp32 (row stride d_v), lse_a, lse_b [n] fp32.
void merge_state_inplace(float* o_a, float* lse_a, const float* o_b, const float* lse_b,
                         std::int64_t n, int d_v);

// Out-of-place two-state merge: (o, lse) = merge((o_a, lse_a), (o_b, lse_b)).
//   o_a, o_b, o [n, d_v]; lse_a, lse_b, lse [n]. o may alias o_a, lse may alias lse_a.
void merge_state(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                 float* o, float* lse, std::int64_t n, int d_v);

// Merges num_states partial states per row.
//   o_parts [n, num_states, d_v], lse_parts [n, num_states] -> o [n, d_v], lse [n]
// (lse may be nullptr when the caller does not need it).
void merge_states(const float* o_parts, const float* lse_parts, float* o, float* lse,
                  std::int64_t n, int num_states, int d_v);

// Applies attention sinks to n final (merged) rows, row r belonging to query head
// r % h: o_r *= sink_scale(lse_r, sinks[r % h]) (softmax_state.hpp). Every path that
// merges partial states (split-KV, ring, distributed decode, MLA) calls this once
// after its last merge; lse is left without the sink.
//   o [n] rows of d_v fp32, row r at o + r * o_row_stride
//   lse [n] fp32, row r at lse[r * lse_stride]; sinks [h] fp32 (nullptr: no-op)
void apply_sinks(float* o, std::int64_t o_row_stride, const float* lse, std::int64_t lse_stride,
                 const float* sinks, std::int64_t n, int h, int d_v);

}  // namespace ringattn
