// Pieces shared by the sessions over a sharded cache (kv_session.cpp, mla_session.cpp):
// the merge records [rows][d_v + 1] (o then natural-log lse of one query row, what the
// cross-rank reduction moves) and the decode step's timing split (StepStats).
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn::detail {

// Records [rows][d_v + 1] from a kernel's out [rows, d_v] and lse, where the lse of
// record r sits at lse[lse_index(r)].
template <class LseIndex>
void to_records(const float* out, const float* lse, std::int64_t rows, int d_v, LseIndex lse_index,
                float* records);

// Empty states (o = 0, lse = -inf), the identity of the merge.
void clear_records(std::vector<float>& records, int d_v);

// Merges records b into a (same shape) row by row.
void merge_records_into(std::vector<float>& a, const std::vector<float>& b, int d_v);

// Records [b, t, h][d_v + 1] -> out [b, t, h, d_v] and lse [b, h, t] (nullable).
void from_records(const std::vector<float>& records, int b, int t, int h, int d_v, float* out,
                  float* lse);

// Kernel output out [b, t, h, d_v] and lse [b, h, t] -> records [b, t, h][d_v + 1].
void kernel_to_records(const float* out, const float* lse, int b, int t, int h, int d_v,
                       std::vector<float>& records);

// Collective, at the end of a decode step: one allgather of every rank's times fills
// st.total_s (slowest rank), st.merge_s, st.wait_s and st.max_wait_s from st.local_s,
// st.reduce_s, `enter_s` (call entry to the reduction's start) and `elapsed_s` (call
// entry to now) as StepStats describes.
void finish_decode_stats(const comm::Communicator& comm, double enter_s, double elapsed_s,
                         StepStats& st);

template <class LseIndex>
void to_records(const float* out, const float* lse, std::int64_t rows, int d_v, LseIndex lse_index,
                float* records) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* src = out + r * d_v;
    float* dst = records + r * (d_v + 1);
    for (int c = 0; c < d_v; ++c) dst[c] = src[c];
    dst[d_v] = lse[lse_index(r)];
  }
}

}  // namespace ringattn::detail
