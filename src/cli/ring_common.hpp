// Helpers shared by the MPI subcommands (`ring`, `decode`): MPI-safe argument
// parsing, deterministic synthetic tensors that every rank generates for its own
// tokens only, and a float64 streaming reference for a sample of query rows.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <functional>
#include <vector>

#include "cli/cli_common.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn::cli {

// parse_args on every rank, agreed collectively: a bad option on any rank makes
// every rank throw InvalidArgument with that message. Returns false on --help
// (printed by rank 0 only).
bool parse_args_mpi(const comm::Communicator& comm, int argc, char** argv,
                    const po::options_description& desc, const std::string& usage,
                    po::variables_map* vm);

// Value of element `index` of synthetic tensor `tensor` (0 = q, 1 = k, 2 = v, ...),
// uniform in [-1, 1), rounded to storage dtype `t` (so the reference sees the
// values the kernel sees).
float synthetic_value(std::uint64_t seed, int tensor, std::int64_t index, DType t);
// Fills `n` elements starting at global element `first` of tensor `tensor`.
void fill_synthetic(std::uint64_t seed, int tensor, std::int64_t first, std::int64_t n, DType t,
                    void* dst);

// float64 reference for one query row against keys [0, s_k) of one sequence
// (docs/semantics.md section 1 with an explicit diagonal shift: key j visible iff
// j <= i + shift + wr and j >= i + shift - wl; causal => wr = 0; with attention_chunk C
// also floor(j / C) == floor((i + shift) / C); sinks applied).
//   q_at(head, c), k_at(j, kv_head, c), v_at(j, kv_head, c) give element values.
//   out [h, d_v] and lse [h] (natural log, -inf for an empty row).
struct RowRefProblem {
  int h = 0, h_k = 0, d = 0, d_v = 0;
  std::int64_t s_k = 0, row = 0, shift = 0;
  MaskParams mask;
};
void reference_row(const RowRefProblem& p, const std::function<double(int, int)>& q_at,
                   const std::function<double(std::int64_t, int, int)>& k_at,
                   const std::function<double(std::int64_t, int, int)>& v_at, double* out,
                   double* lse);

// --check: the largest errors of the checked rows against reference_row.
struct CheckErrors {
  double max_abs = 0.0;      // max |out - ref|
  double max_lse_rel = 0.0;  // max |lse - ref| / max(1, |ref|); equal infinities 0, NaN 1e30

  // One row: out [h, d_v] and its h LSE entries lse[i * lse_stride] against the
  // reference ref_out [h * d_v], ref_lse [h].
  void add_row(const float* out, const float* lse, std::int64_t lse_stride,
               const std::vector<double>& ref_out, const std::vector<double>& ref_lse);
  // The maximum over the ranks (collective).
  void max_over(const comm::Communicator& comm);
  // Above the tolerance of storage dtype t (fp32 1e-4, 16-bit 3e-2): prints
  // "ringattn <command>: error: --check failed: ..." to stderr when `print` is set.
  bool failed(DType t, const char* command, bool print) const;
  // The JSON fields max_abs_err and max_lse_rel_err; the result line's
  // " | check: max abs err ..., max LSE rel err ..." part.
  void to_json(Json& j) const;
  void print() const;
};

// The first fields of the JSON result of ring, decode and session: command, version,
// ranks, threads, backend.
Json result_json(const char* command, int ranks, const Engine& engine);

// The maximum / sum of x over the ranks (collective).
double allreduce_max(const comm::Communicator& comm, double x);
double allreduce_sum(const comm::Communicator& comm, double x);

// The decode steps of a session (`session`, `session --mla`): per step its latency and
// the shares of the reduction's split (StepStats): the reduction's own cost, the mean and
// the largest imbalance wait, the slowest rank's whole time inside the reduction.
struct StepShares {
  std::vector<double> step_s, merge_share, imbalance_share, max_wait_share, reduction_share;
  // One step (collective: the slowest rank's reduction time).
  void add(const comm::Communicator& comm, const StepStats& ds);
  // The medians as decode_merge_share, decode_imbalance_share, decode_max_wait_share and
  // decode_reduction_share.
  void to_json(Json& j) const;
};

// The engine of --dtype/--backend/--threads, made on every rank collectively (a bad
// --backend on one rank is the same error on all).
Engine make_engine_mpi(const comm::Communicator& comm, const KernelArgs& args);

}  // namespace ringattn::cli
