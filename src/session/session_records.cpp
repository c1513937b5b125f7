// Merge records and the decode step's timing split (session_records.hpp).
#include "session/session_records.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstring>

#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail {

void clear_records(std::vector<float>& records, int d_v) {
  const std::size_t rec = static_cast<std::size_t>(d_v) + 1;
  for (std::size_t i = 0; i < records.size(); ++i)
    records[i] = (i % rec == static_cast<std::size_t>(d_v)) ? kNegInf : 0.0f;
}

void merge_records_into(std::vector<float>& a, const std::vector<float>& b, int d_v) {
  const std::int64_t rows = static_cast<std::int64_t>(a.size()) / (d_v + 1);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* ra = a.data() + r * (d_v + 1);
    const float* rb = b.data() + r * (d_v + 1);
    merge_state_inplace(ra, ra + d_v, rb, rb + d_v, 1, d_v);
  }
}

void from_records(const std::vector<float>& records, int b, int t, int h, int d_v, float* out,
                  float* lse) {
  for (int s = 0; s < b; ++s)
    for (int i = 0; i < t; ++i)
      for (int hh = 0; hh < h; ++hh) {
        const std::int64_t r = (std::int64_t{s} * t + i) * h + hh;
        std::memcpy(out + r * d_v, records.data() + r * (d_v + 1),
                    sizeof(float) * static_cast<std::size_t>(d_v));
        if (lse)
          lse[(std::int64_t{s} * h + hh) * t + i] =
              records[static_cast<std::size_t>(r * (d_v + 1) + d_v)];
      }
}

void kernel_to_records(const float* out, const float* lse, int b, int t, int h, int d_v,
                       std::vector<float>& records) {
  records.resize(static_cast<std::size_t>(b) * t * h * (d_v + 1));
  to_records(
      out, lse, std::int64_t{b} * t * h, d_v,
      [&](std::int64_t r) {
        const std::int64_t hh = r % h, row = r / h;  // row = s * t + i
        const std::int64_t s = row / t, i = row % t;
        return (s * h + hh) * t + i;
      },
      records.data());
}

void finish_decode_stats(const comm::Communicator& comm, double enter_s, double elapsed_s,
                         StepStats& st) {
  const int P = comm.size();
  const double mine[4] = {elapsed_s, st.local_s, enter_s, st.reduce_s};
  std::vector<double> all(static_cast<std::size_t>(4 * P));
  RA_MPI_CHECK(MPI_Allgather(mine, 4, MPI_DOUBLE, all.data(), 4, MPI_DOUBLE, comm.get()));
  double local_max = 0, local_min = all[1], local_sum = 0, enter_max = 0, exit_max = 0;
  st.total_s = 0;
  for (int r = 0; r < P; ++r) {
    const double* x = &all[static_cast<std::size_t>(4 * r)];
    st.total_s = std::max(st.total_s, x[0]);
    local_max = std::max(local_max, x[1]);
    local_min = std::min(local_min, x[1]);
    local_sum += x[1];
    enter_max = std::max(enter_max, x[2]);
    exit_max = std::max(exit_max, x[2] + x[3]);
  }
  // From the last rank's entry into the reduction to the last rank's exit: the
  // reduction's own time on the critical path; the earlier ranks' extra time in it is
  // waiting (local_max - local_r).
  st.merge_s = std::max(0.0, exit_max - enter_max);
  st.wait_s = local_max - local_sum / P;
  st.max_wait_s = local_max - local_min;
}

}  // namespace ringattn::detail
