// `ringattn session --mla` (session_mla.hpp): prompt latents stored on their owners, then
// decode steps of t tokens over the sharded latent cache; the decode step's time split into
// the merge reduction itself and the wait for the slowest rank, as for the GQA session.
#include "cli/session_mla.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/mla_session.hpp"
#include "ringattn/version.hpp"

namespace ringattn::cli {

namespace {

double max_all(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_MAX, comm.get()));
  return r;
}

}  // namespace

int run_mla_session(const comm::Communicator& comm, const Engine& engine, const MlaSessionRun& r) {
  const int P = comm.size(), rank = comm.rank();
  const int D = kMlaHeadDim, DV = kMlaValueDim;
  const std::size_t es = dtype_size(r.dtype);
  const std::int64_t cap = r.prompt + std::int64_t{r.steps} * r.t;
  MlaSessionConfig cfg;
  cfg.q_dtype = cfg.kv_dtype = r.dtype;
  cfg.b = r.b;
  cfg.h_q = r.h_q;
  cfg.page_size = r.page_size;
  cfg.capacity = std::max<std::int64_t>(cap, 1);
  cfg.layout = r.layout;
  cfg.prompt_layout = r.prompt_layout;
  cfg.scale = r.scale;
  cfg.sinks = r.sinks;
  MlaSession session(comm, engine, cfg);
  session.set_merge_after_barrier(r.merge_barrier);
  // Synthetic tensors: q = tensor 0 ([b, cap, h_q, 576]), latents = tensor 1 ([b, cap, 576]).
  const std::int64_t qr = std::int64_t{r.h_q} * D;

  // ---- prompt latents: this rank's share ----
  std::vector<std::pair<int, std::int64_t>> mine;
  for (int s = 0; s < r.b; ++s)
    for (auto pos : session.prefill_positions(r.prompt)) mine.push_back({s, pos});
  const auto n_local = static_cast<std::int64_t>(mine.size());
  std::vector<std::byte> kv(static_cast<std::size_t>(n_local * D) * es);
#pragma omp parallel for num_threads(engine.threads()) schedule(static)
  for (std::int64_t i = 0; i < n_local; ++i) {
    const auto [s, pos] = mine[static_cast<std::size_t>(i)];
    fill_synthetic(r.seed, 1, (std::int64_t{s} * cap + pos) * D, D, r.dtype,
                   kv.data() + static_cast<std::size_t>(i * D) * es);
  }
  comm.barrier();
  const double t_session = now_seconds();
  const StepStats pst =
      session.prefill(std::vector<std::int64_t>(static_cast<std::size_t>(r.b), r.prompt),
                      kv.empty() ? nullptr : kv.data());

  // ---- decode steps ----
  const std::int64_t rows = std::int64_t{r.b} * r.t * r.h_q;
  std::vector<std::byte> q(static_cast<std::size_t>(std::int64_t{r.b} * r.t * qr) * es),
      nkv(static_cast<std::size_t>(std::int64_t{r.b} * r.t * D) * es);
  std::vector<float> out(static_cast<std::size_t>(rows * DV)), lse(static_cast<std::size_t>(rows));
  std::vector<double> step_s, merge_share, imbalance_share, max_wait_share, reduction_share;
  double max_err = 0.0, max_lse_err = 0.0;
  for (int st = 0; st < r.steps; ++st) {
    for (int s = 0; s < r.b; ++s) {
      const std::int64_t pos = r.prompt + std::int64_t{st} * r.t;
      fill_synthetic(r.seed, 0, (std::int64_t{s} * cap + pos) * qr, std::int64_t{r.t} * qr, r.dtype,
                     q.data() + static_cast<std::size_t>(std::int64_t{s} * r.t * qr) * es);
      fill_synthetic(r.seed, 1, (std::int64_t{s} * cap + pos) * D, std::int64_t{r.t} * D, r.dtype,
                     nkv.data() + static_cast<std::size_t>(std::int64_t{s} * r.t * D) * es);
    }
    const StepStats ds = session.decode(r.t, q.data(), nkv.data(), out.data(), lse.data(), r.root);
    step_s.push_back(ds.total_s);
    const double step = std::max(ds.total_s, 1e-12);
    merge_share.push_back(ds.merge_s / step);
    imbalance_share.push_back(ds.wait_s / step);
    max_wait_share.push_back(ds.max_wait_s / step);
    reduction_share.push_back(max_all(comm, ds.reduce_s) / step);
    // --check: the first and last steps' rows against float64 MLA over the whole history
    // (one KV head of 576 values whose first 512 are the value).
    if (r.check && (st == 0 || st == r.steps - 1) && rank == std::max(r.root, 0)) {
      for (int s = 0; s < r.b; ++s)
        for (int i = 0; i < r.t; ++i) {
          const std::int64_t pos = r.prompt + std::int64_t{st} * r.t + i;
          RowRefProblem rp;
          rp.h = r.h_q;
          rp.h_k = 1;
          rp.d = D;
          rp.d_v = DV;
          rp.s_k = pos + 1;
          rp.row = pos;
          rp.mask.causal = true;
          rp.mask.window_right = 0;
          rp.mask.scale = r.scale;
          rp.mask.sinks = r.sinks;
          std::vector<double> ro(static_cast<std::size_t>(r.h_q) * DV), rl(r.h_q);
          const auto lat = [&](std::int64_t j, int, int c) {
            return synthetic_value(r.seed, 1, (std::int64_t{s} * cap + j) * D + c, r.dtype);
          };
          reference_row(
              rp,
              [&](int hh, int c) {
                return synthetic_value(r.seed, 0, (std::int64_t{s} * cap + pos) * qr + hh * D + c,
                                       r.dtype);
              },
              lat, lat, ro.data(), rl.data());
          for (int hh = 0; hh < r.h_q; ++hh) {
            const std::int64_t row = (std::int64_t{s} * r.t + i) * r.h_q + hh;
            for (int c = 0; c < DV; ++c)
              max_err =
                  std::max(max_err, std::abs(double(out[static_cast<std::size_t>(row * DV + c)]) -
                                             ro[static_cast<std::size_t>(hh * DV + c)]));
            const double
                a = lse[static_cast<std::size_t>((std::int64_t{s} * r.h_q + hh) * r.t + i)],
                b = rl[static_cast<std::size_t>(hh)];
            const double err = (std::isinf(a) && a == b) ? 0.0 : std::abs(a - b) / std::max(1.0, b);
            max_lse_err = std::max(max_lse_err, std::isnan(err) ? 1e30 : err);
          }
        }
    }
  }
  const double session_s = max_all(comm, now_seconds() - t_session);
  max_err = max_all(comm, max_err);
  max_lse_err = max_all(comm, max_lse_err);
  const double step_med = median(step_s);
  const double tok_s = step_med > 0 ? double(r.b) * r.t / step_med : 0.0;
  // Latent bytes read per step by all ranks together (the whole history once).
  const double read_bytes = double(r.b) * (double(r.prompt) + 0.5 * r.steps * r.t) * D * es;
  if (rank == 0) {
    if (r.json) {
      Json j;
      j["command"] = "session";
      j["mla"] = true;
      j["version"] = version();
      j["ranks"] = P;
      j["threads"] = engine.threads();
      j["backend"] = engine.backend_name();
      j["dtype"] = dtype_name(r.dtype);
      j["batch"] = r.b;
      j["prompt_max"] = r.prompt;
      j["heads"] = r.h_q;
      j["page_size"] = r.page_size;
      j["cache_layout"] = cache_layout_name(r.layout);
      j["prefill_layout"] = layout_name(r.prompt_layout);
      j["time_s"] = json_number(session_s);
      j["prefill_store_s"] = json_number(pst.total_s);
      j["decode_steps"] = r.steps;
      j["decode_tokens_per_step"] = r.t;
      j["decode_step_median_s"] = json_number(step_med);
      j["decode_step_max_s"] =
          json_number(step_s.empty() ? 0.0 : *std::max_element(step_s.begin(), step_s.end()));
      j["decode_merge_share"] = json_number(median(merge_share));
      j["decode_imbalance_share"] = json_number(median(imbalance_share));
      j["decode_max_wait_share"] = json_number(median(max_wait_share));
      j["decode_reduction_share"] = json_number(median(reduction_share));
      j["decode_merge_after_barrier"] = r.merge_barrier;
      j["decode_tokens_per_s"] = json_number(tok_s);
      j["decode_cache_read_gb_per_s"] =
          json_number(step_med > 0 ? read_bytes / step_med / 1e9 : 0.0);
      if (r.check) {
        j["max_abs_err"] = json_number(max_err);
        j["max_lse_rel_err"] = json_number(max_lse_err);
      }
      std::printf("%s\n", json_dump(j).c_str());
    } else {
      std::printf(
          "session --mla: ranks=%d threads=%d backend=%s dtype=%s b=%d prompt=%lld h_q=%d "
          "page=%d cache=%s | decode %d x %d tok: step median %.3f ms, merge %.2f%%, "
          "imbalance wait %.1f%% (max %.1f%%), in reduction %.1f%%, %.1f tok/s, latent read "
          "%.1f GB/s",
          P, engine.threads(), engine.backend_name().c_str(), dtype_name(r.dtype), r.b,
          static_cast<long long>(r.prompt), r.h_q, r.page_size, cache_layout_name(r.layout),
          r.steps, r.t, step_med * 1e3, median(merge_share) * 100.0,
          median(imbalance_share) * 100.0, median(max_wait_share) * 100.0,
          median(reduction_share) * 100.0, tok_s, step_med > 0 ? read_bytes / step_med / 1e9 : 0.0);
      if (r.check)
        std::printf(" | check: max abs err %.3g, max LSE rel err %.3g", max_err, max_lse_err);
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  const double tol = r.dtype == DType::kF32 ? 1e-4 : 3e-2;
  if (r.check && (max_err > tol || max_lse_err > tol)) {
    if (rank == 0)
      std::fprintf(stderr,
                   "ringattn session --mla: error: --check failed: max abs err %g (tolerance %g)\n",
                   max_err, tol);
    return 1;
  }
  return 0;
}

}  // namespace ringattn::cli
