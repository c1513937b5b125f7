// Calling ring attention from a user program:
//   mpirun -np 4 build/bin/example_ring_attention_example [seqlen] [layout] [causal] [iters]
//       [piece_rows] [progress]
// Every rank builds its own shard of a random causal problem (q, k, v [1, n_r, 8, 128]),
// runs ringattn::ring_attention_forward on MPI_COMM_WORLD and rank 0 prints the time
// (median, max over ranks) and the per-step compute / wait figures.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/ring_attention.hpp"

int main(int argc, char** argv) {
  ringattn::comm::MpiRuntime mpi(&argc, &argv);
  const ringattn::comm::Communicator comm(MPI_COMM_WORLD);
  const int seqlen = argc > 1 ? std::atoi(argv[1]) : 4096;
  const ringattn::ShardLayout layout = ringattn::parse_layout(argc > 2 ? argv[2] : "zigzag");
  const bool causal = argc > 3 ? std::atoi(argv[3]) != 0 : true;
  const int iters = argc > 4 ? std::max(1, std::atoi(argv[4])) : 3;
  ringattn::RingOptions options;
  options.piece_rows = argc > 5 ? std::atoi(argv[5]) : 0;  // query rows per kernel call
  options.progress = argc > 6 ? std::atoi(argv[6]) != 0 : true;
  const int heads = 8, dim = 128;

  ringattn::RingAttentionParams p;
  p.b = 1;
  p.s = seqlen;
  p.h = p.h_k = heads;
  p.d = p.d_v = dim;
  p.layout = layout;
  p.mask.causal = causal;
  const std::int64_t rows = ringattn::ring_local_rows(p, comm.size(), comm.rank());
  std::vector<float> q(rows * heads * dim), k(q.size()), v(q.size()), out(q.size());
  std::vector<float> lse(rows * heads);
  std::mt19937 rng(42 + comm.rank());
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = u(rng);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();  // [1, n_r, h, d] fp32
  p.lse = lse.data();  // [1, h, n_r], natural log

  const ringattn::Engine engine(ringattn::EngineOptions{"auto", 0});
  std::vector<double> times;
  ringattn::RingStats stats;
  for (int it = 0; it < iters; ++it) {
    comm.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    ringattn::ring_attention_forward(comm, engine, p, options, &stats);
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), tmax;
    MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, comm.get());
    times.push_back(tmax);
  }
  std::sort(times.begin(), times.end());
  double compute = 0, wait = 0;
  for (const auto& s : stats.steps) {
    compute += s.compute_s;
    wait += s.wait_s;
  }
  if (comm.rank() == 0)
    std::printf(
        "ranks=%d threads=%d backend=%s seqlen=%d layout=%s causal=%d time_s=%.4f "
        "rank0_compute_s=%.4f rank0_wait_s=%.4f\n",
        comm.size(), engine.threads(), engine.backend_name().c_str(), seqlen,
        ringattn::layout_name(layout), causal ? 1 : 0, times[times.size() / 2], compute, wait);
  return 0;
}
