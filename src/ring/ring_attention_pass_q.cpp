// Pass-Q ring attention: K/V shards stay, query shards travel (ring_attention.hpp).
#include <mpi.h>

#include <algorithm>
#include <cstring>

#include "ring/ring_blocks.hpp"
#include "ringattn/comm/ring_exchange.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn {

void ring_attention_forward_pass_q(const comm::Communicator& comm, const Engine& engine,
                                   const RingAttentionParams& p, const RingOptions& options,
                                   RingStats* stats) {
  using namespace detail;
  const int ranks = comm.size();
  const int rank = comm.rank();
  ring_validate(comm, p, "pass-q");
  const RingPlan plan = make_ring_plan(p, ranks);
  const std::int64_t my_rows = plan.rows(rank);
  const std::size_t q_bytes = static_cast<std::size_t>(plan.max_rows * plan.q_row) * plan.esize;
  // A travelling accumulator: o [max_rows, h, d_v] then lse [max_rows, h], fp32.
  const std::int64_t acc_floats = plan.max_rows * (plan.o_row + p.h);
  const std::size_t acc_bytes = static_cast<std::size_t>(acc_floats) * sizeof(float);
  const auto acc_o = [&](comm::RingExchange& x) { return reinterpret_cast<float*>(x.current()); };
  const auto acc_lse = [&](comm::RingExchange& x) { return acc_o(x) + plan.max_rows * plan.o_row; };

  const std::int64_t piece = ring_piece_rows(plan, options);
  RingScratch scratch(plan, piece);
  std::vector<float> part_o(static_cast<std::size_t>(plan.max_rows * plan.o_row));
  std::vector<float> part_lse(static_cast<std::size_t>(plan.max_rows * p.h));

  comm::RingExchange qx(comm, q_bytes, 0x7a12);
  comm::RingExchange ax(comm, acc_bytes, 0x7a13);
  if (my_rows > 0)
    std::memcpy(qx.current(), p.q, static_cast<std::size_t>(my_rows * plan.q_row) * plan.esize);
  if (stats) {
    stats->steps.assign(static_cast<std::size_t>(ranks), RingStepStats{});
    stats->total_s = 0.0;
  }
  const double t_begin = ring_now_s();

  run_or_abort(comm, "during the ring", [&] {
    // Pass-Q ring. Two streams move right around the ring: the query shards, and one
    // step behind them the accumulators (o, lse) that collect each query shard's
    // partial results. At step t rank r holds Q of src = (r - t) mod P:
    //   1. start sending Q_src on (t < P-1) and the accumulator merged at step t-1
    //      (that of Q_src+1, t >= 1); receive Q_src-1 and the accumulator of Q_src
    //      (over ranks src .. r-1) from the left;
    //   2. attend Q_src to the local K/V (attend_shard) into a fresh partial state,
    //      driving both transfers between kernel calls;
    //   3. wait, then merge the partial into the received accumulator (t = 0: it
    //      starts the accumulator).
    // After step P-1 rank r holds the complete accumulator of Q_r+1 and sends it
    // home in one last transfer (receiving its own from r-1).
    //
    //   step   0        1          ...  P-1        final
    //   Q      Q_r      Q_r-1           Q_r+1      -
    //   acc    -        acc(Q_r)        acc(Q_r+2) acc(Q_r+1) -> rank r+1
    // Bytes: P-1 query transfers of max_rows * h * d * sizeof(dtype) and P
    // accumulator transfers of max_rows * h * (d_v + 1) * 4.
    for (int t = 0; t < ranks; ++t) {
      const int src = (rank - t + ranks) % ranks;
      const bool send_q = t < ranks - 1;
      const bool send_acc = t > 0;
      if (send_q) qx.start();
      if (send_acc) ax.start();
      const double t0 = ring_now_s();
      RingStepStats st;
      const std::int64_t src_rows = plan.rows(src);
      std::fill(part_o.begin(), part_o.begin() + src_rows * plan.o_row, 0.0f);
      std::fill(part_lse.begin(), part_lse.begin() + src_rows * p.h, kNegInf);
      std::function<void()> progress;
      if ((send_q || send_acc) && options.progress)
        progress = [&] {
          if (send_q) qx.progress();
          if (send_acc) ax.progress();
        };
      attend_shard(plan, engine, src, qx.current(), rank, static_cast<const std::byte*>(p.k),
                   static_cast<const std::byte*>(p.v), part_o.data(), part_lse.data(), piece,
                   scratch, progress, st);
      const double t1 = ring_now_s();
      st.compute_s = t1 - t0;
      if (send_q) {
        qx.finish();
        st.bytes += static_cast<std::int64_t>(q_bytes);
      }
      if (send_acc) {
        ax.finish();
        st.bytes += static_cast<std::int64_t>(acc_bytes);
      }
      const double t2 = ring_now_s();
      st.wait_s = t2 - t1;
      if (t == 0) {
        std::copy(part_o.begin(), part_o.begin() + src_rows * plan.o_row, acc_o(ax));
        std::copy(part_lse.begin(), part_lse.begin() + src_rows * p.h, acc_lse(ax));
      } else {
        merge_state_inplace(acc_o(ax), acc_lse(ax), part_o.data(), part_lse.data(), src_rows * p.h,
                            p.d_v);
      }
      st.compute_s += ring_now_s() - t2;
      if (stats) stats->steps[static_cast<std::size_t>(t)] = st;
    }
    if (ranks > 1) {
      const double t0 = ring_now_s();
      ax.start();
      ax.finish();
      if (stats) {
        auto& last = stats->steps.back();
        last.wait_s += ring_now_s() - t0;
        last.bytes += static_cast<std::int64_t>(acc_bytes);
      }
    }
  });

  std::copy(acc_o(ax), acc_o(ax) + my_rows * plan.o_row, p.out);
  // Attention sinks: once, on the fully merged rows (out [rows, h, d_v], acc_lse [rows, h]).
  apply_sinks(p.out, p.d_v, acc_lse(ax), 1, p.mask.sinks, my_rows * p.h, p.h, p.d_v);
  if (p.lse) ring_write_lse(plan, rank, acc_lse(ax), p.lse);
  if (stats) stats->total_s = ring_now_s() - t_begin;
}

}  // namespace ringattn
