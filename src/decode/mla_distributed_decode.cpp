// Distributed MLA decode over a sharded latent cache (mla_distributed_decode.hpp).
#include "ringattn/mla_distributed_decode.hpp"

#include <mpi.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn {

void mla_distributed_decode(const comm::Communicator& comm, const Engine& engine,
                            const MlaDecodeParams& local, const std::int32_t* global_seqlens,
                            int root) {
  const int P = comm.size(), rank = comm.rank();
  const MlaDecodeParams& p = local;
  bool tail_causal = false;
  comm::run_collectively(comm, [&] {
    RA_CHECK(!p.is_sparse(), UnsupportedError,
             "mla distributed decode: sparse indices are not supported across ranks");
    RA_CHECK_ARG(p.b > 0 && p.s_q > 0 && p.h_q > 0,
                 "mla distributed decode: b, s_q, h_q must be positive, got "
                     << p.b << ", " << p.s_q << ", " << p.h_q);
    RA_CHECK_ARG(global_seqlens && p.cache_seqlens,
                 "mla distributed decode: global and local cache_seqlens are required");
    RA_CHECK_ARG(root >= -1 && root < P,
                 "mla distributed decode: root " << root << " outside [-1, " << P << ")");
    for (int i = 0; i < p.b; ++i) {
      const std::int64_t L = global_seqlens[i];
      RA_CHECK_ARG(L >= 0, "mla distributed decode: global cache_seqlens[" << i << "] = " << L);
      const std::int64_t k0 = decode_shard_first(L, P, rank), n = decode_shard_length(L, P, rank);
      RA_CHECK_ARG_EQ(std::int64_t{p.cache_seqlens[i]}, n,
                      "mla distributed decode: local cache_seqlens["
                          << i << "] on rank " << rank << " (tokens [" << k0 << ", " << k0 + n
                          << ") of " << L << ")");
      const bool tail = k0 + n == L;
      if (p.causal && !tail && n > 0)
        RA_CHECK_ARG(k0 + n - 1 <= L - p.s_q,
                     "mla distributed decode: causal with s_q = "
                         << p.s_q << ": rank " << rank << " holds tokens [" << k0 << ", " << k0 + n
                         << ") of sequence " << i << " (L = " << L
                         << "), which overlap the query positions; use fewer ranks or a longer "
                            "cache (L / P >= s_q)");
    }
    tail_causal = p.causal && rank == P - 1;
  });
  comm::check_consistent(comm, {{"mla batch", std::to_string(p.b)},
                                {"mla query rows", std::to_string(p.s_q)},
                                {"mla heads", std::to_string(p.h_q)},
                                {"mla causal", p.causal ? "yes" : "no"},
                                {"mla root", std::to_string(root)}});

  // Local partial, fp32, without sinks (they apply once, after the merge).
  const std::int64_t rows = std::int64_t{p.b} * p.s_q * p.h_q;
  const int dv = kMlaValueDim, rec = dv + 1;
  std::vector<float> o(static_cast<std::size_t>(rows * dv)), l(static_cast<std::size_t>(rows));
  std::vector<float> ml(p.max_logits ? static_cast<std::size_t>(rows) : 0);
  MlaDecodeParams q = p;
  q.out = o.data();
  q.out_dtype = DType::kF32;
  q.lse = l.data();
  q.sinks = nullptr;
  q.max_logits = p.max_logits ? ml.data() : nullptr;
  // Only the tail rank's slice meets the query positions; the others see all their keys.
  q.causal = tail_causal;
  engine.mla_decode(q);

  std::vector<float> recs(static_cast<std::size_t>(rows * rec));
  for (int bi = 0; bi < p.b; ++bi)
    for (int s = 0; s < p.s_q; ++s)
      for (int hh = 0; hh < p.h_q; ++hh) {
        const std::int64_t r = (std::int64_t{bi} * p.s_q + s) * p.h_q + hh;
        std::memcpy(&recs[static_cast<std::size_t>(r * rec)], &o[static_cast<std::size_t>(r * dv)],
                    sizeof(float) * dv);
        recs[static_cast<std::size_t>(r * rec + dv)] =
            l[static_cast<std::size_t>((std::int64_t{bi} * p.h_q + hh) * p.s_q + s)];
      }
  merge_across_ranks(comm, recs.data(), rows, dv, root);
  if (p.max_logits) {
    RA_CHECK_ARG_LE(rows, std::int64_t{INT32_MAX}, "mla distributed decode: rows");
    if (root < 0) {
      RA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, ml.data(), static_cast<int>(rows), MPI_FLOAT,
                                 MPI_MAX, comm.get()));
    } else {
      RA_MPI_CHECK(MPI_Reduce(rank == root ? MPI_IN_PLACE : ml.data(), ml.data(),
                              static_cast<int>(rows), MPI_FLOAT, MPI_MAX, root, comm.get()));
    }
  }
  if (root >= 0 && rank != root) return;
  // Sinks (docs/semantics.md section 7): once, on the merged rows ([b, s_q, h_q] records).
  apply_sinks(recs.data(), rec, recs.data() + dv, rec, p.sinks, rows, p.h_q, dv);
  for (int bi = 0; bi < p.b; ++bi)
    for (int s = 0; s < p.s_q; ++s)
      for (int hh = 0; hh < p.h_q; ++hh) {
        const std::int64_t r = (std::int64_t{bi} * p.s_q + s) * p.h_q + hh;
        const float* x = &recs[static_cast<std::size_t>(r * rec)];
        for (int c = 0; c < dv; ++c) store_from_f32(p.out, r * dv + c, p.out_dtype, x[c]);
        if (p.lse) p.lse[(std::int64_t{bi} * p.h_q + hh) * p.s_q + s] = x[dv];
        if (p.max_logits) p.max_logits[r] = ml[static_cast<std::size_t>(r)];
      }
}

}  // namespace ringattn
