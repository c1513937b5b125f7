// `ringattn session --mla` (session_mla.hpp): prompt latents stored on their owners, then
// decode steps of t tokens over the sharded latent cache; the decode step's time split into
// the merge reduction itself and the wait for the slowest rank, as for the GQA session.
#include "cli/session_mla.hpp"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/mla_session.hpp"

namespace ringattn::cli {

namespace {

constexpr int D = kMlaHeadDim, DV = kMlaValueDim;

// Synthetic tensors: q = tensor 0 ([b, cap, h_q, 576]), latents = tensor 1 ([b, cap, 576]),
// cap = the cache's tokens per sequence.
struct Synthetic {
  const MlaSessionRun& r;
  std::int64_t cap;
  std::int64_t q_row() const { return std::int64_t{r.h_q} * D; }
  // n rows of sequence s from position pos on.
  void q_rows(int s, std::int64_t pos, std::int64_t n, std::byte* dst) const {
    fill_synthetic(r.seed, 0, (std::int64_t{s} * cap + pos) * q_row(), n * q_row(), r.dtype, dst);
  }
  void latent_rows(int s, std::int64_t pos, std::int64_t n, std::byte* dst) const {
    fill_synthetic(r.seed, 1, (std::int64_t{s} * cap + pos) * D, n * D, r.dtype, dst);
  }
};

// What the session computed, and its timings.
struct MlaResults : StepShares {
  StepStats pst;
  CheckErrors err;
  double session_s = 0.0;  // prompt store to the last step, slowest rank
};

MlaSessionConfig session_config(const MlaSessionRun& r, std::int64_t cap) {
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
  return cfg;
}

// This rank's share of the prompt latents [t_r, 576], in prefill_positions order
// (generated on the engine's threads: long prompts have many rows).
std::vector<std::byte> prompt_latents(const MlaSession& session, const Engine& engine,
                                      const Synthetic& syn) {
  std::vector<std::pair<int, std::int64_t>> mine;
  for (int s = 0; s < syn.r.b; ++s)
    for (auto pos : session.prefill_positions(syn.r.prompt)) mine.push_back({s, pos});
  const auto n_local = static_cast<std::int64_t>(mine.size());
  const std::size_t es = dtype_size(syn.r.dtype);
  std::vector<std::byte> kv(static_cast<std::size_t>(n_local * D) * es);
#pragma omp parallel for num_threads(engine.threads()) schedule(static)
  for (std::int64_t i = 0; i < n_local; ++i) {
    const auto [s, pos] = mine[static_cast<std::size_t>(i)];
    syn.latent_rows(s, pos, 1, kv.data() + static_cast<std::size_t>(i * D) * es);
  }
  return kv;
}

// --check: the rows of decode step `step` against float64 MLA over the whole history (one
// KV head of 576 values whose first 512 are the value); out [b, t, h_q, 512], lse
// [b, h_q, t].
void check_step(const Synthetic& syn, int step, const float* out, const float* lse,
                CheckErrors& err) {
  const MlaSessionRun& r = syn.r;
  for (int s = 0; s < r.b; ++s)
    for (int i = 0; i < r.t; ++i) {
      const std::int64_t pos = r.prompt + std::int64_t{step} * r.t + i;
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
        return synthetic_value(r.seed, 1, (std::int64_t{s} * syn.cap + j) * D + c, r.dtype);
      };
      const auto q_at = [&](int hh, int c) {
        return synthetic_value(
            r.seed, 0, (std::int64_t{s} * syn.cap + pos) * syn.q_row() + hh * D + c, r.dtype);
      };
      reference_row(rp, q_at, lat, lat, ro.data(), rl.data());
      err.add_row(out + (std::int64_t{s} * r.t + i) * r.h_q * DV,
                  lse + std::int64_t{s} * r.h_q * r.t + i, r.t, ro, rl);
    }
}

// T decode steps of t tokens per sequence; --check on the first and last.
void decode_steps(const comm::Communicator& comm, MlaSession& session, const Synthetic& syn,
                  MlaResults& res) {
  const MlaSessionRun& r = syn.r;
  const std::size_t es = dtype_size(r.dtype);
  const std::int64_t rows = std::int64_t{r.b} * r.t * r.h_q;
  std::vector<std::byte> q(static_cast<std::size_t>(std::int64_t{r.b} * r.t * syn.q_row()) * es),
      nkv(static_cast<std::size_t>(std::int64_t{r.b} * r.t * D) * es);
  std::vector<float> out(static_cast<std::size_t>(rows * DV)), lse(static_cast<std::size_t>(rows));
  for (int step = 0; step < r.steps; ++step) {
    for (int s = 0; s < r.b; ++s) {
      const std::int64_t pos = r.prompt + std::int64_t{step} * r.t, row = std::int64_t{s} * r.t;
      syn.q_rows(s, pos, r.t, q.data() + static_cast<std::size_t>(row * syn.q_row()) * es);
      syn.latent_rows(s, pos, r.t, nkv.data() + static_cast<std::size_t>(row * D) * es);
    }
    const StepStats ds = session.decode(r.t, q.data(), nkv.data(), out.data(), lse.data(), r.root);
    res.add(comm, ds);
    if (r.check && (step == 0 || step == r.steps - 1) && comm.rank() == std::max(r.root, 0))
      check_step(syn, step, out.data(), lse.data(), res.err);
  }
}

// Latent bytes read per step by all ranks together (the whole history once, on average).
double read_bytes(const MlaSessionRun& r) {
  return double(r.b) * (double(r.prompt) + 0.5 * r.steps * r.t) * D * double(dtype_size(r.dtype));
}

void print_json(const MlaSessionRun& r, int ranks, const Engine& engine, const MlaResults& res) {
  const double step_med = median_of(res.step_s);
  Json j = result_json("session", ranks, engine);
  j["mla"] = true;
  j["dtype"] = dtype_name(r.dtype);
  j["batch"] = r.b;
  j["prompt_max"] = r.prompt;
  j["heads"] = r.h_q;
  j["page_size"] = r.page_size;
  j["cache_layout"] = cache_layout_name(r.layout);
  j["prefill_layout"] = layout_name(r.prompt_layout);
  j["time_s"] = json_number(res.session_s);
  j["prefill_store_s"] = json_number(res.pst.total_s);
  j["decode_steps"] = r.steps;
  j["decode_tokens_per_step"] = r.t;
  j["decode_step_median_s"] = json_number(step_med);
  j["decode_step_max_s"] = json_number(
      res.step_s.empty() ? 0.0 : *std::max_element(res.step_s.begin(), res.step_s.end()));
  res.to_json(j);
  j["decode_merge_after_barrier"] = r.merge_barrier;
  j["decode_tokens_per_s"] = json_number(step_med > 0 ? double(r.b) * r.t / step_med : 0.0);
  j["decode_cache_read_gb_per_s"] =
      json_number(step_med > 0 ? read_bytes(r) / step_med / 1e9 : 0.0);
  if (r.check) res.err.to_json(j);
  std::printf("%s\n", json_dump(j).c_str());
}

void print_line(const MlaSessionRun& r, int ranks, const Engine& engine, const MlaResults& res) {
  const double step_med = median_of(res.step_s);
  std::printf(
      "session --mla: ranks=%d threads=%d backend=%s dtype=%s b=%d prompt=%lld h_q=%d "
      "page=%d cache=%s | decode %d x %d tok: step median %.3f ms, merge %.2f%%, "
      "imbalance wait %.1f%% (max %.1f%%), in reduction %.1f%%, %.1f tok/s, latent read "
      "%.1f GB/s",
      ranks, engine.threads(), engine.backend_name().c_str(), dtype_name(r.dtype), r.b,
      static_cast<long long>(r.prompt), r.h_q, r.page_size, cache_layout_name(r.layout), r.steps,
      r.t, step_med * 1e3, median_of(res.merge_share) * 100.0,
      median_of(res.imbalance_share) * 100.0, median_of(res.max_wait_share) * 100.0,
      median_of(res.reduction_share) * 100.0, step_med > 0 ? double(r.b) * r.t / step_med : 0.0,
      step_med > 0 ? read_bytes(r) / step_med / 1e9 : 0.0);
  if (r.check) res.err.print();
  std::printf("\n");
}

}  // namespace

int run_mla_session(const comm::Communicator& comm, const Engine& engine, const MlaSessionRun& r) {
  const Synthetic syn{r, r.prompt + std::int64_t{r.steps} * r.t};
  MlaSession session(comm, engine, session_config(r, syn.cap));
  session.set_merge_after_barrier(r.merge_barrier);
  const std::vector<std::byte> kv = prompt_latents(session, engine, syn);
  MlaResults res;
  comm.barrier();
  const double t_start = now_seconds();
  res.pst = session.prefill(std::vector<std::int64_t>(static_cast<std::size_t>(r.b), r.prompt),
                            kv.empty() ? nullptr : kv.data());
  decode_steps(comm, session, syn, res);
  res.session_s = allreduce_max(comm, now_seconds() - t_start);
  if (r.check) res.err.max_over(comm);
  if (comm.rank() == 0) {
    if (r.json) {
      print_json(r, comm.size(), engine, res);
    } else {
      print_line(r, comm.size(), engine, res);
    }
    std::fflush(stdout);
  }
  return r.check && res.err.failed(r.dtype, "session --mla", comm.rank() == 0) ? 1 : 0;
}

}  // namespace ringattn::cli
