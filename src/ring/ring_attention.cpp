// Pass-KV ring attention: queries stay, K/V shards travel (ring_attention.hpp).
#include "ringattn/ring_attention.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstring>

#include "ring/ring_blocks.hpp"
#include "ringattn/comm/ring_exchange.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn {

void ring_attention_forward(const comm::Communicator& comm, const Engine& engine,
                            const RingAttentionParams& p, const RingOptions& options,
                            RingStats* stats) {
  using namespace detail;
  const int ranks = comm.size();
  const int rank = comm.rank();
  ring_validate(comm, p, "pass-kv");
  const RingPlan plan = make_ring_plan(p, ranks);
  const std::int64_t my_rows = plan.rows(rank);
  const std::size_t max_bytes =
      static_cast<std::size_t>(plan.max_rows * (plan.k_row + plan.v_row)) * plan.esize;

  // Accumulators: out [rows, h, d_v] (the caller's buffer), lse_acc [rows, h].
  std::fill(p.out, p.out + my_rows * plan.o_row, 0.0f);
  std::vector<float> lse_acc(static_cast<std::size_t>(my_rows * p.h), kNegInf);
  const std::int64_t piece = ring_piece_rows(plan, options);
  RingScratch scratch(plan, piece);

  comm::RingExchange exchange(comm, max_bytes);
  if (my_rows > 0) {
    std::memcpy(exchange.current(), p.k,
                static_cast<std::size_t>(my_rows * plan.k_row) * plan.esize);
    std::memcpy(exchange.current() + static_cast<std::size_t>(my_rows * plan.k_row) * plan.esize,
                p.v, static_cast<std::size_t>(my_rows * plan.v_row) * plan.esize);
  }
  if (stats) {
    stats->steps.assign(static_cast<std::size_t>(ranks), RingStepStats{});
    stats->total_s = 0.0;
  }
  const double t_begin = ring_now_s();

  run_or_abort(comm, "during the ring", [&] {
    // Pass-KV ring. At step t rank r holds the K/V shard of src = (r - t) mod P; it
    // starts passing that shard on to r+1 (and receiving the next from r-1), then
    // attends its queries to the shard in hand (attend_shard: hidden blocks skipped,
    // visible chunks batched into as few kernel calls as the mask allows, partials
    // merged into (out, lse_acc)), calling MPI_Testall between kernel calls so the
    // transfer proceeds under the compute. Bytes per step: the largest K+V shard,
    // max_rows * h_k * (d + d_v) * sizeof(dtype); P-1 transfers in all.
    //
    //   step  0      1      ...  P-1
    //   holds K/V_r  K/V_r-1 ... K/V_r+1      (indices mod P)
    for (int t = 0; t < ranks; ++t) {
      const int src = (rank - t + ranks) % ranks;
      const bool send = t < ranks - 1;
      if (send) exchange.start();
      const double t0 = ring_now_s();
      RingStepStats st;
      const std::byte* k_bytes = exchange.current();
      const std::byte* v_bytes =
          k_bytes + static_cast<std::size_t>(plan.rows(src) * plan.k_row) * plan.esize;
      std::function<void()> progress;
      if (send && options.progress) progress = [&] { exchange.progress(); };
      attend_shard(plan, engine, rank, static_cast<const std::byte*>(p.q), src, k_bytes, v_bytes,
                   p.out, lse_acc.data(), piece, scratch, progress, st);
      const double t1 = ring_now_s();
      st.compute_s = t1 - t0;
      if (send) {
        exchange.finish();
        st.wait_s = ring_now_s() - t1;
        st.bytes = static_cast<std::int64_t>(max_bytes);
      }
      if (stats) stats->steps[static_cast<std::size_t>(t)] = st;
    }
  });

  // Attention sinks: once, on the fully merged rows (out [rows, h, d_v], lse_acc [rows, h]).
  apply_sinks(p.out, p.d_v, lse_acc.data(), 1, p.mask.sinks, my_rows * p.h, p.h, p.d_v);
  if (p.lse) ring_write_lse(plan, rank, lse_acc.data(), p.lse);
  if (stats) stats->total_s = ring_now_s() - t_begin;
}

const char* ring_mode_name(RingMode mode) {
  return mode == RingMode::kPassQ ? "pass-q" : "pass-kv";
}

RingMode parse_ring_mode(std::string_view name) {
  if (name == "pass-kv") return RingMode::kPassKV;
  if (name == "pass-q") return RingMode::kPassQ;
  RA_THROW(InvalidArgument,
           "ring mode: unknown mode '" << name << "' (expected pass-kv or pass-q)");
}

void ring_attention(const comm::Communicator& comm, const Engine& engine, RingMode mode,
                    const RingAttentionParams& p, const RingOptions& options, RingStats* stats) {
  if (mode == RingMode::kPassQ) {
    ring_attention_forward_pass_q(comm, engine, p, options, stats);
  } else {
    ring_attention_forward(comm, engine, p, options, stats);
  }
}

}  // namespace ringattn
